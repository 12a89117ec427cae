"""A thin client for Nomad's HTTP API (https://developer.hashicorp.com/nomad/api-docs), on requests.

Settings come from `cfg.nomad` and fall back to the environment variables the `nomad` CLI reads
(NOMAD_ADDR, NOMAD_TOKEN, NOMAD_CACERT, NOMAD_CLIENT_CERT, NOMAD_CLIENT_KEY, NOMAD_NAMESPACE,
NOMAD_REGION): configuration overrides the environment; without either, the VM's forwarded port is used.

- TLS is always verified: against NOMAD_CACERT when given, else the system CA bundle. There is no switch
  to turn verification off.
- Every request has a connect and a read timeout. Connection errors (refused, reset, DNS) are retried with
  exponential backoff; HTTP errors are not (a 500 "No cluster leader" is a state to wait on, which is the
  caller's business, not a transport fault to hide).
- Waits use blocking queries: `get(path, index=..., wait=...)` passes `?index=N&wait=Ns`, the server holds
  the request until its index passes N or `wait` elapses, and `Result.index` carries X-Nomad-Index for the
  next call. A return does not guarantee a change (the docs say so); callers re-check state.
- Nomad's error bodies (plain text, e.g. "No cluster leader", "Permission denied") are surfaced in
  NomadAPIError with a hint for the usual causes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from infra.config import Config, check_url
from infra.errors import NomadError, root_cause

#: Nomad servers cap a blocking query at 10 minutes (MaxQueryTime) and add up to wait/16 of jitter.
MAX_WAIT = 600.0
JITTER_FRACTION = 16

ENV = {
    "addr": "NOMAD_ADDR",
    "token": "NOMAD_TOKEN",
    "cacert": "NOMAD_CACERT",
    "client_cert": "NOMAD_CLIENT_CERT",
    "client_key": "NOMAD_CLIENT_KEY",
    "namespace": "NOMAD_NAMESPACE",
    "region": "NOMAD_REGION",
}


class NomadUnreachable(NomadError):
    """No HTTP answer at all: connection refused/reset, DNS failure, TLS failure, timeout."""


class NomadTLSError(NomadUnreachable):
    """The TLS handshake failed (unknown CA, wrong host name, client certificate refused)."""


class NomadAPIError(NomadError):
    """Nomad answered with an HTTP error status; `body` is Nomad's own error text."""

    def __init__(self, status: int, method: str, path: str, body: str, *, hint: str | None = None) -> None:
        self.status = status
        self.method = method
        self.path = path
        self.body = body.strip()
        super().__init__(
            f"Nomad API {method} {path}: HTTP {status}: {self.body or '(empty body)'}", hint=hint
        )

    @property
    def no_leader(self) -> bool:
        return self.status == 500 and "no cluster leader" in self.body.lower()


class NomadNotFound(NomadAPIError):
    """HTTP 404: the job, node, evaluation or variable does not exist."""


class NomadConflict(NomadAPIError):
    """HTTP 409: a check-and-set write lost (the body holds the current object)."""


@dataclass(frozen=True)
class Settings:
    addr: str
    token: str = ""
    cacert: str = ""
    client_cert: str = ""
    client_key: str = ""
    namespace: str = ""
    region: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 5
    #: where each value came from ("config", "NOMAD_ADDR", "default"), for messages
    source: str = "default"

    @property
    def tls(self) -> bool:
        return self.addr.startswith("https://")


def settings(cfg: Config, env: Mapping[str, str] | None = None) -> Settings:
    """Resolve the API settings: config key, else NOMAD_* variable, else the VM's forwarded port."""
    env = os.environ if env is None else env
    n = cfg.nomad
    values: dict[str, str] = {}
    for key, var in ENV.items():
        values[key] = str(getattr(n, key) or env.get(var, "") or "")
    source = "config nomad.addr" if n.addr else ("NOMAD_ADDR" if env.get("NOMAD_ADDR") else "default")
    if not values["addr"]:
        port = cfg.vm.ports["nomad"].host if "nomad" in cfg.vm.ports else 4646
        values["addr"] = f"http://127.0.0.1:{port}"
    addr = values["addr"].rstrip("/")
    if "://" not in addr:  # the nomad CLI accepts host:port; so do we
        addr = "http://" + addr
    if not addr.startswith(("http://", "https://")):
        raise NomadError(f"Nomad address {addr!r} ({source}) must start with http:// or https://")
    check_url(addr, f"Nomad address ({source})")  # a bad host/port is an error here, not a traceback later
    if bool(values["client_cert"]) != bool(values["client_key"]):
        raise NomadError(
            "NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY (or nomad.client_cert/client_key) must be set together"
        )
    for key in ("cacert", "client_cert", "client_key"):
        if values[key] and not os.path.isfile(values[key]):
            raise NomadError(f"{ENV[key]} / nomad.{key}: file not found: {values[key]}")
    return Settings(
        addr=addr,
        token=values["token"],
        cacert=values["cacert"],
        client_cert=values["client_cert"],
        client_key=values["client_key"],
        namespace=values["namespace"],
        region=values["region"],
        connect_timeout=float(n.connect_timeout),
        read_timeout=float(n.read_timeout),
        retries=int(n.retries),
        source=source,
    )


@dataclass(frozen=True)
class Result:
    """A decoded answer: the JSON body and the blocking-query index (X-Nomad-Index, 0 if absent)."""

    body: Any
    index: int
    known_leader: bool | None = None


def _hint_for(status: int, body: str, s: Settings) -> str | None:
    low = body.lower()
    if status == 403:
        token = "a token is set" if s.token else "no token is set"
        return (
            f"Nomad refused the request ({token}): set NOMAD_TOKEN (or nomad.token) to an ACL token "
            "allowed to do this; `nomad acl token self` shows what a token may do"
        )
    if status == 500 and "no cluster leader" in low:
        return (
            "the Nomad servers have not elected a leader yet: run `inv nomad.wait`, or look at `inv vm.logs`"
        )
    if status == 400 and "region" in low:
        return "check NOMAD_REGION / nomad.region"
    if status == 404 and "namespace" in low:
        return "check NOMAD_NAMESPACE / nomad.namespace"
    return None


class Client:
    """One Nomad API endpoint. Methods return decoded JSON; errors raise NomadError subclasses."""

    def __init__(
        self,
        s: Settings,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = s
        self._sleep = sleep
        self._on_request = on_request
        self.session = session or requests.Session()
        # A path pins the CA; True means the system/certifi bundle. Never False. Passed on every request:
        # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a *session's* verify setting.
        self.verify: str | bool = s.cacert or True
        self.cert: tuple[str, str] | None = (s.client_cert, s.client_key) if s.client_cert else None
        self.session.verify = self.verify
        self.session.cert = self.cert
        self.session.headers["User-Agent"] = "infra-lab"
        if s.token:
            self.session.headers["X-Nomad-Token"] = s.token
        self.requests_made = 0

    @classmethod
    def from_config(cls, cfg: Config, env: Mapping[str, str] | None = None, **kwargs: Any) -> Client:
        return cls(settings(cfg, env), **kwargs)

    @property
    def addr(self) -> str:
        return self.settings.addr

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------------------------------ transport --
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        index: int | None = None,
        wait: float | None = None,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> Result:
        """One API call. `index`/`wait` make it a blocking query; `retries` overrides settings.retries;
        `timeout` caps the connect and read timeouts (a wait with a deadline must not outlive it)."""
        s = self.settings
        query: dict[str, Any] = {}
        if s.namespace:
            query["namespace"] = s.namespace
        if s.region:
            query["region"] = s.region
        query.update({k: v for k, v in (params or {}).items() if v is not None})
        read_timeout = s.read_timeout
        if index is not None and index > 0:
            wait = min(MAX_WAIT, max(1.0, wait if wait is not None else 300.0))
            query["index"] = index
            query["wait"] = f"{int(wait * 1000)}ms"
            # the server may hold the request for wait + wait/16 jitter
            read_timeout += wait + wait / JITTER_FRACTION
        connect_timeout = s.connect_timeout
        if timeout is not None:
            read_timeout = min(read_timeout, max(0.5, timeout))
            connect_timeout = min(connect_timeout, max(0.5, timeout))
        url = s.addr + path
        attempts = 1 + max(0, s.retries if retries is None else retries)
        delay = 0.5
        for attempt in range(1, attempts + 1):
            self.requests_made += 1
            if self._on_request:
                self._on_request(method, path)
            try:
                resp = self.session.request(
                    method,
                    url,
                    params=query,
                    json=json,
                    timeout=(connect_timeout, read_timeout),
                    verify=self.verify,
                    cert=self.cert,
                )
            except requests.exceptions.SSLError as exc:  # a subclass of ConnectionError: never retried
                raise NomadTLSError(
                    f"TLS to {s.addr} failed: {root_cause(exc)}",
                    hint="set NOMAD_CACERT (or nomad.cacert) to the CA that signed the Nomad server's "
                    "certificate; verification is never switched off",
                ) from exc
            except requests.exceptions.ConnectionError as exc:
                if attempt < attempts:
                    self._sleep(delay)
                    delay = min(delay * 2, 8.0)
                    continue
                raise NomadUnreachable(
                    f"cannot reach Nomad at {s.addr} ({s.source}): {root_cause(exc)}",
                    hint="is the VM running and Nomad started? `inv vm.status`, `inv vm.logs`; "
                    "for another cluster set NOMAD_ADDR",
                ) from exc
            except requests.exceptions.Timeout as exc:
                raise NomadUnreachable(
                    f"Nomad at {s.addr} did not answer {method} {path} within {read_timeout:.0f}s",
                    hint="raise nomad.read_timeout, or check the server's load",
                ) from exc
            return self._decode(method, path, resp)
        raise AssertionError("unreachable")  # pragma: no cover

    def _decode(self, method: str, path: str, resp: requests.Response) -> Result:
        if resp.status_code >= 400:
            body = resp.text
            hint = _hint_for(resp.status_code, body, self.settings)
            cls = {404: NomadNotFound, 409: NomadConflict}.get(resp.status_code, NomadAPIError)
            err = cls(resp.status_code, method, path, body, hint=hint)
            raise err
        try:
            index = int(resp.headers.get("X-Nomad-Index", "0") or 0)
        except ValueError:
            index = 0
        leader_header = resp.headers.get("X-Nomad-KnownLeader")
        known_leader = None if leader_header is None else leader_header.lower() == "true"
        if not resp.content:
            return Result(None, index, known_leader)
        try:
            body = resp.json()
        except ValueError as exc:
            raise NomadError(
                f"Nomad API {method} {path}: expected JSON, got {resp.headers.get('Content-Type', '?')}: "
                f"{resp.text[:200]!r}",
                hint=f"is {self.settings.addr} really a Nomad HTTP API?",
            ) from exc
        return Result(body, index, known_leader)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).body

    # ------------------------------------------------------------------------------------- status, nodes --
    def leader(self, **kw: Any) -> str:
        """GET /v1/status/leader: "ip:port" of the leader, "" while there is none."""
        return str(self.get("/v1/status/leader", **kw) or "")

    def agent_self(self, **kw: Any) -> dict[str, Any]:
        return dict(self.get("/v1/agent/self", **kw) or {})

    def agent_health(self) -> dict[str, Any]:
        """GET /v1/agent/health; a 500 carries the same JSON shape with ok=false."""
        try:
            return dict(self.get("/v1/agent/health", retries=0) or {})
        except NomadAPIError as exc:
            import json as _json

            try:
                return dict(_json.loads(exc.body))
            except ValueError:
                raise exc from None

    def nodes(self, *, index: int | None = None, wait: float | None = None, **kw: Any) -> Result:
        return self.request("GET", "/v1/nodes", index=index, wait=wait, **kw)

    def node(self, node_id: str, *, index: int | None = None, wait: float | None = None) -> Result:
        return self.request("GET", f"/v1/node/{_q(node_id)}", index=index, wait=wait)

    # ---------------------------------------------------------------------------------------------- jobs --
    def parse_job(self, hcl: str, variables: str = "") -> dict[str, Any]:
        """POST /v1/jobs/parse: the job's JSON (the bare Job object, not wrapped)."""
        body = {"JobHCL": hcl, "Variables": variables, "Canonicalize": True}
        return dict(self.request("POST", "/v1/jobs/parse", json=body).body)

    def plan_job(self, job: Mapping[str, Any]) -> dict[str, Any]:
        body = {"Job": job, "Diff": True, "PolicyOverride": False}
        return dict(self.request("POST", f"/v1/job/{_q(job['ID'])}/plan", json=body).body)

    def register_job(self, job: Mapping[str, Any], *, modify_index: int | None = None) -> dict[str, Any]:
        """POST /v1/jobs; with `modify_index`, check-and-set against the plan's JobModifyIndex."""
        body: dict[str, Any] = {"Job": job}
        if modify_index is not None:
            body.update(EnforceIndex=True, JobModifyIndex=modify_index)
        return dict(self.request("POST", "/v1/jobs", json=body).body)

    def job(self, job_id: str) -> dict[str, Any] | None:
        try:
            return dict(self.get(f"/v1/job/{_q(job_id)}"))
        except NomadNotFound:
            return None

    def jobs(self, prefix: str = "") -> list[dict[str, Any]]:
        return list(self.get("/v1/jobs", params={"prefix": prefix or None}) or [])

    def job_allocations(
        self, job_id: str, *, index: int | None = None, wait: float | None = None, all_: bool = False
    ) -> Result:
        params = {"all": "true"} if all_ else None
        return self.request("GET", f"/v1/job/{_q(job_id)}/allocations", params=params, index=index, wait=wait)

    def job_evaluations(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/v1/job/{_q(job_id)}/evaluations") or [])

    def job_deployment(self, job_id: str, *, index: int | None = None, wait: float | None = None) -> Result:
        """GET /v1/job/:id/deployment: the latest deployment, body None when there is none."""
        return self.request("GET", f"/v1/job/{_q(job_id)}/deployment", index=index, wait=wait)

    def deployment(self, dep_id: str, *, index: int | None = None, wait: float | None = None) -> Result:
        return self.request("GET", f"/v1/deployment/{_q(dep_id)}", index=index, wait=wait)

    def promote_deployment(self, dep_id: str) -> dict[str, Any]:
        body = {"DeploymentID": dep_id, "All": True}
        return dict(self.request("POST", f"/v1/deployment/promote/{_q(dep_id)}", json=body).body)

    def evaluation(self, eval_id: str, *, index: int | None = None, wait: float | None = None) -> Result:
        return self.request("GET", f"/v1/evaluation/{_q(eval_id)}", index=index, wait=wait)

    def allocation(self, alloc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/allocation/{_q(alloc_id)}"))

    def stop_job(self, job_id: str, *, purge: bool = True) -> dict[str, Any]:
        params = {"purge": "true"} if purge else None
        return dict(self.request("DELETE", f"/v1/job/{_q(job_id)}", params=params).body or {})

    # ----------------------------------------------------------------------------------------- variables --
    def var_get(self, path: str) -> dict[str, Any] | None:
        """GET /v1/var/:path (with Items), None when it does not exist."""
        try:
            return dict(self.get(f"/v1/var/{_q(path, safe='/')}"))
        except NomadNotFound:
            return None

    def var_put(self, path: str, items: Mapping[str, str], *, cas: int | None = None) -> dict[str, Any]:
        """PUT /v1/var/:path; `cas=0` creates only, `cas=N` updates only ModifyIndex N (409 otherwise)."""
        body: dict[str, Any] = {"Path": path, "Items": dict(items)}
        if self.settings.namespace:
            body["Namespace"] = self.settings.namespace
        params = {"cas": cas} if cas is not None else None
        return dict(self.request("PUT", f"/v1/var/{_q(path, safe='/')}", params=params, json=body).body)


def _q(value: str, safe: str = "") -> str:
    return quote(value, safe=safe)

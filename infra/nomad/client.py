"""A thin client for Nomad's HTTP API (https://developer.hashicorp.com/nomad/api-docs), on requests.

Settings come from `cfg.nomad` and fall back to the environment variables the `nomad` CLI reads
(NOMAD_ADDR, NOMAD_TOKEN, NOMAD_CACERT, NOMAD_CLIENT_CERT, NOMAD_CLIENT_KEY, NOMAD_NAMESPACE,
NOMAD_REGION): configuration overrides the environment; without either, the VM's forwarded port is used.

- TLS is always verified: against NOMAD_CACERT when given, else the system CA bundle. There is no switch
  to turn verification off.
- Every request has a deadline for the WHOLE call (connect, headers and body: a server that dribbles one
  byte a second cannot outlive it). Failures to connect (refused, DNS, connect timeout) are retried with
  exponential backoff — for every method, since nothing was sent. Any later failure ("Connection aborted",
  reset, read timeout) is retried only for GET: a write may have reached Nomad, so it raises
  NomadAnswerLost and the caller re-reads (e.g. the job's JobModifyIndex). HTTP errors are never retried
  (a 500 "No cluster leader" is a state to wait on, which is the caller's business).
- Redirects are not followed: requests would resend X-Nomad-Token to whatever host a `Location` names.
  The token must be one printable line; it is never part of a message. Sent over plain http to a host other
  than loopback, it draws a warning.
- Waits use blocking queries: `get(path, index=..., wait=...)` passes `?index=N&wait=Ns`. Nomad caps the
  wait at 300 s and adds up to wait/16 of jitter (nomad/structs/structs.go MaxBlockingRPCQueryTime and
  JitterFraction, nomad/rpc.go blockingRPC); the wait asked for is shortened so that wait + jitter fits
  the call's deadline. `Result.index` carries X-Nomad-Index for the next call. A return does not
  guarantee a change (the docs say so); callers re-check state.
- Nomad's error bodies (plain text, e.g. "No cluster leader", "Permission denied") are surfaced in
  NomadAPIError, made printable (no control characters or escape sequences), with a hint for the usual
  causes; `permanent` says whether waiting can heal it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import requests
import urllib3

from infra.core import ui
from infra.core.config import Config
from infra.core.errors import NomadError, causes, printable, root_cause

#: Nomad caps a blocking query at 300 s (nomad/structs/structs.go MaxBlockingRPCQueryTime) and adds up to
#: wait/16 of jitter (structs.JitterFraction, applied in nomad/rpc.go blockingRPC).
MAX_WAIT = 300.0
JITTER_FRACTION = 16
#: Largest answer read into memory (a job list of a big cluster is a few MB).
MAX_BODY = 64 * 1024 * 1024
#: Methods that may be retried after the request may have been sent.
IDEMPOTENT = ("GET", "HEAD")

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

    #: True when the connection was never made, so the request was certainly not sent.
    retryable = False


class NomadTLSError(NomadUnreachable):
    """The TLS handshake failed (unknown CA, wrong host name, client certificate refused)."""


class NomadAnswerLost(NomadUnreachable):
    """A request was sent (or may have been) but its answer never came: Nomad may have applied it."""

    #: True when the call ran out of time (not retried: a slow server stays slow).
    timed_out = False


class NomadAPIError(NomadError):
    """Nomad answered with an HTTP error status; `body` is Nomad's own error text."""

    def __init__(self, status: int, method: str, path: str, body: str, *, hint: str | None = None) -> None:
        self.status = status
        self.method = method
        self.path = path
        self.raw_body = body
        self.body = printable(body.strip(), limit=2000)
        super().__init__(
            f"Nomad API {method} {path}: HTTP {status}: {self.body or '(empty body)'}", hint=hint
        )

    @property
    def no_leader(self) -> bool:
        return self.status == 500 and "no cluster leader" in self.body.lower()

    @property
    def permanent(self) -> bool:
        """Waiting will not heal it: a refused token, a bad request, a region or namespace that does not
        exist (nomad/structs/errors.go ErrNoRegionPath; nomad/job_endpoint_validators.go)."""
        low = self.body.lower()
        return (
            self.status in (400, 401, 403, 404, 405)
            or "no path to region" in low
            or "nonexistent namespace" in low
        )


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

    @property
    def loopback(self) -> bool:
        host = urlsplit(self.addr).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def check_token(token: str) -> None:
    """A token is one line of printable ASCII (Nomad's are UUIDs). The message never contains it."""
    if token and not (
        token.isascii() and token.isprintable() and token.strip() == token and " " not in token
    ):
        what = "a newline" if "\n" in token or "\r" in token else "whitespace or a control character"
        raise NomadError(
            f"NOMAD_TOKEN (or nomad.token) contains {what}; an ACL token is one line without spaces "
            f"({len(token)} characters given, not shown)",
            hint="set it without the trailing newline, e.g. NOMAD_TOKEN=$(cat token-file) or "
            "read -r NOMAD_TOKEN < token-file",
        )


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
    check_token(values["token"])
    try:
        urlsplit(addr).port  # noqa: B018 - raises on a port out of range or a malformed [host]
        if not urlsplit(addr).hostname:
            raise ValueError("no host")
    except ValueError as exc:
        raise NomadError(
            f"Nomad address {printable(addr)!r} ({source}) is not a valid URL: {exc}",
            hint="NOMAD_ADDR looks like http://127.0.0.1:4646 (a port between 1 and 65535)",
        ) from None
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


#: The ACL capability each endpoint needs (command/agent/agent_endpoint.go, nomad/node_endpoint.go,
#: nomad/job_endpoint.go, nomad/deployment_endpoint.go, nomad/variables_endpoint.go, client/fs_endpoint.go).
_CAPABILITIES = [
    ("GET", r"/v1/agent/self", "agent:read"),
    ("GET", r"/v1/nodes?(/.*)?", "node:read"),
    ("POST", r"/v1/jobs/parse", "namespace capability parse-job (or submit-job)"),
    ("GET", r"/v1/client/fs/logs/.*", "namespace capability read-logs"),
    ("GET", r"/v1/var/.*", "variables read on the path"),
    ("PUT", r"/v1/var/.*", "variables write on the path"),
    ("GET", r"/v1/jobs", "namespace capability list-jobs"),
    ("GET", r"/v1/(job|deployment|evaluation|allocation)/.*", "namespace capability read-job"),
    ("*", r"/v1/(jobs|job/.*|deployment/promote/.*)", "namespace capability submit-job"),
]


def _hint_for(status: int, body: str, s: Settings, method: str = "", path: str = "") -> str | None:
    low = body.lower()
    if status == 403:
        token = "a token is set" if s.token else "no token is set"
        needs = next(
            (cap for m, rx, cap in _CAPABILITIES if m in (method, "*") and re.fullmatch(rx, path)), ""
        )
        return (
            f"Nomad refused the request ({token}"
            + (f"; {method} {path} needs {needs}" if needs else "")
            + "): set NOMAD_TOKEN (or nomad.token) to an ACL token allowed to do this; "
            "`nomad acl token self` shows what a token may do"
        )
    if "no path to region" in low:
        return (
            f"Nomad knows no servers for region {s.region or '(the agent default)'!r}: check NOMAD_REGION "
            "(or nomad.region); `nomad server members` lists the regions"
        )
    if "nonexistent namespace" in low:
        return (
            f"namespace {s.namespace or 'default'!r} does not exist: check NOMAD_NAMESPACE (or "
            "nomad.namespace), or create it with `nomad namespace apply`"
        )
    if "keyring has not been initialized" in low:
        return "Nomad has just started and its keyring is not ready yet: wait a few seconds and retry"
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
        check_token(s.token)
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
            if not s.tls and not s.loopback:
                ui.warn(
                    f"NOMAD_TOKEN goes to {s.addr} over plain http (readable on the network); "
                    "use https:// with NOMAD_CACERT for a remote cluster"
                )
        if urlsplit(s.addr).username is not None and not s.tls and not s.loopback:
            # requests sends a URL's userinfo as HTTP Basic auth (requests/models.py, prepare_auth)
            ui.warn(
                f"the user name and password in {s.addr} go to Nomad as HTTP Basic auth over plain http "
                "(readable on the network); use https:// with NOMAD_CACERT for a remote cluster"
            )
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
        body: Any = None,
        index: int | None = None,
        wait: float | None = None,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> Result:
        """One API call. `index`/`wait` make it a blocking query; `retries` overrides settings.retries;
        `timeout` bounds the whole call (connect, headers, body) — a wait with a deadline must not outlive
        it, so a blocking wait is shortened to leave room for Nomad's jitter (wait/16)."""
        s = self.settings
        query = self._query(params)
        limit = s.connect_timeout + s.read_timeout
        if index is not None and index > 0:
            wait = min(MAX_WAIT, max(0.1, wait if wait is not None else MAX_WAIT))
            if timeout is not None:  # wait + jitter + a moment for the answer must fit the deadline
                wait = max(0.05, min(wait, (timeout - 0.25) * JITTER_FRACTION / (JITTER_FRACTION + 1)))
            query["index"] = index
            query["wait"] = f"{int(wait * 1000)}ms"
            limit += wait + wait / JITTER_FRACTION
        if timeout is not None:
            limit = min(limit, max(0.5, timeout))
        attempts = 1 + max(0, s.retries if retries is None else retries)
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                deadline = time.monotonic() + limit  # for the whole call: headers and body
                resp = self._send(method, path, query, body, limit)
                try:
                    content = self._read(resp, deadline, method, path, limit)
                finally:
                    resp.close()
            except NomadAnswerLost as exc:  # a dropped connection: only a read may be sent again
                if method in IDEMPOTENT and not exc.timed_out and attempt < attempts:
                    self._sleep(delay)
                    delay = min(delay * 2, 8.0)
                    continue
                raise
            except NomadUnreachable as exc:  # nothing was sent: safe to retry, whatever the method
                if attempt < attempts and not isinstance(exc, NomadTLSError) and exc.retryable:
                    self._sleep(delay)
                    delay = min(delay * 2, 8.0)
                    continue
                raise
            return self._decode(method, path, resp, content)
        raise AssertionError("unreachable")  # pragma: no cover

    def _query(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        query: dict[str, Any] = {}
        if self.settings.namespace:
            query["namespace"] = self.settings.namespace
        if self.settings.region:
            query["region"] = self.settings.region
        query.update({k: v for k, v in (params or {}).items() if v is not None})
        return query

    def _send(
        self, method: str, path: str, query: Mapping[str, Any], body: Any, limit: float
    ) -> requests.Response:
        """Send one request and return once the headers are in (the body is read by _read)."""
        s = self.settings
        self.requests_made += 1
        if self._on_request:
            self._on_request(method, path)
        started = time.monotonic()
        try:
            resp = self.session.request(
                method,
                s.addr + path,
                params=query,
                json=body,
                timeout=(min(s.connect_timeout, limit), limit),
                verify=self.verify,
                cert=self.cert,
                allow_redirects=False,  # never resend X-Nomad-Token to a host a Location header names
                stream=True,
            )
        except requests.exceptions.SSLError as exc:  # a subclass of ConnectionError: never retried
            raise NomadTLSError(
                f"TLS to {s.addr} failed: {printable(root_cause(exc))}",
                hint="set NOMAD_CACERT (or nomad.cacert) to the CA that signed the Nomad server's "
                "certificate; verification is never switched off",
            ) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            if _connect_failed(exc):
                err = NomadUnreachable(
                    f"cannot reach Nomad at {s.addr} ({s.source}): {printable(root_cause(exc))}",
                    hint="is the VM running and Nomad started? `inv vm.status`, `inv vm.logs`; "
                    "for another cluster set NOMAD_ADDR",
                )
                err.retryable = True
                raise err from exc
            if isinstance(exc, requests.exceptions.Timeout):
                lost = NomadAnswerLost(
                    f"Nomad at {s.addr} did not answer {method} {path} within "
                    f"{seconds(time.monotonic() - started)}",
                    hint="raise nomad.read_timeout, or check the server's load",
                )
                lost.timed_out = True
                raise lost from exc
            raise NomadAnswerLost(
                f"Nomad at {s.addr} dropped {method} {path} before answering: {printable(root_cause(exc))}",
                hint="the request may have reached Nomad; look at the server's log",
            ) from exc
        except requests.exceptions.RequestException as exc:  # InvalidURL, InvalidHeader, ...
            raise NomadError(
                f"cannot send {method} {path} to {s.addr}: {printable(root_cause(exc))}"
            ) from exc
        if 300 <= resp.status_code < 400:
            location = printable(resp.headers.get("Location", "?"), limit=200)
            resp.close()
            raise NomadError(
                f"Nomad at {s.addr} answered {method} {path} with HTTP {resp.status_code}, a redirect to "
                f"{location}; redirects are not followed (they would carry NOMAD_TOKEN along)",
                hint="set NOMAD_ADDR to the address the Nomad API is really served at",
            )
        return resp

    def _read(self, resp: requests.Response, deadline: float, method: str, path: str, limit: float) -> bytes:
        """The body, with the call's deadline checked after every read: each read returns as soon as some
        bytes arrive (read1), so a server dribbling bytes cannot stretch the call past its deadline."""
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                if time.monotonic() > deadline:
                    lost = NomadAnswerLost(
                        f"Nomad at {self.settings.addr} did not finish answering {method} {path} within "
                        f"{seconds(limit)} ({size} bytes received)",
                        hint="raise nomad.read_timeout, or check the server's load",
                    )
                    lost.timed_out = True
                    raise lost
                chunk = resp.raw.read1(65536, decode_content=True)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY:
                    raise NomadError(
                        f"Nomad API {method} {path}: answer larger than {MAX_BODY // 2**20} MiB",
                        hint=f"is {self.settings.addr} really a Nomad HTTP API?",
                    )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            lost = NomadAnswerLost(
                f"Nomad at {self.settings.addr} broke off its answer to {method} {path}: "
                f"{printable(root_cause(exc))}",
                hint="the request may have reached Nomad; look at the server's log",
            )
            lost.timed_out = isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError)
            raise lost from exc

    def _decode(self, method: str, path: str, resp: requests.Response, content: bytes) -> Result:
        text = content.decode("utf-8", errors="replace")
        if resp.status_code >= 400:
            hint = _hint_for(resp.status_code, text, self.settings, method, path)
            cls = {404: NomadNotFound, 409: NomadConflict}.get(resp.status_code, NomadAPIError)
            raise cls(resp.status_code, method, path, text, hint=hint)
        try:
            index = int(resp.headers.get("X-Nomad-Index", "0") or 0)
        except ValueError:
            index = 0
        leader_header = resp.headers.get("X-Nomad-KnownLeader")
        known_leader = None if leader_header is None else leader_header.lower() == "true"
        if not content:
            return Result(None, index, known_leader)
        try:
            body = json.loads(text)
        except ValueError:
            raise NomadError(
                f"Nomad API {method} {path}: expected JSON, got "
                f"{printable(resp.headers.get('Content-Type', '?'), limit=60)}: {printable(text, limit=200)!r}",
                hint=f"is {self.settings.addr} really a Nomad HTTP API?",
            ) from None
        return Result(body, index, known_leader)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).body

    # ------------------------------------------------------------------------------------- status, nodes --
    def leader(self, **kw: Any) -> str:
        """GET /v1/status/leader: "ip:port" of the leader, "" while there is none."""
        return str(self.get("/v1/status/leader", **kw) or "")

    def peers(self, **kw: Any) -> list[str]:
        """GET /v1/status/peers: the Raft configuration's server addresses ("ip:port"), as the leader sees
        them (command/agent/status_endpoint.go StatusPeersRequest -> nomad/status_endpoint.go Status.Peers:
        raft.GetConfiguration().Servers; no ACL check: "intentionally throwing away any auth error")."""
        return [str(p) for p in self.get("/v1/status/peers", **kw) or []]

    def agent_self(self, **kw: Any) -> dict[str, Any]:
        return dict(self.get("/v1/agent/self", **kw) or {})

    def agent_health(self) -> dict[str, Any]:
        """GET /v1/agent/health; a 500 carries the same JSON shape with ok=false."""
        try:
            return dict(self.get("/v1/agent/health", retries=0) or {})
        except NomadAPIError as exc:
            try:
                return dict(json.loads(exc.body))
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
        return dict(self.request("POST", "/v1/jobs/parse", body=body).body)

    def plan_job(self, job: Mapping[str, Any]) -> dict[str, Any]:
        body = {"Job": job, "Diff": True, "PolicyOverride": False}
        return dict(self.request("POST", f"/v1/job/{_q(job['ID'])}/plan", body=body).body)

    def register_job(self, job: Mapping[str, Any], *, modify_index: int | None = None) -> dict[str, Any]:
        """POST /v1/jobs; with `modify_index`, check-and-set against the plan's JobModifyIndex."""
        body: dict[str, Any] = {"Job": job}
        if modify_index is not None:
            body.update(EnforceIndex=True, JobModifyIndex=modify_index)
        return dict(self.request("POST", "/v1/jobs", body=body).body)

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

    def job_deployments(self, job_id: str) -> list[dict[str, Any]]:
        """GET /v1/job/:id/deployments: the deployments of the job as registered now, in no order
        (nomad/state/state_store.go DeploymentsByJobID iterates the `job` index): sort by CreateIndex."""
        return [d for d in self.get(f"/v1/job/{_q(job_id)}/deployments") or [] if isinstance(d, dict)]

    def deployment(self, dep_id: str, *, index: int | None = None, wait: float | None = None) -> Result:
        return self.request("GET", f"/v1/deployment/{_q(dep_id)}", index=index, wait=wait)

    def promote_deployment(self, dep_id: str, groups: list[str]) -> dict[str, Any]:
        """Promote the named groups' canaries. Not `All: true`: that checks every group's canaries, those of
        auto-promote groups too, and fails while any is unhealthy (nomad/state/state_store.go
        UpdateDeploymentPromotion)."""
        body = {"DeploymentID": dep_id, "Groups": list(groups)}
        return dict(self.request("POST", f"/v1/deployment/promote/{_q(dep_id)}", body=body).body)

    def evaluation(self, eval_id: str, *, index: int | None = None, wait: float | None = None) -> Result:
        return self.request("GET", f"/v1/evaluation/{_q(eval_id)}", index=index, wait=wait)

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
        return dict(self.request("PUT", f"/v1/var/{_q(path, safe='/')}", params=params, body=body).body)

    # ---------------------------------------------------------------------------------------------- logs --
    def logs(
        self, alloc_id: str, task: str, *, stderr: bool = False, follow: bool = False
    ) -> Iterator[bytes]:
        """GET /v1/client/fs/logs/:alloc: a task's stdout/stderr from the start. The body is a stream of
        JSON frames {File, Offset, Data (base64)}, `{}` being a heartbeat (client/fs_endpoint.go,
        client/lib/streamframer/framer.go); with `follow` it never ends, so reads are bounded by the read
        timeout only (Nomad sends a heartbeat every second)."""
        query = self._query(
            {
                "task": task,
                "type": "stderr" if stderr else "stdout",
                "origin": "start",
                "offset": 0,
                "follow": "true" if follow else "false",
                "plain": "false",
            }
        )
        path = f"/v1/client/fs/logs/{_q(alloc_id)}"
        resp = self._send("GET", path, query, None, self.settings.read_timeout)
        try:
            if resp.status_code >= 400:
                content = self._read(
                    resp,
                    time.monotonic() + self.settings.read_timeout,
                    "GET",
                    path,
                    self.settings.read_timeout,
                )
                self._decode("GET", path, resp, content)  # raises with Nomad's error text
            decoder = json.JSONDecoder()
            buf = ""
            while True:
                try:
                    chunk = resp.raw.read1(65536, decode_content=True)
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    raise NomadAnswerLost(
                        f"the log stream from {self.settings.addr} broke off: {printable(root_cause(exc))}"
                    ) from exc
                if not chunk:
                    if (
                        buf.strip()
                    ):  # an error after the first frame comes as text (command/agent/http.go wrap)
                        raise NomadError(
                            f"Nomad API GET {path}: the log stream ended with: {printable(buf.strip(), limit=300)}"
                        )
                    return
                buf += chunk.decode("utf-8", errors="replace")
                while True:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    try:
                        frame, end = decoder.raw_decode(buf)
                    except ValueError:
                        if len(buf) > MAX_BODY:
                            raise NomadError(f"Nomad API GET {path}: not a stream of log frames") from None
                        break  # an incomplete frame: read more
                    buf = buf[end:]
                    if not isinstance(frame, dict):
                        raise NomadError(
                            f"Nomad API GET {path}: not a log frame: {printable(str(frame), limit=80)}"
                        )
                    if frame.get("Data"):
                        yield base64.b64decode(frame["Data"])
        finally:
            resp.close()


def seconds(value: float) -> str:
    """'3s', '0.5s': whole seconds as such, a fraction kept (a 0.5 s limit is not "within 0s")."""
    return f"{round(value, 1):g}s" if value < 10 else f"{value:.0f}s"


def _connect_failed(exc: BaseException) -> bool:
    """Did the connection fail before anything was sent? (refused, DNS, connect timeout)"""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    return any(
        isinstance(e, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError)
        for e in causes(exc)
    )


def _q(value: str, safe: str = "") -> str:
    return quote(value, safe=safe)

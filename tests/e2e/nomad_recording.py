"""Recording real Nomad API traffic (the e2e), with secrets redacted, and turning it into replay data.

- `RecordingProxy` listens on 127.0.0.1 and relays every request to the real Nomad API unchanged (blocking
  queries, streams and errors included); `Recorder` appends one JSON line per `/v1/` exchange to a file:
  method, path, query, status, request and response body, the X-Nomad-* response headers, timing, and
  the e2e step ("scenario") it belongs to. The e2e points every `inv` it runs, and its own checks, at the
  proxy, so the recording holds what the real CLI sent and what Nomad answered.
- `redact` removes secrets before anything is written: the X-Nomad-Token header, the values of Nomad
  Variables (`Items`), every value under a secret-looking key (`*password`, `*token`, `SecretID`, ...),
  passwords in URLs (`postgresql://user:PASSWORD@host`), JSON Web Tokens (workload identities), and any
  secret seen once wherever it turns up later (a password echoed in a log line).
- `to_replay` turns a recording into the replay fixture format of tests/fixtures/nomad-replay.json
  (`{"scenarios": {name: [{"request": {method, path, query}, "responses": [...]}]}}`);
  `scripts/recording-to-replay` is its command line.

Nothing here knows the project's client: the proxy relays bytes, so it records any client's traffic.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests

from infra.core.errors import REDACTED, redact_urls, url_secrets

#: Request headers worth keeping in a recording (the token only as REDACTED: it shows one was sent).
RECORDED_REQUEST_HEADERS = ("X-Nomad-Token", "Content-Type")
#: Response headers worth keeping: blocking-query index and leader state (what the replay server serves).
RECORDED_RESPONSE_HEADERS = ("X-Nomad-Index", "X-Nomad-KnownLeader", "X-Nomad-LastContact", "Content-Type")
REPLAY_HEADERS = ("X-Nomad-Index", "X-Nomad-KnownLeader", "X-Nomad-LastContact")
#: Query parameters that differ on every run (blocking queries); the replay server checks them itself.
VOLATILE_QUERY = frozenset({"index", "wait"})
#: A recorded text body (logs, HTML) is cut here; JSON bodies are kept whole.
TEXT_LIMIT = 256 * 1024
#: Secrets shorter than this are not scrubbed from other strings (too likely to be a common word).
MIN_LEARNED = 8

_SECRET_KEY = re.compile(
    r"(pass(word|wd|phrase)?|secret(_?id)?|token|private_?key|api_?key|credential)s?$", re.IGNORECASE
)
_JWT = re.compile(r"^eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
#: Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
    }
)


# ================================================================================================ redaction ==
def redact(value: Any, learned: set[str]) -> Any:
    """`value` with secrets replaced by REDACTED; each secret removed is added to `learned`."""
    return _scrub(_redact(value, learned, secret=False), learned)


def _redact(value: Any, learned: set[str], *, secret: bool) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            # Nomad Variables: every value of Items is secret (nomad/structs/variables.go, VariableItems).
            hidden = (
                secret or bool(_SECRET_KEY.search(str(key))) or (key == "Items" and isinstance(item, dict))
            )
            out[key] = _redact(item, learned, secret=hidden)
        return out
    if isinstance(value, list):
        return [_redact(item, learned, secret=secret) for item in value]
    if not isinstance(value, str) or not value:
        return value
    if secret or _JWT.fullmatch(value):
        _learn(value, learned)
        return REDACTED
    for password in url_secrets(value):
        _learn(password, learned)
    return redact_urls(value)


def _learn(secret: str, learned: set[str]) -> None:
    if len(secret) >= MIN_LEARNED:
        learned.add(secret)


def _scrub(value: Any, learned: set[str]) -> Any:
    """Every learned secret, wherever it occurs in a string (keys included), becomes REDACTED."""
    if not learned:
        return value
    if isinstance(value, dict):
        return {_scrub(k, learned): _scrub(v, learned) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(item, learned) for item in value]
    if isinstance(value, str):
        for secret in sorted(learned, key=len, reverse=True):
            value = value.replace(secret, REDACTED)
    return value


# ================================================================================================ recording ==
def _decode(data: bytes, content_type: str) -> tuple[str, Any]:
    """("body", JSON value) when the bytes are JSON, else ("text", str), else ("", None) when empty."""
    if not data:
        return "", None
    text = data.decode("utf-8", errors="replace")
    if "json" in content_type.lower() or text.lstrip()[:1] in ("{", "["):
        try:
            return "body", json.loads(text)
        except ValueError:
            pass
    if len(text) > TEXT_LIMIT:
        text = text[:TEXT_LIMIT] + f"... ({len(text) - TEXT_LIMIT} more characters not recorded)"
    return "text", text


def _pick(headers: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    lower = {k.lower(): v for k, v in headers.items()}
    return {name: lower[name.lower()] for name in names if name.lower() in lower}


def build_exchange(
    *,
    scenario: str,
    method: str,
    target: str,
    request_headers: Mapping[str, str],
    request_body: bytes,
    status: int | None,
    response_headers: Mapping[str, str],
    response_body: bytes,
    seconds: float,
    error: str = "",
    learned: set[str],
    started: datetime | None = None,
) -> dict[str, Any]:
    """One recorded exchange, redacted (see `redact`); `learned` carries secrets across exchanges."""
    parts = urlsplit(target)
    exchange: dict[str, Any] = {
        "scenario": scenario,
        "started": (started or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        "seconds": round(seconds, 3),
        "method": method,
        "path": parts.path,
        "query": dict(parse_qsl(parts.query, keep_blank_values=True)),
        "request_headers": _pick(request_headers, RECORDED_REQUEST_HEADERS),
    }
    kind, value = _decode(request_body, request_headers.get("Content-Type", ""))
    if kind:
        exchange[f"request_{kind}"] = value
    exchange["status"] = status
    exchange["response_headers"] = _pick(response_headers, RECORDED_RESPONSE_HEADERS)
    kind, value = _decode(response_body, _pick(response_headers, ["Content-Type"]).get("Content-Type", ""))
    if kind:
        exchange[f"response_{kind}"] = value
    if error:
        exchange["error"] = error
    # Learn from the whole exchange first, so a secret sent in the request is scrubbed from the answer.
    redacted: dict[str, Any] = redact(exchange, learned)
    return redacted


class Recorder:
    """Appends redacted exchanges as JSON lines to `path` (truncated at start); thread-safe."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.scenario = ""
        self.count = 0
        self._learned: set[str] = set()
        self._lock = threading.Lock()
        self._file = path.open("w", encoding="utf-8")

    def record(self, **fields: Any) -> dict[str, Any] | None:
        """Write one exchange (None once closed: a blocking query still held when the run ends)."""
        with self._lock:
            if self._file.closed:
                return None
            exchange = build_exchange(scenario=self.scenario, learned=self._learned, **fields)
            exchange = {"seq": self.count + 1, **exchange}
            self._file.write(json.dumps(exchange, sort_keys=False) + "\n")
            self._file.flush()
            self.count += 1
            return exchange

    def close(self) -> None:
        with self._lock:
            self._file.close()


# ==================================================================================================== proxy ==
class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: RecordingProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback; a client that hung up mid-answer is no news here.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _ProxyServer
    protocol_version = "HTTP/1.1"

    def _relay(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Accept-Encoding"] = "identity"  # record the bytes Nomad sent, not a re-encoding
        record = self.path.startswith("/v1/")
        started, clock = datetime.now(UTC), time.monotonic()
        fields: dict[str, Any] = {
            "method": self.command,
            "target": self.path,
            "request_headers": dict(self.headers.items()),
            "request_body": body,
            "started": started,
        }
        try:
            upstream = proxy.session().request(
                self.command,
                proxy.upstream + self.path,
                data=body or None,
                headers=headers,
                stream=True,
                timeout=(proxy.connect_timeout, None),  # a blocking query may take minutes
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            # No answer upstream: close without one, so the client sees a dropped connection (as it would
            # see a refused one without the proxy), never an HTTP error Nomad did not send.
            self.close_connection = True
            if record:
                proxy.recorder.record(
                    **fields, status=None, response_headers={}, response_body=b"", seconds=0.0,
                    error=f"no answer from {proxy.upstream}: {type(exc).__name__}",
                )  # fmt: skip
            return
        received = bytearray()
        error = ""
        with upstream:
            try:
                self.send_response(upstream.status_code, upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _HOP:
                        self.send_header(name, value)
                bodiless = self.command == "HEAD" or upstream.status_code in (204, 304)
                if bodiless or "Content-Length" in upstream.headers:
                    data = b"" if bodiless else upstream.content
                    received += data
                    if not bodiless or "Content-Length" in upstream.headers:
                        self.send_header(
                            "Content-Length", upstream.headers.get("Content-Length", str(len(data)))
                        )
                    self.end_headers()
                    self.wfile.write(data)
                else:  # a stream (logs with follow, event stream): pass each piece on as it arrives
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for chunk in upstream.iter_content(chunk_size=None):
                        if len(received) < TEXT_LIMIT * 4:
                            received += chunk
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (ConnectionError, requests.RequestException) as exc:
                self.close_connection = True
                error = f"relay interrupted: {type(exc).__name__}"
        if record:
            proxy.recorder.record(
                **fields, status=upstream.status_code, response_headers=dict(upstream.headers),
                response_body=bytes(received), seconds=time.monotonic() - clock, error=error,
            )  # fmt: skip

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _relay

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the recording is the log


class RecordingProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` (a Nomad API address) that records via `recorder`.

    TLS to the upstream is verified (`verify`: a CA file or True, never False); the client side is plain
    HTTP on the loopback interface only."""

    def __init__(
        self,
        upstream: str,
        recorder: Recorder,
        *,
        verify: str | bool = True,
        cert: tuple[str, str] | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.recorder = recorder
        self.verify = verify
        self.cert = cert
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._server = _ProxyServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def session(self) -> requests.Session:
        """One session per handler thread (requests' Session is not meant to be shared across threads)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxy or CA bundle from the environment: verify is explicit
            session.verify = self.verify
            session.cert = self.cert
            self._local.session = session
            self._sessions.append(session)
        return session

    def start(self) -> RecordingProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="nomad-recording-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()
        for session in self._sessions:
            session.close()
        self.recorder.close()


# ============================================================================================== conversion ==
class RecordingError(ValueError):
    """A recording that cannot be read or converted; the message names the file and line."""


def read_recording(path: Path) -> list[dict[str, Any]]:
    """The exchanges of a JSON-lines recording; a bad line is an error naming file:line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read: {exc.strerror or exc}") from None
    exchanges = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            exchange = json.loads(line)
        except ValueError as exc:
            raise RecordingError(f"{path}:{number}: not a JSON line: {exc}") from None
        missing = [key for key in ("scenario", "method", "path", "status") if key not in exchange]
        if not isinstance(exchange, dict) or missing:
            raise RecordingError(f"{path}:{number}: not a recorded exchange (missing: {', '.join(missing)})")
        exchanges.append(exchange)
    return exchanges


def slug(name: str) -> str:
    """A scenario name for a step name: "inv purge -j datastorage" -> "inv_purge_j_datastorage"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unnamed"


def to_replay(
    exchanges: Iterable[Mapping[str, Any]], *, select: Mapping[str, str] | None = None
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Scenarios in the replay fixture format, and notes on what was left out.

    A scenario is one e2e step (`select`: {scenario name: step name} picks and renames steps; default
    every step, named by `slug`). Within it, requests are keyed by method + path in order of first use;
    their responses are served in recorded order (the last one repeats). `query` keeps the parameters
    every request of that key carried with the same value, except the blocking-query ones (index, wait),
    which the replay server checks on its own. Exchanges that got no answer cannot be replayed: skipped,
    and counted in the notes."""
    wanted = {step: name for name, step in select.items()} if select is not None else None
    scenarios: dict[str, dict[str, dict[str, Any]]] = {}
    skipped: dict[str, int] = {}
    seen_steps: set[str] = set()
    for exchange in exchanges:
        step = str(exchange["scenario"])
        seen_steps.add(step)
        if wanted is not None and step not in wanted:
            continue
        name = wanted[step] if wanted is not None else slug(step)
        if exchange.get("status") is None:
            skipped[name] = skipped.get(name, 0) + 1
            continue
        key = f"{exchange['method']} {exchange['path']}"
        entry = scenarios.setdefault(name, {}).setdefault(
            key, {"method": exchange["method"], "path": exchange["path"], "queries": [], "responses": []}
        )
        entry["queries"].append(dict(exchange.get("query") or {}))
        entry["responses"].append(_response(exchange))
    if wanted is not None:
        missing = sorted(set(wanted) - seen_steps)
        if missing:
            raise RecordingError(
                f"no exchanges recorded for step(s): {', '.join(missing)} (recorded steps: {', '.join(sorted(seen_steps)) or 'none'})"
            )
    out: dict[str, list[dict[str, Any]]] = {}
    for name, keyed in scenarios.items():
        out[name] = []
        for entry in keyed.values():
            request: dict[str, Any] = {"method": entry["method"], "path": entry["path"]}
            query = _common_query(entry["queries"])
            if query:
                request["query"] = query
            out[name].append({"request": request, "responses": entry["responses"]})
    notes = [f"{name}: {count} exchange(s) without an answer skipped" for name, count in skipped.items()]
    return out, notes


def _response(exchange: Mapping[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {"status": int(exchange["status"])}
    if "response_body" in exchange:
        response["body"] = exchange["response_body"]
    else:
        response["text"] = str(exchange.get("response_text") or "")
    headers = _pick(exchange.get("response_headers") or {}, REPLAY_HEADERS)
    if headers:
        response["headers"] = headers
    return response


def _common_query(queries: list[dict[str, str]]) -> dict[str, str]:
    first = queries[0]
    return {
        name: value
        for name, value in first.items()
        if name not in VOLATILE_QUERY and all(q.get(name) == value for q in queries[1:])
    }


def merge_fixture(
    base: Mapping[str, Any] | None, scenarios: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """A fixture: `base`'s scenarios with `scenarios` added or replaced, and a comment naming the source."""
    base = base or {}
    note = (
        f"Scenarios {', '.join(sorted(scenarios))}: recorded from a real Nomad ({source}) by "
        "scripts/recording-to-replay, secrets redacted."
    )
    return {
        "_comment": [*(base.get("_comment") or []), note],
        "scenarios": {**(base.get("scenarios") or {}), **scenarios},
    }


def iter_steps(exchanges: Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, int]]:
    """(step, number of exchanges) in order of first appearance: what a recording holds."""
    counts: dict[str, int] = {}
    for exchange in exchanges:
        counts[str(exchange["scenario"])] = counts.get(str(exchange["scenario"]), 0) + 1
    yield from counts.items()

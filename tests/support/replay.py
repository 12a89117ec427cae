"""A tiny replay server of Nomad's HTTP API, NOT our own double (stdlib http.server, no code shared with
tests/support/doubles/nomad_api.py): recorded request -> response pairs from tests/fixtures/nomad-replay.json,
checked as a real Nomad would (known endpoints, required query parameters, blocking queries' index/wait).
tests/component/test_replay.py runs the tasks against it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "nomad-replay.json"


class ReplayServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, interactions: list[dict[str, Any]]) -> None:
        super().__init__(("127.0.0.1", 0), ReplayHandler)
        self.lock = threading.Lock()
        self.queues = {self.key(i["request"]): list(i["responses"]) for i in interactions}
        self.required = {self.key(i["request"]): i["request"].get("query", {}) for i in interactions}
        self.log: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.last_index: dict[str, str] = {}

    def start(self) -> ReplayServer:
        """Serve in a thread of its own (`stop` ends it)."""
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)

    @staticmethod
    def key(req: dict[str, Any]) -> str:
        return f"{req['method']} {req['path']}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, method: str, target: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(target)
        query = dict(parse_qsl(parts.query))
        key = f"{method} {parts.path}"
        with self.lock:
            self.log.append({"key": key, "query": query, "body": json.loads(body) if body else None})
            if key not in self.queues:
                self.problems.append(f"unexpected request {key}")
                return 404, {"Content-Type": "text/plain"}, b"Invalid URL"
            for name, value in self.required[key].items():
                if query.get(name) != value:
                    self.problems.append(f"{key}: query {name}={query.get(name)!r}, expected {value!r}")
            blocking = query.get("index") == self.last_index.get(key) and "wait" in query
            if method == "GET" and key in self.last_index and not blocking:
                self.problems.append(
                    f"{key}: not a blocking query (index={query.get('index')!r}, wait={query.get('wait')!r},"
                    f" last X-Nomad-Index {self.last_index[key]})"
                )
            queue = self.queues[key]
            resp = queue.pop(0) if len(queue) > 1 else queue[0]
            headers = dict(resp.get("headers", {}))
            if "X-Nomad-Index" in headers:
                self.last_index[key] = headers["X-Nomad-Index"]
            if "body" in resp:
                headers["Content-Type"] = "application/json"
                data = json.dumps(resp["body"]).encode()
            else:
                headers["Content-Type"] = "text/plain; charset=utf-8"
                data = resp["text"].encode()
            return int(resp["status"]), headers, data


class ReplayHandler(BaseHTTPRequestHandler):
    server: ReplayServer

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, headers, data = self.server.answer(self.command, self.path, body)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


def env_for(server: ReplayServer) -> dict[str, str]:
    # Empty NOMAD_* values: nothing from the caller's environment leaks into the run.
    return {"NOMAD_ADDR": server.url, "NOMAD_TOKEN": "", "NOMAD_CACERT": "", "NOMAD_NAMESPACE": "",
            "NOMAD_REGION": "", "NOMAD_CLIENT_CERT": "", "NOMAD_CLIENT_KEY": ""}  # fmt: skip


def scenario(name: str) -> list[dict[str, Any]]:
    """The recorded interactions of one scenario of FIXTURE."""
    interactions: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["scenarios"][name]
    return interactions

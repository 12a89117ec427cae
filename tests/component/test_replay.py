"""The tasks against a Nomad HTTP API that is NOT our own double: a tiny replay server.

The replay server (stdlib http.server, no code shared with tests/support/doubles/nomad_api.py) serves recorded
request -> response pairs from tests/fixtures/nomad-replay.json, written from the shapes in Nomad's API
docs. `inv nomad.wait`, `inv deploy.data` and `inv purge` run as real subprocesses with NOMAD_ADDR pointing
at it. The server checks what a real Nomad would need: known endpoints only, required query parameters
(purge=true, cas=0), and that every repeated GET passes back the X-Nomad-Index it was last given as
`?index=` (blocking queries), with a `wait`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from infra import ROOT

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


@pytest.fixture
def replay() -> Iterator[Any]:
    servers: list[tuple[ReplayServer, threading.Thread]] = []

    def start(scenario: str) -> ReplayServer:
        data = json.loads(FIXTURE.read_text())
        server = ReplayServer(data["scenarios"][scenario])
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def env_for(server: ReplayServer) -> dict[str, str]:
    # Empty NOMAD_* values: nothing from the caller's environment leaks into the run.
    return {"NOMAD_ADDR": server.url, "NOMAD_TOKEN": "", "NOMAD_CACERT": "", "NOMAD_NAMESPACE": "",
            "NOMAD_REGION": "", "NOMAD_CLIENT_CERT": "", "NOMAD_CLIENT_KEY": ""}  # fmt: skip


def test_inv_nomad_wait_against_the_replay_server(replay: Any, run_inv: Any) -> None:
    server = replay("nomad_wait")
    result = run_inv("nomad.wait", "--timeout", "30", env=env_for(server))
    assert result.returncode == 0, result.stderr
    assert not server.problems, server.problems
    assert "no cluster leader yet" in result.stderr
    assert "docker driver detected, unhealthy (Docker is unresponsive)" in result.stderr
    assert "leader elected; node nomad-1 ready, eligible; docker driver healthy" in result.stderr
    nodes = [e for e in server.log if e["key"] == "GET /v1/nodes"]
    assert len(nodes) == 4  # one request per recorded state
    assert [e["query"].get("index") for e in nodes] == [None, None, "20", "24"]


def test_inv_deploy_data_against_the_replay_server(replay: Any, run_inv: Any) -> None:
    server = replay("deploy_data")
    result = run_inv("deploy.data", env=env_for(server))
    assert result.returncode == 0, result.stderr
    assert not server.problems, server.problems
    keys = [e["key"] for e in server.log]
    order = ["PUT /v1/var/nomad/jobs/datastorage", "POST /v1/jobs/parse", "POST /v1/job/datastorage/plan",
             "POST /v1/jobs"]  # fmt: skip
    assert [k for k in keys if k in order] == order
    parse = next(e["body"] for e in server.log if e["key"] == "POST /v1/jobs/parse")
    assert parse["JobHCL"] == (ROOT / "nomad" / "datastorage.nomad.hcl").read_text()
    assert parse["Canonicalize"] is True
    register = next(e["body"] for e in server.log if e["key"] == "POST /v1/jobs")
    assert register["Job"]["ID"] == "datastorage" and register["EnforceIndex"] is True
    puts = [e for e in server.log if e["key"].startswith("PUT /v1/var/")]
    passwords = {e["body"]["Items"]["postgres_password"] for e in puts}
    assert len(passwords) == 1 and len(passwords.pop()) >= 24  # one random password, copied for the app
    assert all(p not in result.stderr + result.stdout for e in puts for p in e["body"]["Items"].values())
    assert "datastorage: version 0 deployed and healthy" in result.stderr


def test_inv_deploy_data_failure_against_the_replay_server(replay: Any, run_inv: Any) -> None:
    server = replay("deploy_data_failed")
    result = run_inv("deploy.data", env=env_for(server))
    assert result.returncode == 1, result.stderr
    assert not server.problems, server.problems
    assert re.search(
        r"deployment 85ee4a9a of job datastorage failed: Failed due to unhealthy allocations", result.stderr
    )
    assert re.search(
        r"job datastorage, group kafka, task kafka \(alloc 38c70cd8 failed, task dead\): "
        r"Terminated: exit code 137: OOM Killed",
        result.stderr,
    )
    assert "group postgres" not in result.stderr  # the healthy allocation is not blamed


def test_inv_purge_against_the_replay_server(replay: Any, run_inv: Any) -> None:
    server = replay("purge")
    result = run_inv("purge", env=env_for(server))
    assert result.returncode == 0, result.stderr
    assert not server.problems, server.problems
    assert "ingress: not registered" in result.stderr and "app: not registered" in result.stderr
    keys = [e["key"] for e in server.log]
    assert keys.count("DELETE /v1/job/datastorage") == 1
    allocs = [
        e["query"].get("index") for e in server.log if e["key"] == "GET /v1/job/datastorage/allocations"
    ]
    assert allocs == [None, "61", "63"]
    assert "purged, allocations stopped" in result.stderr

"""The tasks against a Nomad HTTP API that is NOT our own double: a tiny replay server.

The replay server (stdlib http.server, no code shared with tests/support/doubles/nomad_api.py) serves recorded
request -> response pairs from tests/fixtures/nomad-replay.json, written from the shapes in Nomad's API
docs. `inv nomad.wait`, `inv deploy.data` and `inv purge` run as real subprocesses with NOMAD_ADDR pointing
at it. The server checks what a real Nomad would need: known endpoints only, required query parameters
(purge=true, cas=0), and that every repeated GET passes back the X-Nomad-Index it was last given as
`?index=` (blocking queries), with a `wait`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from support.replay import ReplayServer, env_for, scenario

from infra import ROOT


@pytest.fixture
def replay(replay_servers: Callable[[list[dict[str, Any]]], ReplayServer]) -> Callable[[str], ReplayServer]:
    """Starts a replay server of one scenario of the fixture."""
    return lambda name: replay_servers(scenario(name))


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

"""tests/e2e/nomad_recording.py's proxy with real HTTP on both sides, and the loop it closes: the real `inv` CLI
runs through the recording proxy against the replay server of test_replay.py (Nomad's answers as the
fixture holds them), the recording is converted with `to_replay`, and `inv` then passes against a replay
server serving the CONVERTED scenario — what CI does with a recording of a real Nomad."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e import harness as e2e
from e2e.nomad_recording import Recorder, RecordingProxy, read_recording, to_replay
from pytest_httpserver import HTTPServer
from support.replay import FIXTURE, ReplayServer, env_for
from werkzeug import Response

from infra.core.errors import REDACTED


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[Any]:
    proxies: list[RecordingProxy] = []

    def start(upstream: str) -> RecordingProxy:
        proxy = RecordingProxy(upstream, Recorder(tmp_path / "nomad-exchanges.jsonl")).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def fixture_scenario(name: str) -> list[dict[str, Any]]:
    scenarios: dict[str, list[dict[str, Any]]] = json.loads(FIXTURE.read_text())["scenarios"]
    return scenarios[name]


def via(proxy: RecordingProxy, server: ReplayServer) -> dict[str, str]:
    """What the e2e gives every `inv`: INVOKE_NOMAD_ADDR (config nomad.addr) naming the proxy. It must beat
    NOMAD_ADDR, which here names a port nobody listens on."""
    return {
        **env_for(server),
        "NOMAD_ADDR": f"http://127.0.0.1:{dead_port()}",
        "INVOKE_NOMAD_ADDR": proxy.url,
    }


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("scenario", "args"),
    [("nomad_wait", ("nomad.wait", "--timeout", "30")), ("deploy_data", ("deploy.data",))],
)
def test_recorded_inv_traffic_converts_into_a_scenario_inv_passes_against(
    scenario: str, args: tuple[str, ...], replay_servers: Any, recording: Any, run_inv: Any, tmp_path: Path
) -> None:
    task = args[0]
    original = replay_servers(fixture_scenario(scenario))
    proxy = recording(original.url)
    proxy.recorder.scenario = f"inv {task}"
    first = run_inv(*args, env=via(proxy, original))
    assert first.returncode == 0, first.stderr
    assert not original.problems, original.problems  # the proxy changed nothing Nomad would notice
    proxy.stop()

    exchanges = read_recording(tmp_path / "nomad-exchanges.jsonl")
    assert len(exchanges) == len(original.log)  # every exchange, in order
    assert [f"{e['method']} {e['path']}" for e in exchanges] == [e["key"] for e in original.log]
    converted, notes = to_replay(exchanges, select={scenario: f"inv {task}"})
    assert notes == []

    replayed = replay_servers(converted[scenario])
    second = run_inv(*args, env=env_for(replayed))
    assert second.returncode == 0, second.stderr
    assert not replayed.problems, replayed.problems
    assert [e["key"] for e in replayed.log] == [e["key"] for e in original.log]

    if task == "deploy.data":
        # The generated Postgres password went out in the variable writes; the recording never holds it.
        puts = [e for e in original.log if e["key"].startswith("PUT /v1/var/")]
        password = puts[0]["body"]["Items"]["postgres_password"]
        text = (tmp_path / "nomad-exchanges.jsonl").read_text()
        assert password not in text
        recorded_puts = [e for e in exchanges if e["method"] == "PUT"]
        assert all(e["request_body"]["Items"] == {"postgres_password": REDACTED} for e in recorded_puts)


def test_the_proxy_relays_status_headers_and_streams(
    httpserver: HTTPServer, recording: Any, tmp_path: Path
) -> None:
    httpserver.expect_request("/v1/status/leader").respond_with_json(
        "10.0.2.15:4647", headers={"X-Nomad-Index": "12", "X-Nomad-KnownLeader": "true"}
    )
    httpserver.expect_request("/v1/job/nope").respond_with_data("job not found", status=404)

    def frames() -> Iterator[bytes]:
        yield b'{"File":"alloc/logs/app.stdout.0","Offset":0,"Data":"aGVsbG8K"}'
        yield b"{}"

    httpserver.expect_request("/v1/client/fs/logs/a1").respond_with_response(
        Response(frames(), status=200, content_type="application/json")
    )
    httpserver.expect_request("/ui/").respond_with_data("<html>ui</html>", content_type="text/html")
    proxy = recording(httpserver.url_for("/"))

    leader = requests.get(
        proxy.url + "/v1/status/leader", headers={"X-Nomad-Token": "s3cr3t-token-value"}, timeout=5
    )
    assert (leader.status_code, leader.json(), leader.headers["X-Nomad-Index"]) == (
        200,
        "10.0.2.15:4647",
        "12",
    )
    missing = requests.get(proxy.url + "/v1/job/nope", timeout=5)
    assert (missing.status_code, missing.text) == (404, "job not found")
    stream = requests.get(proxy.url + "/v1/client/fs/logs/a1?task=app&type=stdout&follow=true", timeout=5)
    assert stream.content == b'{"File":"alloc/logs/app.stdout.0","Offset":0,"Data":"aGVsbG8K"}{}'
    assert requests.get(proxy.url + "/ui/", timeout=5).text == "<html>ui</html>"  # relayed, not recorded
    proxy.stop()

    exchanges = read_recording(tmp_path / "nomad-exchanges.jsonl")
    assert [(e["path"], e["status"]) for e in exchanges] == [
        ("/v1/status/leader", 200), ("/v1/job/nope", 404), ("/v1/client/fs/logs/a1", 200)
    ]  # fmt: skip
    assert exchanges[0]["request_headers"] == {"X-Nomad-Token": REDACTED}
    assert exchanges[0]["response_headers"]["X-Nomad-KnownLeader"] == "true"
    assert exchanges[1]["response_text"] == "job not found"
    assert exchanges[2]["query"] == {"task": "app", "type": "stdout", "follow": "true"}
    assert "s3cr3t-token-value" not in (tmp_path / "nomad-exchanges.jsonl").read_text()


def test_an_unreachable_nomad_looks_like_a_dropped_connection(recording: Any, tmp_path: Path) -> None:
    port = dead_port()
    proxy = recording(f"http://127.0.0.1:{port}")
    with pytest.raises(requests.ConnectionError):
        requests.get(proxy.url + "/v1/agent/self", timeout=5)
    proxy.stop()
    (exchange,) = read_recording(tmp_path / "nomad-exchanges.jsonl")
    assert exchange["status"] is None
    assert exchange["error"] == f"no answer from http://127.0.0.1:{port}: ConnectionError"


def test_start_recording_points_the_e2e_client_at_the_proxy(
    make_cfg: Any, httpserver: HTTPServer, tmp_path: Path
) -> None:
    httpserver.expect_request("/v1/status/leader").respond_with_json("10.0.2.15:4647")
    cfg = make_cfg(
        nomad={"addr": httpserver.url_for("/").rstrip("/")}, e2e={"report_dir": str(tmp_path / "e2e")}
    )
    proxy, recorded = e2e.start_recording(cfg)
    try:
        assert proxy.upstream == cfg.nomad.addr and recorded.nomad.addr == proxy.url
        assert e2e.Smoke(recorded).nomad().leader(retries=0) == "10.0.2.15:4647"  # the project's client
    finally:
        proxy.stop()
    (exchange,) = read_recording(tmp_path / "e2e" / e2e.RECORDING_NAME)
    assert (exchange["path"], exchange["status"], exchange["response_body"]) == (
        "/v1/status/leader", 200, "10.0.2.15:4647"
    )  # fmt: skip

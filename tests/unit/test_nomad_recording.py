"""tests/e2e/nomad_recording.py and scripts/recording-to-replay: redaction of recorded Nomad API exchanges, and
the conversion of a (small, hand-written) recording into the replay fixture format of
tests/fixtures/nomad-replay.json. The proxy itself is tested in tests/component/test_nomad_recording.py."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from e2e.nomad_recording import (
    Recorder,
    RecordingError,
    build_exchange,
    read_recording,
    redact,
    slug,
    to_replay,
)

from infra import ROOT
from infra.core.errors import REDACTED

TOKEN = "0b6f2c5e-8f2b-4d1e-9a3c-7e5d4c3b2a10"
PASSWORD = "Zq8pL2mWx9rT4vB7nK3s"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhcHAifQ.c2lnbmF0dXJl"
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def exchange(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "scenario": "inv deploy.data",
        "method": "GET",
        "target": "/v1/jobs",
        "request_headers": {},
        "request_body": b"",
        "status": 200,
        "response_headers": {"Content-Type": "application/json", "X-Nomad-Index": "7"},
        "response_body": b"[]",
        "seconds": 0.01234,
        "started": T0,
        "learned": set(),
    }
    fields.update(overrides)
    return build_exchange(**fields)


# ------------------------------------------------------------------------------------------------ redaction --
def test_a_variable_write_keeps_its_shape_but_no_secret() -> None:
    learned: set[str] = set()
    body = {"Namespace": "default", "Path": "nomad/jobs/app", "Items": {"postgres_password": PASSWORD}}
    answer = {**body, "CreateIndex": 40, "ModifyIndex": 41}
    recorded = exchange(
        method="PUT",
        target="/v1/var/nomad/jobs/app?cas=0",
        request_headers={
            "X-Nomad-Token": TOKEN,
            "Content-Type": "application/json",
            "User-Agent": "infra-lab",
        },
        request_body=json.dumps(body).encode(),
        response_body=json.dumps(answer).encode(),
        learned=learned,
    )
    assert recorded == {
        "scenario": "inv deploy.data",
        "started": "2026-11-30T12:00:00.000+00:00",
        "seconds": 0.012,
        "method": "PUT",
        "path": "/v1/var/nomad/jobs/app",
        "query": {"cas": "0"},
        "request_headers": {"X-Nomad-Token": REDACTED, "Content-Type": "application/json"},
        "request_body": {
            "Namespace": "default",
            "Path": "nomad/jobs/app",
            "Items": {"postgres_password": REDACTED},
        },
        "status": 200,
        "response_headers": {"X-Nomad-Index": "7", "Content-Type": "application/json"},
        "response_body": {
            "Namespace": "default",
            "Path": "nomad/jobs/app",
            "Items": {"postgres_password": REDACTED},
            "CreateIndex": 40,
            "ModifyIndex": 41,
        },
    }
    assert learned == {TOKEN, PASSWORD}


def test_secrets_under_secret_keys_in_urls_and_jwts_are_redacted_the_rest_kept() -> None:
    template = "PGPASSWORD={{ .postgres_password }}\nDATABASE_URL=postgresql://app:{{ $password | urlquery }}@{{ .Address }}"
    job = {
        "ID": "app",
        "TaskGroups": [
            {
                "Tasks": [
                    {
                        "Env": {
                            "POSTGRES_PASSWORD": PASSWORD,
                            "PGUSER": "app",
                            "NOMAD_SECRETS_DIR": "/secrets",
                        },
                        "Templates": [{"EmbeddedTmpl": template, "DestPath": "secrets/app.env"}],
                        "Config": {"args": [f"--dsn=postgresql://app:{PASSWORD}@10.0.2.15:5432/app"]},
                    }
                ]
            }
        ],
    }
    alloc = {"ID": "a1", "SignedIdentities": {"app": JWT}, "SecretID": "", "ModifyIndex": 9}
    recorded = redact({"job": job, "alloc": alloc, "ACLToken": {"SecretID": TOKEN, "Name": "ci"}}, set())
    task = recorded["job"]["TaskGroups"][0]["Tasks"][0]
    assert task["Env"] == {"POSTGRES_PASSWORD": REDACTED, "PGUSER": "app", "NOMAD_SECRETS_DIR": "/secrets"}
    assert task["Templates"] == [{"EmbeddedTmpl": template, "DestPath": "secrets/app.env"}]  # no secret in it
    assert task["Config"] == {"args": [f"--dsn=postgresql://app:{REDACTED}@10.0.2.15:5432/app"]}
    assert recorded["alloc"] == {
        "ID": "a1",
        "SignedIdentities": {"app": REDACTED},
        "SecretID": "",
        "ModifyIndex": 9,
    }
    assert recorded["ACLToken"] == {"SecretID": REDACTED, "Name": REDACTED}  # everything under a secret key


def test_a_secret_seen_once_is_scrubbed_wherever_it_turns_up_later(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec.jsonl")
    recorder.scenario = "inv deploy.data"
    common: dict[str, Any] = {
        "request_headers": {"X-Nomad-Token": TOKEN},
        "response_headers": {"Content-Type": "text/plain"},
        "seconds": 0.1,
    }
    recorder.record(
        method="PUT", target="/v1/var/nomad/jobs/datastorage", request_body=json.dumps(
            {"Items": {"postgres_password": PASSWORD}}).encode(), status=200, response_body=b"{}", **common
    )  # fmt: skip
    recorder.scenario = "diagnostics"
    log = f"initdb: password {PASSWORD} accepted; token {TOKEN}\n".encode()
    recorder.record(method="GET", target="/v1/client/fs/logs/a1?task=postgres&type=stdout&plain=true",
                    request_body=b"", status=200, response_body=log, **common)  # fmt: skip
    recorder.record(method="GET", target="/v1/jobs", request_body=b"", status=None, response_body=b"",
                    error="no answer from http://127.0.0.1:4646: ConnectionError", **common)  # fmt: skip
    recorder.close()
    assert recorder.record(method="GET", target="/v1/jobs", request_body=b"", status=200, response_body=b"",
                           **common) is None  # fmt: skip  # closed: nothing more is written

    text = (tmp_path / "rec.jsonl").read_text()
    assert PASSWORD not in text and TOKEN not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(e["seq"], e["scenario"], e["status"]) for e in lines] == [
        (1, "inv deploy.data", 200), (2, "diagnostics", 200), (3, "diagnostics", None)
    ]  # fmt: skip
    assert lines[1]["response_text"] == f"initdb: password {REDACTED} accepted; token {REDACTED}\n"
    assert lines[1]["query"] == {"task": "postgres", "type": "stdout", "plain": "true"}
    assert lines[2]["error"] == "no answer from http://127.0.0.1:4646: ConnectionError"
    assert read_recording(tmp_path / "rec.jsonl") == lines


def test_text_bodies_are_kept_and_long_ones_cut() -> None:
    recorded = exchange(
        response_headers={"Content-Type": "text/plain"}, status=500, response_body=b"No cluster leader"
    )
    assert recorded["response_text"] == "No cluster leader" and "response_body" not in recorded
    long = exchange(response_headers={}, response_body=b"x" * (256 * 1024 + 5))
    assert long["response_text"].endswith("x... (5 more characters not recorded)")
    null = exchange(response_body=b"null")  # GET /v1/job/x/deployment before any deployment
    assert "response_body" in null and null["response_body"] is None


# ----------------------------------------------------------------------------------------------- conversion --
def rec(scenario: str, method: str, path: str, status: int | None, **extra: Any) -> dict[str, Any]:
    return {"scenario": scenario, "method": method, "path": path, "status": status, **extra}


SELF = {"config": {"Region": "global"}, "stats": {"client": {"node_id": "n1"}}}
NODE = {"ID": "n1", "Status": "ready", "Drivers": {"docker": {"Detected": True, "Healthy": True}}}
RECORDING = [
    rec("inv nomad.wait", "GET", "/v1/agent/self", 200, query={}, response_body=SELF),
    rec("inv nomad.wait", "GET", "/v1/nodes", None, query={}, error="no answer"),
    rec("inv nomad.wait", "GET", "/v1/nodes", 500, query={}, response_text="No cluster leader"),
    rec("inv nomad.wait", "GET", "/v1/nodes", 200, query={}, response_body=[{**NODE, "Status": "initializing"}],
        response_headers={"X-Nomad-Index": "20", "X-Nomad-KnownLeader": "true", "Content-Type": "application/json"}),
    rec("inv nomad.wait", "GET", "/v1/nodes", 200, query={"index": "20", "wait": "300s"}, response_body=[NODE],
        response_headers={"X-Nomad-Index": "24", "X-Nomad-KnownLeader": "true"}),
    rec("inv purge -j datastorage", "DELETE", "/v1/job/datastorage", 200, query={"purge": "true"},
        response_body={"EvalID": "e1", "JobModifyIndex": 61}),
    rec("inv purge -j datastorage", "GET", "/v1/job/datastorage/allocations", 200, query={"all": "true"},
        response_body=[{"ID": "a1", "ClientStatus": "running"}], response_headers={"X-Nomad-Index": "61"}),
    rec("inv purge -j datastorage", "GET", "/v1/job/datastorage/allocations", 200,
        query={"all": "true", "index": "61", "wait": "60s"}, response_body=[], response_headers={"X-Nomad-Index": "63"}),
]  # fmt: skip


def test_a_recording_becomes_replay_scenarios() -> None:
    scenarios, notes = to_replay(RECORDING)
    assert scenarios == {
        "inv_nomad_wait": [
            {"request": {"method": "GET", "path": "/v1/agent/self"}, "responses": [{"status": 200, "body": SELF}]},
            {
                "request": {"method": "GET", "path": "/v1/nodes"},
                "responses": [
                    {"status": 500, "text": "No cluster leader"},
                    {"status": 200, "body": [{**NODE, "Status": "initializing"}],
                     "headers": {"X-Nomad-Index": "20", "X-Nomad-KnownLeader": "true"}},
                    {"status": 200, "body": [NODE], "headers": {"X-Nomad-Index": "24", "X-Nomad-KnownLeader": "true"}},
                ],
            },
        ],
        "inv_purge_j_datastorage": [
            {"request": {"method": "DELETE", "path": "/v1/job/datastorage", "query": {"purge": "true"}},
             "responses": [{"status": 200, "body": {"EvalID": "e1", "JobModifyIndex": 61}}]},
            # `all` is on every request; index/wait are not required (the replay server checks blocking itself)
            {"request": {"method": "GET", "path": "/v1/job/datastorage/allocations", "query": {"all": "true"}},
             "responses": [{"status": 200, "body": [{"ID": "a1", "ClientStatus": "running"}],
                            "headers": {"X-Nomad-Index": "61"}},
                           {"status": 200, "body": [], "headers": {"X-Nomad-Index": "63"}}]},
        ],
    }  # fmt: skip
    assert notes == ["inv_nomad_wait: 1 exchange(s) without an answer skipped"]


def test_steps_can_be_picked_and_renamed_and_a_missing_step_is_an_error() -> None:
    scenarios, _ = to_replay(RECORDING, select={"purge": "inv purge -j datastorage"})
    assert list(scenarios) == ["purge"] and len(scenarios["purge"]) == 2
    with pytest.raises(RecordingError, match=r"no exchanges recorded for step\(s\): inv deploy.data \(recorded "
                       r"steps: inv nomad.wait, inv purge -j datastorage\)"):  # fmt: skip
        to_replay(RECORDING, select={"deploy_data": "inv deploy.data"})
    assert slug("every job running and healthy") == "every_job_running_and_healthy"


def test_a_bad_recording_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    path.write_text(json.dumps(RECORDING[0]) + "\n{not json\n")
    with pytest.raises(RecordingError, match=r"rec.jsonl:2: not a JSON line"):
        read_recording(path)
    path.write_text('{"method": "GET"}\n')
    with pytest.raises(
        RecordingError, match=r"rec.jsonl:1: not a recorded exchange \(missing: scenario, path, status\)"
    ):
        read_recording(path)


# ----------------------------------------------------------------------------------- scripts/recording-to-replay --
def load_script() -> ModuleType:
    path = ROOT / "scripts" / "recording-to-replay"
    loader = importlib.machinery.SourceFileLoader("recording_to_replay", str(path))
    spec = importlib.util.spec_from_loader("recording_to_replay", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # The script's first import is scripts/_venv.py, found beside it (Python puts a script's own directory
    # first on sys.path when it runs; loaded here, the test puts it there). In this virtualenv it does nothing.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(path.parent))
        loader.exec_module(module)
    return module


def test_the_script_merges_into_a_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recording = tmp_path / "nomad-exchanges.jsonl"
    recording.write_text("".join(json.dumps(e) + "\n" for e in RECORDING))
    fixture = tmp_path / "fixture.json"
    fixture.write_text(
        json.dumps({"_comment": ["hand-written"], "scenarios": {"nomad_wait": [], "other": []}})
    )
    script = load_script()

    code = script.main([str(recording), "--scenario", "nomad_wait=inv nomad.wait", "--merge", str(fixture),
                        "-o", str(fixture)])  # fmt: skip
    assert code == 0
    written = json.loads(fixture.read_text())
    assert list(written["scenarios"]) == ["nomad_wait", "other"]
    assert written["scenarios"]["nomad_wait"] == to_replay(RECORDING)[0]["inv_nomad_wait"]
    assert written["_comment"][0] == "hand-written"
    assert "recorded from a real Nomad (nomad-exchanges.jsonl)" in written["_comment"][1]
    err = capsys.readouterr().err
    assert "note: nomad_wait: 1 exchange(s) without an answer skipped" in err
    assert f"wrote {fixture}: 1 scenario(s), 2 request key(s)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fixture.json",
        "nomad-exchanges.jsonl",
    ]  # no temp left


def test_the_script_lists_steps_and_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recording = tmp_path / "rec.jsonl"
    recording.write_text("".join(json.dumps(e) + "\n" for e in RECORDING))
    script = load_script()
    assert script.main([str(recording), "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "    5  inv nomad.wait",
        "    3  inv purge -j datastorage",
    ]

    out = tmp_path / "out.json"
    assert script.main([str(recording), "--scenario", "x=inv up", "-o", str(out)]) == 1
    assert capsys.readouterr().err.startswith("error: no exchanges recorded for step(s): inv up")
    assert not out.exists()  # nothing half-made
    assert script.main([str(tmp_path / "missing.jsonl")]) == 1
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        script.main([str(recording), "--scenario", "no-equals-sign"])
    assert exit_.value.code == 2

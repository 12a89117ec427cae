"""`inv logs JOB [--task T] [--stderr] [--follow]` against the Nomad API double, which streams framed
JSON ({File, Offset, Data (base64)}, `{}` heartbeats) as client/fs_endpoint.go does."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from support.doubles.nomad_api import NomadAPIDouble

from infra import ROOT
from infra.core.errors import DeployError
from infra.nomad import rollout
from infra.nomad.client import Client, Settings

JOB = """
job "web" {
  group "frontend" {
    task "setup" {
      driver = "docker"
      lifecycle {
        hook = "prestart"
      }
      config {
        image = "busybox:1"
      }
    }
    task "server" {
      driver = "docker"
      config {
        image = "web:1"
      }
    }
  }
}
"""


@pytest.fixture
def double(double: NomadAPIDouble) -> NomadAPIDouble:
    double.heartbeat = 0.2
    double.task_output["server"] = ("listening on :8080\n", "a warning\n")
    return double


@pytest.fixture
def deployed(double: NomadAPIDouble, tmp_path: Path) -> NomadAPIDouble:
    path = tmp_path / "web.nomad.hcl"
    path.write_text(JOB)
    rollout.deploy_job(Client(Settings(addr=double.url, retries=0)), path, timeout=10)
    return double


def newest_alloc(d: NomadAPIDouble) -> str:
    return str(max(d.allocs.values(), key=lambda a: a["CreateIndex"])["ID"])


def test_the_double_answers_framed_json(deployed: NomadAPIDouble) -> None:
    alloc = newest_alloc(deployed)
    body = requests.get(
        f"{deployed.url}/v1/client/fs/logs/{alloc}", params={"task": "server", "type": "stdout"}, timeout=5
    ).text
    frame = json.loads(body)
    assert frame["File"] == "alloc/logs/server.stdout.0" and frame["Offset"] == len("listening on :8080\n")
    assert base64.b64decode(frame["Data"]) == b"listening on :8080\n"


def test_task_logs_of_the_newest_allocation(deployed: NomadAPIDouble) -> None:
    c = Client(Settings(addr=deployed.url, retries=0))
    assert b"".join(rollout.task_logs(c, "web")) == b"listening on :8080\n"  # the only main task
    assert b"".join(rollout.task_logs(c, "web", stderr=True)) == b"a warning\n"
    assert b"".join(rollout.task_logs(c, "web", task="setup")) == b"setup: started\n"
    deployed.write_log(newest_alloc(deployed), "server", "stdout", "second line\n")
    assert b"".join(rollout.task_logs(c, "web")).endswith(b"second line\n")
    with pytest.raises(
        DeployError, match="job web has no task 'nope' in group frontend; its tasks: setup, server"
    ):
        list(rollout.task_logs(c, "web", task="nope"))
    with pytest.raises(DeployError, match="job nope is not registered"):
        list(rollout.task_logs(c, "nope"))


def _env(d: NomadAPIDouble, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "NOMAD_ADDR": d.url,
        "NOMAD_TOKEN": "",
        "NOMAD_CACERT": "",
        "INVOKE_PROJECT_STATE_DIR": str(tmp_path / "state"),
    }


def test_inv_logs(deployed: NomadAPIDouble, run_inv: Any) -> None:
    env = {"NOMAD_ADDR": deployed.url, "NOMAD_TOKEN": "", "NOMAD_CACERT": ""}
    out = run_inv("logs", "web", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "listening on :8080\n"
    err = run_inv("logs", "web", "--stderr", "--task", "server", env=env)
    assert err.returncode == 0 and err.stdout == "a warning\n"
    missing = run_inv("logs", "nope", env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("error: job nope is not registered")
    assert "Traceback" not in missing.stderr


def test_inv_logs_follow_streams_new_output_across_heartbeats(
    deployed: NomadAPIDouble, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("inv")), "logs", "web", "--follow"],
        cwd=ROOT,
        env=_env(deployed, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        time.sleep(1.0)  # heartbeats `{}` go by meanwhile (every 0.2 s here)
        deployed.write_log(newest_alloc(deployed), "server", "stdout", "later\n")
        # arrives while `inv logs --follow` still runs: streamed as it comes, not kept until the end
        second = proc.stdout.readline().decode()
        assert proc.poll() is None  # still following
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert (first, second) == ("listening on :8080\n", "later\n")
    assert b"Traceback" not in err
    streams = [r for r in deployed.requests if r.path.startswith("/v1/client/fs/logs/")]
    # one following stream carried both lines across the heartbeats: no polling, no reconnect
    assert len(streams) == 1 and streams[0].query["follow"] == "true", [r.query for r in streams]


def test_inv_logs_into_a_closed_pipe_is_quiet(deployed: NomadAPIDouble, tmp_path: Path) -> None:
    deployed.write_log(newest_alloc(deployed), "server", "stdout", "x" * 2_000_000)
    inv = str(Path(sys.executable).with_name("inv"))
    result = subprocess.run(
        ["sh", "-c", f"'{inv}' logs web | head -c 10"],
        cwd=ROOT,
        env=_env(deployed, tmp_path),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.stdout == b"listening "
    assert b"Traceback" not in result.stderr and b"Error" not in result.stderr, result.stderr

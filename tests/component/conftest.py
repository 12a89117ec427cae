"""Fixtures of the component tier: real servers and tools, each started here and stopped by PID at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import dockerd
from servers.common import blank_vm_settings, free_port

from infra.core import config
from infra.core.state import StatePaths
from infra.vm import instance


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[dockerd.DockerEngine]:
    """A private dockerd (Debian's docker.io). If it cannot start, every test using it FAILS with the
    dockerd log: a missing engine is a broken environment, not a reason to skip."""
    engine = dockerd.started()
    yield engine
    dockerd.cleanup(engine)


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

"""infra.vm.host: whether a port is free, which process holds it (psutil), and the process facts the VM
lifecycle stands on, against real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
from support.servers.common import free_port

from infra.core.config import Port
from infra.core.errors import PortInUseError
from infra.vm import host


def test_taken_port_is_named_with_its_process(port_holder: Callable[..., tuple[int, int]]) -> None:
    port, pid = port_holder()
    forwards = {"ssh": Port(port, 22), "app": Port(free_port(), 3000)}
    with pytest.raises(PortInUseError) as err:
        host.check_ports(forwards)
    message = str(err.value)
    assert f"host port {port} (vm.ports.ssh) is taken by pid {pid} (python" in message
    assert "INVOKE_VM_PORTS_SSH_HOST" in message
    assert "app" not in message.split("hint:")[0]


def test_port_owner_on_all_interfaces(port_holder: Callable[..., tuple[int, int]]) -> None:
    """A listener on 0.0.0.0 also blocks 127.0.0.1:<port>, and is found."""
    port, pid = port_holder("0.0.0.0")  # noqa: S104 - the point of the test
    assert not host.port_free(port)
    assert (host.port_owner(port) or "").startswith(f"pid {pid} (python")


def test_free_port_is_free() -> None:
    port = free_port()
    assert host.port_free(port)
    host.check_ports({"ssh": Port(port, 22)})


def test_process_facts_of_a_real_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """cmdline, alive and `find` (by argv) of a live process; after `kill` — which has to escalate to
    SIGKILL, the process ignores SIGTERM — it is gone for all three (a zombie counts as gone)."""
    marker = "infra-host-test-marker"
    script = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script, marker], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert (host.cmdline(proc.pid) or [])[-1] == marker and host.alive(proc.pid)
        assert host.find(lambda argv: marker in argv) == proc.pid
        now = [0.0]
        pauses: list[float] = []
        sent: list[int] = []
        real_kill = os.kill

        def kill(pid: int, sig: int) -> None:
            sent.append(sig)
            real_kill(pid, sig)

        monkeypatch.setattr(os, "kill", kill)

        def sleep(seconds: float) -> None:  # a fake clock, moved only by the pauses
            pauses.append(seconds)
            now[0] += seconds
            if signal.SIGKILL in sent:  # SIGKILL cannot be ignored: give the kernel the real time it takes
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(120)

        assert host.kill(proc.pid, grace=1.0, clock=lambda: now[0], sleep=sleep) is True
        monkeypatch.undo()
        assert sent == [signal.SIGTERM, signal.SIGCONT, signal.SIGKILL]
        assert proc.wait(60) == -signal.SIGKILL  # SIGTERM was ignored, so it took the escalation
        assert sum(pauses) >= 1.0, pauses  # after SIGTERM, the whole 1 s grace was waited out first
        assert host.cmdline(proc.pid) is None and not host.alive(proc.pid)
        assert host.find(lambda argv: marker in argv) is None
    finally:
        proc.kill()
        proc.wait(10)

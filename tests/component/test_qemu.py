"""infra.vm.qemu: the command line per guest arch / accelerator / host platform, and the accelerator choice.

The command line is pure, so most tests read it; `test_command_line_is_accepted_by_real_qemu` hands one to
the real qemu-system-x86_64 to prove the options exist and combine (it exits at once via `-S` + QMP quit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support.launchspec import spec
from support.servers.common import free_ports

from infra.core.config import Port
from infra.vm import qemu

pytestmark = pytest.mark.tools("qemu-system-x86_64", "qemu-img")


QEMU = shutil.which("qemu-system-x86_64")


def wait_gone(pid: int, seconds: float) -> bool:
    """True once `pid` has exited (a zombie waiting for init to reap it counts as exited)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_command_line_is_accepted_by_real_qemu(tmp_path: Path) -> None:
    """The real qemu parses our command line, daemonizes, writes the pidfile, answers QMP, binds loopback."""
    assert QEMU is not None
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True)
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"\0" * 2048 * 16)
    ssh_port, app_port = free_ports(2)
    ports = {"ssh": Port(ssh_port, 22), "app": Port(app_port, 3000)}
    cmd = qemu.build_command(
        spec(tmp_path, qemu=QEMU, disk=disk, seed_iso=seed, forwards=ports, cpus=1, memory_mb=128)
    )
    proc = subprocess.run([*cmd, "-S"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    pid = int((tmp_path / "qemu.pid").read_text())
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(tmp_path / "qmp.sock"))
            f = s.makefile("rwb")
            assert "QMP" in json.loads(f.readline())
            for command in ("qmp_capabilities", "query-status"):
                f.write(json.dumps({"execute": command}).encode() + b"\n")
                f.flush()
                reply = json.loads(f.readline())
            assert reply["return"]["status"] == "prelaunch"
            for port in ports.values():
                with socket.create_connection(("127.0.0.1", port.host), timeout=5):
                    pass
            f.write(b'{"execute": "quit"}\n')
            f.flush()
    finally:
        if not wait_gone(pid, 10):
            os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 60)  # a poll: generous, it only ends a hang

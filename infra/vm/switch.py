"""The private network of a local cluster: one `vde_switch` (Debian's vde2) whose unix sockets live in the
state dir; every node's second NIC (`-netdev vde,sock=<dir>`) is plugged into it.

It is an L2 made of host-local unix sockets only: no tap, no bridge, no host multicast, no address of the
host on it, so no guest packet on it can leave this host and the host sends nothing outside 127.0.0.0/8.
The switch is started and stopped by its pid (its pidfile, accepted only when that process's command line
names our socket directory, as `infra.vm.lifecycle` accepts a qemu), never by its process name.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

from infra.core import ui
from infra.core.errors import VMError
from infra.core.state import StatePaths
from infra.core.waits import Probe, wait_until
from infra.vm import host

#: The control socket vde_switch makes in its directory (qemu's vde netdev connects to it).
CONTROL = "ctl"


def _is_ours(argv: list[str] | None, p: StatePaths) -> bool:
    sock = str(p.switch_dir)
    return bool(argv) and any(a in ("-s", "--sock") and b == sock for a, b in itertools.pairwise(argv or []))


def running_pid(p: StatePaths) -> int | None:
    """The pid of OUR switch (pidfile, else a scan for a vde_switch naming our socket dir), or None."""
    try:
        text = p.switch_pidfile.read_text().strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    if text.isdigit() and _is_ours(host.cmdline(int(text)), p):
        return int(text)
    return host.find(lambda argv: _is_ours(argv, p))


def control_socket(p: StatePaths) -> Path:
    return p.switch_dir / CONTROL


def ensure(p: StatePaths, timeout: float = 30.0) -> int:
    """Start the switch unless it runs; its pid. Idempotent."""
    pid = running_pid(p)
    if pid is not None:
        return pid
    binary = shutil.which("vde_switch")
    if binary is None:
        raise VMError(
            "vde_switch not found on PATH: a cluster (vm.nodes >= 3) needs it for the private network",
            hint="apt-get install vde2 (./scripts/setup --system installs it); or set vm.nodes: 1",
        )
    p.root.mkdir(parents=True, exist_ok=True)
    p.switch_pidfile.unlink(missing_ok=True)
    if p.switch_dir.exists() and not control_socket(p).exists():
        shutil.rmtree(p.switch_dir)  # a crashed switch's leftovers: vde_switch refuses an existing dir
    # -f /dev/null: no rc file of this user or of /etc/vde2 changes the switch; -d: it daemonizes once its
    # socket is bound; no -t/--tap: it has no interface on the host.
    command = [binary, "-s", str(p.switch_dir), "-d", "-p", str(p.switch_pidfile), "-f", "/dev/null"]
    with p.switch_log.open("w") as log:
        proc = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=60, check=False
        )
    if proc.returncode != 0:
        raise VMError(f"vde_switch failed to start (exit {proc.returncode})", log=p.switch_log)

    def probe(_d: object) -> Probe[int]:
        found = running_pid(p)
        if found is not None and control_socket(p).exists():
            return Probe(True, "listening", found)
        return Probe(False, "starting")

    started = wait_until(probe, what="the cluster network switch (vde_switch)", timeout=timeout, interval=0.1)
    pid = int(started.value or 0)
    ui.ok(f"cluster network switch started: vde_switch pid {pid}, sockets in {p.switch_dir}")
    return pid


def stop(p: StatePaths) -> bool:
    """Stop our switch by its pid (SIGTERM, then SIGKILL) and remove its sockets. True when one ran."""
    pid = running_pid(p)
    if pid is not None and not host.kill(pid):
        raise VMError(f"vde_switch (pid {pid}) survived SIGKILL", hint=f"check `ps -p {pid}`")
    p.switch_pidfile.unlink(missing_ok=True)
    if p.switch_dir.exists():
        shutil.rmtree(p.switch_dir, ignore_errors=True)
    if pid is not None:
        ui.ok(f"cluster network switch stopped (vde_switch pid {pid})")
    return pid is not None


__all__ = ["CONTROL", "control_socket", "ensure", "running_pid", "stop"]

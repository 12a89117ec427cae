"""Facts about this host's processes and ports, from psutil: is a pid alive, its command line, stopping it,
whether a TCP port is free and which process listens on it.

psutil reads other processes' sockets without privileges on Linux; on macOS it needs root for them, so
there the listener is asked of `lsof` instead. Nothing here knows the VM; `infra.vm.lifecycle` decides which
process is its qemu.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping

import psutil

from infra.core.config import Port
from infra.core.errors import PortInUseError


# ------------------------------------------------------------------------------------------- processes --
def cmdline(pid: int) -> list[str] | None:
    """The live process's argv ([] when unreadable), None when there is no such live process (a zombie is
    dead for our purposes)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return proc.cmdline()
    except (psutil.NoSuchProcess, ValueError):
        return None
    except psutil.AccessDenied:
        return []


def started(pid: int) -> float | None:
    """When the live process `pid` started (epoch seconds, as the kernel keeps it), None when there is none:
    with the pid, it names one process, never a later one given the same pid."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def alive(pid: int) -> bool:
    """A live process (not a zombie) has this pid."""
    return cmdline(pid) is not None


def find(matches: Callable[[list[str]], bool]) -> int | None:
    """The pid of a live process whose argv `matches`, if any."""
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if matches(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                return int(proc.pid)
    return None


def kill(
    pid: int,
    grace: float = 5.0,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """SIGTERM, then SIGKILL, each given `grace` seconds; True when the process is gone. SIGTERM is
    followed by SIGCONT (as systemd's stop does), so a process stopped with SIGSTOP gets to handle it
    instead of holding it pending until SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            if sig == signal.SIGTERM:
                os.kill(pid, signal.SIGCONT)
        end = clock() + grace
        while clock() < end:
            if not alive(pid):
                return True
            sleep(0.1)
    return False


# ------------------------------------------------------------------------------------------------ ports --
def _lsof_owner(port: int) -> str | None:
    lsof = shutil.which("lsof")
    if lsof is None:
        return None
    out = subprocess.run(
        [lsof, "-nP", f"-iTCP:{port}", "-sTCP:LISTEN", "-Fpc"], capture_output=True, text=True, check=False
    ).stdout
    pid = re.search(r"^p(\d+)", out, re.M)
    cmd = re.search(r"^c(.+)", out, re.M)
    return f"pid {pid.group(1)} ({cmd.group(1) if cmd else '?'})" if pid else None


def port_owner(port: int) -> str | None:
    """'pid 1234 (nginx)' for the process listening on TCP `port`, when it can be found."""
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:  # macOS: other processes' sockets need root, lsof shows them
        return _lsof_owner(port)
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
            except psutil.Error:
                return f"pid {conn.pid} (?)"
    return None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: a port in TIME_WAIT is free for qemu (which sets it too); a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_ports(forwards: Mapping[str, Port]) -> None:
    """Raise PortInUseError naming every taken host port, its config key and (when found) the process."""
    taken = []
    for name, port in forwards.items():
        if not port_free(port.host):
            owner = port_owner(port.host)
            taken.append(
                f"host port {port.host} (vm.ports.{name}) is taken" + (f" by {owner}" if owner else "")
            )
    if taken:
        first = next(n for n, p in forwards.items() if not port_free(p.host))
        raise PortInUseError(
            "; ".join(taken),
            hint=f"stop that process or move the forward, e.g. INVOKE_VM_PORTS_{first.upper()}_HOST=<free port> "
            f"(or vm.ports.{first}.host in a -f YAML file); nothing was started",
        )


__all__ = ["alive", "check_ports", "cmdline", "find", "kill", "port_free", "port_owner", "started"]

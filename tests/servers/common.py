"""Small helpers shared by the server wrappers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (bound together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


#: The VM's forwards and their guest ports (invoke.yaml's vm.ports).
GUEST_PORTS = {"ssh": 22, "nomad": 4646, "app": 3000, "ingress": 8080, "traefik_dashboard": 8081,
               "ingress_https": 8443, "kafka": 19092, "postgres": 5432}  # fmt: skip


def vm_ports(**fixed: int) -> dict[str, dict[str, int]]:
    """`vm.ports` for a -f file: every forward on its own free host port (the defaults may be taken on this
    machine, e.g. by the user's own VM), `fixed` host ports kept. Kafka's guest port is its host port, as
    the configuration requires when the nomad part is on."""
    spare = iter(free_ports(len(GUEST_PORTS)))
    hosts = {name: fixed.get(name) or next(spare) for name in GUEST_PORTS}
    guests = GUEST_PORTS | {"kafka": hosts["kafka"]}
    return {name: {"host": hosts[name], "guest": guests[name]} for name in GUEST_PORTS}


def blank_vm_settings(tmp_path: Path) -> dict[str, object]:
    """`vm` settings of a VM that starts but never boots an OS: a blank 1 GiB qcow2 (made here), TCG, 1 vCPU,
    128 MiB, every forward on a free port."""
    image = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    return {
        "image": str(image),
        "accel": "tcg",
        "cpus": 1,
        "memory_mb": 128,
        "disk_gb": 2,
        "ports": vm_ports(),
    }


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket `pid` listens on, IPv4 and IPv6 (psutil reads the kernel's
    tables): found independently of infra.vm.host, so a test of the forwards does not trust the product."""
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def processes_of(state_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line names something in `state_dir` (qemu, qemu-img), the `inv` that
    made them and this process left out: found independently of infra.vm.lifecycle, so that a leftover the product
    cannot see is still caught."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        ours = proc.info["status"] != psutil.STATUS_ZOMBIE and any(str(state_dir) in a for a in cmdline)
        if ours and proc.pid != os.getpid() and not any(arg.endswith("inv") for arg in cmdline[:2]):
            found.append(proc)
    return found


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log at {path}: {exc})"


def stop_process(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Signal the process we started (by its PID), wait, SIGKILL if it does not exit. Returns its code."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return int(proc.returncode)


def wait_for(predicate: object, what: str, timeout: float, log: Path | None = None,
              proc: subprocess.Popen[bytes] | None = None) -> None:  # fmt: skip
    """Poll `predicate()` until true; raise with the log tail if it never is or the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what}: process {proc.pid} exited with {proc.returncode}\n{tail(log) if log else ''}"
            )
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f}s\n{tail(log) if log else ''}")

"""Small helpers shared by the server wrappers, and `ServerProcess`: how every real server the tests run is
started, awaited and stopped."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

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


#: The VM forwards' host ports come from below Linux's ephemeral port range (net.ipv4.ip_local_port_range,
#: 32768-60999 by default), from which the kernel hands a port to every bind to port 0 (free_port, the component
#: tier's servers) and to every outgoing connection on the machine. A port picked free inside that range can be
#: taken before qemu binds it, which may be a minute later: in a fresh-clone run (I1, 2026-12-06) the VM tier's
#: guest lost its postgres forward's port to a process of the component tier running beside it. Below the range
#: only an explicit bind takes a port.
PORT_FLOOR = 10000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems have no such file


def forward_ports(count: int) -> list[int]:
    """`count` consecutive host ports below the ephemeral range, each free now, and so are the ports a
    cluster's other nodes forward from them (+ infra.core.config.NODE_PORT_STEP per node, three nodes); free
    as `inv vm.run` itself judges a forward's port (infra.vm.host.port_free)."""
    from infra.core.config import NODE_PORT_STEP
    from infra.core.nodes import SERVERS
    from infra.vm.host import port_free

    steps = [NODE_PORT_STEP * k for k in range(SERVERS)]
    top = _ephemeral_low() - steps[-1] - count
    if top <= PORT_FLOOR:  # a system whose ephemeral range starts low: nothing below it to pick from
        return free_ports(count)
    rng = random.SystemRandom()
    for _ in range(1000):
        start = rng.randrange(PORT_FLOOR, top)
        ports = list(range(start, start + count))
        if all(port_free(port + step) for port in ports for step in steps):
            return ports
    raise RuntimeError(f"no {count} free host ports between {PORT_FLOOR} and {top} after 1000 tries")


def vm_ports(**fixed: int) -> dict[str, dict[str, int]]:
    """`vm.ports` for a -f file: every forward on its own free host port (the defaults may be taken on this
    machine, e.g. by the user's own VM), `fixed` host ports kept. Kafka's guest port is its host port, as
    the configuration requires when the nomad part is on."""
    spare = iter(forward_ports(len(GUEST_PORTS)))
    hosts = {name: fixed.get(name) or next(spare) for name in GUEST_PORTS}
    guests = GUEST_PORTS | {"kafka": hosts["kafka"]}
    return {name: {"host": hosts[name], "guest": guests[name]} for name in GUEST_PORTS}


#: A master boot record whose code is `cli; hlt; jmp $-3` (then the 0x55AA signature): the CPU stops for good.
HALT_MBR = bytes([0xFA, 0xF4, 0xEB, 0xFD]).ljust(510, b"\0") + b"\x55\xaa"


def blank_vm_settings(tmp_path: Path) -> dict[str, object]:
    """`vm` settings of a VM that starts but never boots an OS: a 1 GiB qcow2 (made here) that is blank but
    for a boot sector that halts the CPU, TCG, 1 vCPU, 128 MiB, every forward on a free port.

    Why the boot sector: on an all-blank disk SeaBIOS goes on to every other boot device, the NIC's iPXE ROM
    (DHCP, PXE) included, and under TCG that costs ~1.4 s of CPU per VM (measured); halted in the boot
    sector, the VM costs ~0.1 s. It is still a qemu that runs, answers QMP and ignores ACPI power-off."""
    image = tmp_path / "blank.qcow2"
    raw = tmp_path / "blank.raw"
    with raw.open("wb") as f:
        f.write(HALT_MBR)
        f.truncate(1 << 30)  # sparse: qemu-img copies only the boot sector
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True
    )
    raw.unlink()
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


def processes_of(state_dir: Path | str) -> list[psutil.Process]:
    """Live processes whose command line names something in `state_dir` (qemu, qemu-img; or a test's
    tmp_path: none may be left), the `inv` that made them and this process left out: found independently of
    infra.vm.lifecycle, so that a leftover the product cannot see is still caught."""
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


def wait_for(predicate: Callable[[], bool], what: str, timeout: float, log: Path | None = None,
              proc: subprocess.Popen[bytes] | None = None) -> None:  # fmt: skip
    """Poll `predicate()` until true; raise with the log tail if it never is or the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what}: process {proc.pid} exited with {proc.returncode}\n{tail(log) if log else ''}"
            )
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f}s\n{tail(log) if log else ''}")


S = TypeVar("S", bound="ServerProcess")


@dataclass
class ServerProcess:
    """A real server a test runs, in its own directory `root` (config, data, and its output in `log`).

    `launch` starts the process with its output in the log and polls `ready()` until the deadline (generous:
    the machine may be loaded), raising with the log's tail if it never answers or the process exits;
    `stop` signals it by the PID it was started with (SIGKILL if it lingers); `cleanup` stops it and
    removes its directory. A subclass says how to start (`start`), what its log is called (`name`), and
    how it likes to be stopped (`stop_signal`, `stop_timeout`).
    """

    root: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, kw_only=True)

    #: The log's name (`<name>.log`) and the prefix of a fresh directory (`<name>-XXXX`).
    name: ClassVar[str]
    stop_signal: ClassVar[int] = signal.SIGTERM
    stop_timeout: ClassVar[float] = 20

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def start(self) -> None:
        raise NotImplementedError

    def create(self) -> None:
        """What a fresh server needs to be running (postgres: initdb first)."""
        self.start()

    def launch(
        self,
        argv: list[str],
        *,
        what: str,
        ready: Callable[[], bool],
        timeout: float,
        env: Mapping[str, str] | None = None,
        ids: tuple[int, int] | None = None,
    ) -> None:
        """Start `argv` in `root` with its output in the log, then wait until `ready()` (`what` names it in
        the error). `ids`: (uid, gid) to run it as, with no supplementary groups."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                user=ids[0] if ids else None, group=ids[1] if ids else None,
                extra_groups=[] if ids else None,
            )  # fmt: skip
        wait_for(ready, what, timeout, self.log, self.proc)

    def stop(self) -> int | None:
        """Stop the process by its PID (`stop_signal`, SIGKILL after `stop_timeout`); its exit code, or None
        when it was not running."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, sig=self.stop_signal, timeout=self.stop_timeout)
        self.proc = None
        return code

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)

    def cleanup(self) -> None:
        """Stop it and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def started(kind: type[S], make: Callable[[Path], S] | None = None) -> S:
    """A fresh `kind` server in a new temporary directory (`make(root)` builds it when it needs more than
    the directory), created there (`create`); stopped and removed if that fails."""
    root = Path(tempfile.mkdtemp(prefix=f"{kind.name}-"))
    try:
        server = make(root) if make is not None else kind(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        server.create()
    except BaseException:
        server.cleanup()
        raise
    return server

"""The VM's lifecycle: run, stop, status, destroy.

Everything the VM owns sits in the state dir under the names of `infra.core.state` (overlay disk, seed ISO,
pidfile, serial log, QMP socket, qemu's own log, the `vm.json` launch record). The VM is found by its
pidfile or launch record, and accepted only when the process's command line carries our pidfile path (psutil),
so that garbage in the pidfile or a recycled pid is never mistaken for it; it is spoken to over its QMP
socket — never by searching process names.

Lifecycle commands (run, stop, destroy) hold the state dir's lock (`infra.vm.lock`), one at a time. A launch
is never cut in half: Ctrl-C during it is deferred until qemu is up and recorded, and a failed or
interrupted `run` kills the qemu it started before it deletes the overlay that qemu runs on.

`run` is idempotent: a running VM is reported and left alone. Before launching it checks every host port,
naming the port, its config key and the process holding it. `stop` asks the guest to power off (ACPI
`system_powerdown` over QMP), waits `vm.stop_timeout`, then kills; no pidfile or socket outlives qemu.
`destroy` removes the VM's files but never the image cache.

`run` boots the seed it is given: the caller makes it (`infra.vm.verbs` for `inv vm.run`, `infra.compose.stack` for
`inv up`) once `preparing` has told it whether the VM boots a baked image. Host processes and ports are
`infra.vm.host`, the monitor is `infra.vm.qmp`, the serial log is `infra.guest.console`; talking to the guest over SSH
is `infra.guest.ssh` (through `infra.vm.verbs`), which this module does not import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from infra.core import files, state, ui
from infra.core.config import Config, Port
from infra.core.errors import VMError, WaitTimeout
from infra.core.state import StatePaths
from infra.core.waits import Probe, wait_until
from infra.guest import console
from infra.vm import host, qemu, qmp
from infra.vm.lock import state_lock

if TYPE_CHECKING:
    from infra.vm.bakecache import Choice

GIB = 1024**3
#: Free space the state dir needs before a launch (the overlay grows as the guest writes; qemu's log, the
#: serial log and vm.json are written at once).
MIN_FREE = 256 * 2**20
#: unix socket paths longer than this do not fit sockaddr_un on Linux (108) / macOS (104).
MAX_SOCKET_PATH = 100


# ------------------------------------------------------------------------------------------- processes --
def _is_ours(argv: list[str] | None, p: StatePaths) -> bool:
    """A qemu launched for this state dir: its argv carries `-pidfile <our pidfile>` (a recycled pid does not)."""
    pidfile = str(p.pidfile)
    return argv is not None and any(a == "-pidfile" and b == pidfile for a, b in itertools.pairwise(argv))


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def running_pid(p: StatePaths) -> int | None:
    """The pid of OUR qemu, or None. Candidates: the pidfile, then the launch record (vm.json), then any
    process whose argv carries our pidfile path (a qemu whose pidfile was lost or never written); each is
    accepted only when its command line says it is ours, so garbage in the pidfile or a recycled pid never
    hides or impersonates the VM."""
    recorded = load_record(p, strict=False).get("pid")
    for pid in (read_pid(p.pidfile), recorded if isinstance(recorded, int) else None):
        if pid and _is_ours(host.cmdline(pid), p):
            return pid
    return host.find(lambda argv: _is_ours(argv, p))


def clear_stale(p: StatePaths) -> bool:
    """Remove a pidfile/QMP socket left by a qemu that no longer runs. True when something was removed."""
    if running_pid(p) is not None:
        return False
    removed = False
    for path in (p.pidfile, p.qmp_socket):
        if path.exists() or path.is_symlink():
            path.unlink()
            removed = True
    return removed


# ---------------------------------------------------------------------------------------------- launch --


@dataclass(frozen=True)
class Launch:
    """What `run` did: the record written to vm.json, and whether this call started the VM."""

    record: dict[str, Any]
    started: bool


def _qemu_img(*args: str) -> str:
    tool = shutil.which("qemu-img")
    if tool is None:
        raise VMError(
            "qemu-img not found on PATH", hint="apt-get install qemu-utils (macOS: brew install qemu)"
        )
    proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise VMError(f"qemu-img {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def image_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(_qemu_img("info", "-U", "--output=json", str(path)))
    return info


def ensure_overlay(disk: Path, base: Path, size_gb: int) -> bool:
    """A qcow2 overlay on `base` of at least `size_gb`; True when it was created now."""
    if disk.exists():
        info = image_info(disk)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if backing and Path(backing).resolve() != base.resolve():
            raise VMError(
                f"{disk} is an overlay on {backing}, but the configured base image is {base}",
                hint="`inv vm.destroy` to start over on the new image (the guest's disk is lost)",
            )
        if int(info.get("virtual-size", 0)) < size_gb * GIB:
            _qemu_img("resize", str(disk), f"{size_gb}G")
            ui.info(f"grew {disk.name} to {size_gb} GiB")
        return False
    base_format = image_info(base).get("format", "raw")
    if int(image_info(base).get("virtual-size", 0)) > size_gb * GIB:
        raise VMError(f"vm.disk_gb={size_gb} is smaller than the base image {base}", hint="raise vm.disk_gb")
    disk.parent.mkdir(parents=True, exist_ok=True)
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base.resolve()), str(disk), f"{size_gb}G"
    )
    return True


#: `qemu-img check` exit codes: 0 clean, 3 leaked clusters only (harmless), 63 format without checks (raw).
_CHECK_OK = (0, 3, 63)


def check_image(path: Path, what: str, fmt: str | None = None) -> None:
    """Refuse to boot an image that `qemu-img check` finds corrupt or cannot read (names the file)."""
    tool = shutil.which("qemu-img")
    if tool is None:
        raise VMError(
            "qemu-img not found on PATH", hint="apt-get install qemu-utils (macOS: brew install qemu)"
        )
    args = [tool, "check", "-q", *(["-f", fmt] if fmt else []), str(path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode in _CHECK_OK:
        return
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    if 'Failed to get shared "write" lock' in proc.stderr:
        raise VMError(
            f"{what} {path} is in use by another process (qemu-img check could not lock it)",
            details=lines,
            hint="a qemu or qemu-img that this project did not start has it open; stop that process first",
        )
    overlay = fmt == "qcow2"
    raise VMError(
        f"{what} {path} is corrupt or unreadable (qemu-img check exit {proc.returncode}): "
        + (lines[0] if lines else "no details"),
        details=lines[1:10],
        hint="`inv vm.destroy` discards the VM's disk (the guest's data is lost), then `inv vm.run`"
        if overlay
        else "delete it (a cached image is downloaded and verified again by the next `inv vm.run`) "
        "or point vm.image at a good one; nothing was started",
    )


def _backing(disk: Path) -> Path | None:
    """The image an existing overlay disk sits on (None: no disk, or no backing file)."""
    if not disk.exists():
        return None
    info = image_info(disk)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    return Path(backing) if backing else None


def _direct_boot(cfg: Config) -> tuple[Path | None, Path | None, str]:
    values = {"vm.kernel": cfg.vm.kernel, "vm.initrd": cfg.vm.initrd, "vm.append": cfg.vm.append}
    if not any(values.values()):
        return None, None, ""
    if not all(values.values()):
        missing = ", ".join(k for k, v in values.items() if not v)
        raise VMError(f"direct kernel boot needs vm.kernel, vm.initrd and vm.append; missing: {missing}")
    out = []
    for key in ("vm.kernel", "vm.initrd"):
        path = Path(os.path.expanduser(values[key]))
        path = path if path.is_absolute() else cfg.root / path
        if not path.is_file():
            raise VMError(f"configuration key {key}: no such file: {path}")
        out.append(path)
    return out[0], out[1], cfg.vm.append


#: vm.json's fields and their types (`_record`): a record of another shape is not used.
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "pid": (int,), "started_at": (int, float), "stopped_at": (int, float), "accel": (str,), "arch": (str,),
    "cpus": (int,), "memory_mb": (int,), "ports": (dict,), "image": (str,), "baked": (str, type(None)),
    "seed_iso": (str,), "instance_id": (str,), "command": (list,),
}  # fmt: skip


def _record_problem(record: Any) -> str | None:
    """What is wrong with the shape of a parsed vm.json, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__ if record is not None else 'null'}"
    for key, types in _RECORD_FIELDS.items():
        value = record.get(key)
        if key in record and (not isinstance(value, types) or isinstance(value, bool)):
            return f"{key!r} is {json.dumps(value)[:40]}, expected {' or '.join(t.__name__ for t in types)}"
    for name, forward in record.get("ports", {}).items():
        if not (isinstance(forward, dict) and all(type(forward.get(k)) is int for k in ("host", "guest"))):
            return f"ports.{name} is {json.dumps(forward)[:40]}, expected {{host: int, guest: int}}"
    return None


def load_record(p: StatePaths, *, strict: bool = True) -> dict[str, Any]:
    """vm.json, the launch record ({} when absent or not JSON). Valid JSON of the wrong shape (`null`, a
    list, a string pid) is a VMError naming the file; `strict=False` reads it as {} instead, for what must
    work whatever the file holds: finding the VM, vm.stop, vm.destroy."""
    try:
        record = json.loads(p.vm_record.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    problem = _record_problem(record)
    if problem is None:
        return typing.cast(dict[str, Any], record)
    if not strict:
        return {}
    raise VMError(
        f"the launch record {p.vm_record} is not valid: {problem}",
        hint="`inv vm.stop` and `inv vm.destroy` work regardless; delete the file when no VM runs",
    )


def boots_baked(cfg: Config) -> bool:
    """Whether the VM boots a baked image, known before anything is checked or downloaded (for `inv up`, which
    makes the seed first): an existing disk keeps the image it was made on (its launch record says which), a
    new one gets the bake matching the configuration when there is one (vm.baked). `preparing` decides."""
    p = StatePaths.of(cfg)
    if p.disk.exists():
        return bool(load_record(p).get("baked"))
    if cfg.vm.baked == "off":
        return False
    from infra.vm import bakecache

    return bakecache.find(cfg, bakecache.current_key(cfg)[0]) is not None


class SeedISO(Protocol):
    """The seed the VM boots with (infra.guest.seed.SeedResult): made by the caller, for `Boot.baked`."""

    @property
    def path(self) -> Path: ...

    @property
    def instance_id(self) -> str: ...

    @property
    def baked(self) -> bool: ...


@dataclass(frozen=True)
class Running:
    """What `preparing` found: the VM runs already (pid, launch record)."""

    cfg: Config
    pid: int
    record: dict[str, Any]

    @property
    def baked(self) -> bool:
        """Its disk was made on a baked image: its seed is the baked one."""
        return boots_baked(self.cfg)


@dataclass(frozen=True)
class Boot:
    """What `preparing` found: everything checked and chosen for a launch, short of the seed."""

    cfg: Config
    p: StatePaths
    choice: Choice
    platform: qemu.Platform
    arch: str
    binary: str
    direct: tuple[Path | None, Path | None, str]
    base: Path
    disk_existed: bool

    @property
    def baked(self) -> bool:
        """The VM boots a baked image: the caller makes the seed for it (infra.guest.seed, `baked=`)."""
        return self.choice.key is not None


@contextlib.contextmanager
def preparing(cfg: Config) -> Iterator[Running | Boot]:
    """The first half of `inv vm.run`, holding the state dir's lock until the caller's `run` is done: is the
    VM running already, else the host checks (qemu, ports, socket path), the base image and which image the
    VM boots (a bake or the base: `.baked` says which seed the caller makes)."""
    p = StatePaths.of(cfg)
    with state_lock(p, "vm.run", cfg.vm.lock_timeout):
        yield _prepare(cfg, p)


def _prepare(cfg: Config, p: StatePaths) -> Running | Boot:
    pid = running_pid(p)
    if pid is not None:
        return Running(cfg, pid, load_record(p))
    # qemu and qemu-img open these by name and would follow a link: none may be one (infra/core/files.py)
    files.no_links(p.root, state.NAMES, "state dir entry", error=VMError)
    free = shutil.disk_usage(p.root).free
    if free < MIN_FREE:  # a guest whose overlay cannot grow is paused by qemu (io-error), not stopped
        raise VMError(
            f"disk full: {p.root} has {free // 2**20} MiB free; the VM's overlay disk, logs and records "
            f"grow there (at least {MIN_FREE // 2**20} MiB needed to start)",
            hint="free space on that filesystem or point project.state_dir elsewhere; nothing was started",
        )
    if clear_stale(p):
        ui.info(f"removed a stale pidfile/QMP socket of a qemu that no longer runs ({p.root})")

    platform = qemu.Platform.current()
    arch = qemu.guest_arch(cfg.vm.arch, platform)
    binary = qemu.find_qemu(cfg.vm.qemu, arch)
    direct = _direct_boot(cfg)
    if len(str(p.qmp_socket)) > MAX_SOCKET_PATH:
        raise VMError(
            f"state dir path too long for a unix socket: {p.qmp_socket}",
            hint="use a shorter project.state_dir",
        )
    if (
        cfg.node is not None
    ):  # a cluster node: the private network's switch must be up (infra.vm.verbs starts it)
        control = cfg.node.switch / "ctl"
        if len(str(control)) > MAX_SOCKET_PATH:
            raise VMError(
                f"state dir path too long for a unix socket: {control}",
                hint="use a shorter project.state_dir",
            )
        if not control.exists():
            raise VMError(
                f"the cluster network switch is not running (no {control})",
                hint="`inv vm.run` starts it with the nodes",
            )
    host.check_ports(cfg.vm.ports)
    from infra.vm import baseimages  # the download cache (requests): loaded only when a VM is launched

    base = baseimages.ensure(cfg, arch)
    check_image(base, "base image")
    disk_existed = p.disk.exists()
    if disk_existed:
        check_image(p.disk, "VM disk (overlay)", fmt="qcow2")
    from infra.vm import bakecache  # its key reads the job specs (hcl2): loaded only when a VM is launched

    choice = bakecache.choose(cfg, arch, base, _backing(p.disk))  # vm.baked: a matching bake, or the base
    if choice.key is not None:
        check_image(choice.image, "baked image", fmt="qcow2")
    return Boot(cfg, p, choice, platform, arch, binary, direct, base, disk_existed)


def run(prepared: Running | Boot, seed: SeedISO | None) -> Launch:
    """`inv vm.run`'s second half, inside `preparing`: boot the VM daemonized on `seed`, the seed ISO made
    for `prepared.baked`; a no-op (reported) when the VM already runs (`seed` may then be None)."""
    cfg = prepared.cfg
    if isinstance(prepared, Running):
        record = prepared.record
        ui.skip(f"VM already running (pid {prepared.pid}, accel {record.get('accel', '?')}); nothing changed")
        wanted = {n: {"host": f.host, "guest": f.guest} for n, f in cfg.vm.ports.items()}
        if record.get("ports") and record["ports"] != wanted:
            ui.warn(
                "the running VM has other port forwards than the configuration: `inv vm.stop` then `inv vm.run`"
            )
        return Launch(record, started=False)
    if seed is None or seed.baked != prepared.baked:
        raise TypeError(
            f"vm.run: the VM boots {prepared.choice.reason}; it needs a seed made for it, not {seed}"
        )
    b, p, choice = prepared, prepared.p, prepared.choice
    kernel, initrd, append = b.direct
    firmware = qemu.find_firmware(b.binary) if b.arch == "aarch64" and kernel is None else None

    try:
        if ensure_overlay(p.disk, choice.image, cfg.vm.disk_gb):
            p.known_hosts.unlink(missing_ok=True)  # a new disk has new SSH host keys
        accel, reason = qemu.resolve_accel(
            cfg.vm.accel,
            b.arch,
            b.platform,
            probe=lambda: qemu.kvm_probe(qemu.ProbeBoot(b.binary, p.disk, kernel, initrd, append)),
            cache=cfg.project.cache_dir / state.KVM_PROBE_CACHE,
        )
        spec = qemu.LaunchSpec(
            qemu=b.binary, arch=b.arch, accel=accel, cpus=cfg.vm.cpus, memory_mb=cfg.vm.memory_mb,
            disk=p.disk, seed_iso=seed.path, pidfile=p.pidfile, serial_log=p.serial_log, qmp_socket=p.qmp_socket,
            forwards=cfg.vm.ports, name=cfg.project.name, kernel=kernel, initrd=initrd, append=append,
            firmware=firmware, offline=cfg.vm.offline,
            cluster_nic=qemu.ClusterNIC(cfg.node.switch, cfg.node.mac, cfg.node.primary_mac) if cfg.node is not None else None,
        )  # fmt: skip
        command = qemu.build_command(spec)
        # From here on Ctrl-C waits: qemu started => qemu recorded and reported, or killed by the cleanup.
        with _interrupts_deferred():
            pid = _launch(command, p)
            record = _record(b, pid, accel, reason, seed, command)
            forwards = ", ".join(f"{n} 127.0.0.1:{f.host}->{f.guest}" for n, f in cfg.vm.ports.items())
            who = f"node {cfg.node.name} ({cfg.node.address})" if cfg.node is not None else "VM"
            ui.ok(f"{who} started: pid {pid}, {accel} ({reason}), {cfg.vm.cpus} vCPU, {cfg.vm.memory_mb} MiB")
            ui.info(f"    image: {choice.reason}: {choice.image}")
            ui.info(
                f"    forwards: {forwards}"
                + ("; offline: no route out of the guest" if cfg.vm.offline else "")
            )
            ui.info(f"    serial log: {p.serial_log}  (inv vm.logs); next: inv vm.check")
    except BaseException:
        _discard_launch(p, remove_disk=not b.disk_existed)
        raise
    return Launch(record, started=True)


def _record(b: Boot, pid: int, accel: str, reason: str, seed: SeedISO, command: list[str]) -> dict[str, Any]:
    """Write vm.json, the launch record: what runs and how it was started (ports, accel, command)."""
    cfg, p = b.cfg, b.p
    record = {
        "pid": pid,
        "started_at": time.time(),
        "accel": accel,
        "accel_reason": reason,
        "arch": b.arch,
        "cpus": cfg.vm.cpus,
        "memory_mb": cfg.vm.memory_mb,
        "ports": {n: {"host": f.host, "guest": f.guest} for n, f in cfg.vm.ports.items()},
        "image": str(b.choice.image),
        "base_image": str(b.base),
        "baked": b.choice.key,
        "disk": str(p.disk),
        "seed_iso": str(seed.path),
        "instance_id": seed.instance_id,
        "direct_kernel_boot": b.direct[0] is not None,
        "command": command,
    }
    if cfg.node is not None:
        record |= {"node": cfg.node.name, "cluster_address": cfg.node.address}
    files.write_atomic(
        p.vm_record, (json.dumps(record, indent=2) + "\n").encode(), "launch record", error=VMError
    )
    return record


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt: the launch between
    starting qemu and recording it is never cut in half (qemu gets default signal handling: exec resets it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    if previous is None:  # a handler not installed from Python: restore the default
        previous = signal.SIG_DFL
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt from None
        raise
    signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _discard_launch(p: StatePaths, *, remove_disk: bool) -> None:
    """After a failed or interrupted `run`: kill the qemu it launched (found by pidfile, record or command
    line), then remove what that qemu used — never the other way round (a qemu on a deleted overlay)."""
    pid = running_pid(p)
    if pid is not None:
        _kill(pid)
    for path in (p.pidfile, p.qmp_socket):
        path.unlink(missing_ok=True)
    if "stopped_at" not in load_record(
        p, strict=False
    ):  # written by this launch (or a crashed one): no VM runs
        p.vm_record.unlink(missing_ok=True)
    if remove_disk:
        p.disk.unlink(missing_ok=True)


def _launch(command: list[str], p: StatePaths) -> int:
    for stale in (p.pidfile, p.qmp_socket):
        stale.unlink(missing_ok=True)
    ui.debug("$ " + " ".join(command))
    log_fd = files.open_nofollow(p.qemu_log, "qemu log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, error=VMError)
    with os.fdopen(log_fd, "w") as log:
        try:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
        except OSError as exc:
            raise VMError(files.failed(f"cannot write the qemu log {p.qemu_log}", exc)) from None
        try:
            # -daemonize: this returns once qemu is initialized (ports bound, files open) and forked away.
            proc = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=120, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise VMError("qemu did not finish starting within 120 s", log=p.qemu_log) from exc
    if proc.returncode != 0:
        lines = [ln for ln in p.qemu_log.read_text(errors="replace").splitlines()[1:] if ln.strip()]
        hint = "see the qemu log"
        text = "\n".join(lines)
        if "host forwarding rule" in text or "Address already in use" in text:
            hint = "a forwarded port was taken in the meantime; check vm.ports"
        elif "kvm" in text.lower():
            hint = "KVM failed: set vm.accel=tcg (INVOKE_VM_ACCEL=tcg)"
        for stale in (p.pidfile, p.qmp_socket):
            stale.unlink(missing_ok=True)
        raise VMError(
            f"qemu failed to start (exit {proc.returncode})", details=lines[-10:], log=p.qemu_log, hint=hint
        )
    pid = read_pid(p.pidfile)
    if pid is None or not host.alive(pid):
        raise VMError(
            "qemu exited right after starting", log=p.qemu_log, details=console.tail(p.serial_log, 20)
        )
    return pid


# ------------------------------------------------------------------------------------------------ stop --


def stop(cfg: Config, timeout: float | None = None) -> bool:
    """`inv vm.stop`: ACPI power-off over QMP, wait, then SIGTERM/SIGKILL. True when a VM was stopped.
    It always ends with the VM gone: a qemu that does not answer QMP (stopped, hung, a socket speaking
    garbage) is killed, and only a process that survives SIGKILL is an error."""
    p = StatePaths.of(cfg)
    if not p.root.is_dir():
        ui.skip("VM is not running")
        return False
    with state_lock(p, "vm.stop", cfg.vm.lock_timeout):
        return _stop(cfg, p, timeout)


def _stop(cfg: Config, p: StatePaths, timeout: float | None, *, record: bool = True) -> bool:
    pid = running_pid(p)
    if pid is None:
        if clear_stale(p):
            ui.info("removed a stale pidfile/QMP socket")
        ui.skip("VM is not running")
        return False
    limit = cfg.vm.stop_timeout if timeout is None else timeout
    powered_off = False
    if limit > 0:
        try:
            powered_off = _acpi_power_off(p, pid, limit)
            if not powered_off:
                ui.warn(f"the guest did not power off within {limit:.0f}s; killing qemu (pid {pid})")
        except VMError as exc:
            ui.warn(f"{exc}; killing qemu (pid {pid})")
    if not powered_off:
        _kill(pid)
    for path in (p.pidfile, p.qmp_socket):
        path.unlink(missing_ok=True)
    launched = load_record(p, strict=False) if record else {}
    if launched:
        launched["stopped_at"] = time.time()
        text = json.dumps(launched, indent=2) + "\n"
        files.write_atomic(p.vm_record, text.encode(), "launch record", error=VMError)
    ui.ok(f"VM stopped ({'ACPI power-off' if powered_off else 'killed'}, pid {pid})")
    return True


#: A power-button press that arrives before the guest's systemd-logind runs is lost: press again this often.
ACPI_REPEAT = 10.0
#: Seconds a QMP exchange may take; qemu answers in milliseconds unless it is stopped (SIGSTOP) or hung.
QMP_TIMEOUT = 5.0


def _acpi_power_off(p: StatePaths, pid: int, limit: float) -> bool:
    """Press the ACPI power button (QMP system_powerdown) until qemu exits or `limit` passes."""
    pressed = [time.monotonic()]
    answer = min(QMP_TIMEOUT, limit)  # a stopped or hung qemu accepts the connection and never answers
    qmp.execute(p.qmp_socket, "system_powerdown", timeout=answer)

    def probe(_d: object) -> Probe[None]:
        if not host.alive(pid):
            return Probe(True, "powered off")
        if time.monotonic() - pressed[-1] >= ACPI_REPEAT:
            with contextlib.suppress(VMError):  # qemu may be exiting right now
                qmp.execute(p.qmp_socket, "system_powerdown", timeout=answer)
            pressed.append(time.monotonic())
        return Probe(False, f"guest shutting down (power button pressed {len(pressed)}x)")

    try:
        wait_until(probe, what=f"VM (pid {pid}) to power off (ACPI)", timeout=limit, interval=0.5)
    except WaitTimeout:
        return False
    return True


# ---------------------------------------------------------------------------------------- run state --
#: What each of qemu's run states other than "running" means (qapi/run-state.json, RunState): the guest
#: executes nothing in them, and waiting does not change that.
HALTED = {
    "io-error": "qemu paused the guest after a write to its disk failed",
    "paused": "the guest is paused (qemu's `stop`, over QMP or its monitor)",
    "prelaunch": "qemu has not started the guest yet (launched with -S)",
    "internal-error": "qemu stopped the guest after an internal error (e.g. of the accelerator)",
    "guest-panicked": "the guest kernel panicked (pvpanic)",
    "shutdown": "the guest shut down and qemu keeps it stopped",
    "suspended": "the guest is suspended to RAM (S3)",
    "watchdog": "the guest's watchdog fired and paused it",
    "debug": "a debugger holds the guest",
}


def run_state(p: StatePaths) -> str:
    """qemu's run state of the guest, asked over QMP (query-status: "running", "paused", "io-error", ...).
    VMError when qemu does not answer."""
    answer = qmp.execute(p.qmp_socket, "query-status", timeout=QMP_TIMEOUT)
    status = answer.get("status") if isinstance(answer, dict) else None
    if not isinstance(status, str):
        raise VMError(f"QMP query-status on {p.qmp_socket} answered without a status: {str(answer)[:80]}")
    return status


def halted(p: StatePaths, status: str) -> VMError:
    """The error for a guest that qemu keeps from running, naming the host disk when a write failed (a full
    filesystem under the state dir: qemu's default werror=enospc pauses the guest, query-status io-error)."""
    what = HALTED.get(status, "the guest is not running")
    if status != "io-error":
        return VMError(
            f"the VM does not run: {what} (qemu run state {status})",
            hint="`inv vm.stop` then `inv vm.run` starts it again",
        )
    mount = _mount_point(p.disk)
    try:
        usage = shutil.disk_usage(mount)
        free = f"{usage.free / 2**20:.0f} MiB free of {usage.total / 2**30:.1f} GiB"
    except OSError as exc:
        free = f"free space unknown: {exc.strerror or exc}"
    return VMError(
        f"the VM is paused: {what} (qemu run state io-error); its disk {p.disk} is on the host "
        f"filesystem {mount} ({free}), which is probably full",
        hint=f"free space on {mount} (or move project.state_dir), then `inv vm.stop` and `inv vm.run`",
    )


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def require_guest_running(p: StatePaths) -> None:
    """VMError when qemu says it holds the guest (paused, io-error, prelaunch, ...); for the waits on it.
    A qemu that does not answer QMP tells nothing: the wait goes on (its own deadline and the liveness
    check still apply)."""
    try:
        status = run_state(p)
    except VMError as exc:
        ui.debug(f"qemu's run state unknown: {exc.message}")
        return
    if status != "running":
        raise halted(p, status)


def _kill(pid: int) -> None:
    if not host.kill(pid):
        raise VMError(f"qemu (pid {pid}) survived SIGKILL", hint=f"check `ps -p {pid}`")


# -------------------------------------------------------------------------------------- status / logs --


def status(cfg: Config) -> dict[str, Any]:
    """Running? pid, forwards, acceleration, uptime, image (from the launch record; `infra.vm.verbs` adds the
    guest's cloud-init state)."""
    p = StatePaths.of(cfg)
    pid = running_pid(p)
    record = load_record(p)
    info: dict[str, Any] = {"running": pid is not None, "state_dir": str(p.root)}
    if cfg.node is not None:
        info |= {"name": cfg.node.name, "cluster_address": cfg.node.address}
    if pid is None:
        info["disk"] = str(p.disk) if p.disk.exists() else None
        return info
    started = float(record.get("started_at", 0)) or None
    try:
        state = run_state(p)
        problem = halted(p, state) if state != "running" else None
    except VMError as exc:  # qemu does not answer (stopped, hung): say so rather than "running"
        state, problem = "unknown", exc
    info |= {
        "run_state": state,
        "problem": problem.message if problem else None,
        "hint": problem.hint if problem else None,
        "pid": pid,
        "accel": record.get("accel"),
        "arch": record.get("arch"),
        "uptime_s": round(time.time() - started) if started else None,
        "ports": record.get("ports", {}),
        "instance_id": record.get("instance_id"),
        "image": record.get("image"),
        "baked": record.get("baked"),
        "serial_log": str(p.serial_log),
    }
    return info


def logs_path(cfg: Config) -> Path:
    path = StatePaths.of(cfg).serial_log
    if not path.exists():
        raise VMError(f"no serial log at {path}", hint="the VM has not been started here: inv vm.run")
    return path


# --------------------------------------------------------------------------------------------- destroy --

#: Files of the VM in the state dir. The image cache lives elsewhere (project.cache_dir) and is kept.
VM_FILES = ("seed_iso", "user_data", "disk", "pidfile", "serial_log", "qmp_socket", "qemu_log", "vm_record",
            "deployed", "vm_checked")  # fmt: skip


def destroy(cfg: Config) -> list[Path]:
    """`inv vm.destroy`: stop the VM, delete its disk, seed ISO, keys and records. Returns what was removed."""
    p = StatePaths.of(cfg)
    if not p.root.is_dir():
        ui.ok(f"VM destroyed: nothing to remove ({p.root} does not exist)")
        return []
    with state_lock(p, "vm.destroy", cfg.vm.lock_timeout):
        return _destroy(cfg, p)


def _destroy(cfg: Config, p: StatePaths) -> list[Path]:
    # The lock claimed the dir (infra.core.state: it holds the marker, or only the tool's names): only those
    # names are removed, each without following a link (unlink removes a link, never its target).
    _stop(cfg, p, timeout=0, record=False)  # the disk is deleted next: no graceful guest shutdown
    removed = []
    for name in VM_FILES:
        path: Path = getattr(p, name)
        if path.exists() or path.is_symlink():
            path.unlink()
            removed.append(path)
    ssh_dir = p.ssh_key.parent
    if ssh_dir.is_symlink():
        ssh_dir.unlink()
        removed.append(ssh_dir)
    elif ssh_dir.exists():
        shutil.rmtree(ssh_dir)
        removed.append(ssh_dir)
    p.lock.unlink(missing_ok=True)  # still held by us: a waiter notices the new file (infra.vm.lock)
    if [entry.name for entry in p.root.iterdir()] == [p.marker.name]:
        p.marker.unlink()
        with contextlib.suppress(OSError):
            p.root.rmdir()  # only when nothing else is left in it
    ui.ok(
        f"VM destroyed: removed {len(removed)} item(s) from {p.root}; image cache kept ({cfg.project.cache_dir})"
    )
    return removed


def reach(cfg: Config) -> Config:
    """`cfg` with the forwards the running VM was launched with (vm.json), for every task that talks to it:
    a port moved for one `vm.run` (INVOKE_VM_PORTS_SSH_HOST=2223) is where the VM answers until it stops."""
    p = StatePaths.of(cfg)
    ports = load_record(p).get("ports")
    if not isinstance(ports, dict) or running_pid(p) is None:
        return cfg
    try:
        launched = {name: Port(int(f["host"]), int(f["guest"])) for name, f in ports.items()}
    except (KeyError, TypeError, ValueError):
        return cfg
    if launched == cfg.vm.ports:
        return cfg
    return dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, ports=launched))


def require_running(cfg: Config) -> StatePaths:
    """The state paths of the running VM; VMError when it does not run."""
    p = StatePaths.of(cfg)
    if running_pid(p) is None:
        raise VMError("the VM is not running", hint="start it with `inv vm.run` (or `inv up`)")
    return p


__all__ = [
    "Boot", "Launch", "Running", "SeedISO", "boots_baked", "check_image", "clear_stale", "destroy",
    "ensure_overlay", "halted", "image_info", "load_record", "logs_path", "preparing", "reach",
    "require_guest_running", "require_running", "run", "run_state", "running_pid", "status", "stop",
]  # fmt: skip

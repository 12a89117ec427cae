"""The VM's lifecycle: boot (after `preparing`), stop, facts (its status), destroy.

Everything the VM owns sits in the state dir under the names of `infra/core/state.py` (overlay disk, seed
ISO, pidfile, serial log, QMP socket, qemu's own log, the `vm.json` launch record). Which qemu is ours, its
record and its run state are `infra/vm/instance.py`; the disks' qemu-img work is `infra/vm/qemuimg.py`.

Lifecycle commands (boot, stop, destroy) hold the state dir's lock (`infra/vm/lock.py`), one at a time. A
launch is never cut in half: Ctrl-C during it is deferred until qemu is up and recorded, and a failed or
interrupted `boot` kills the qemu it started before it deletes the overlay that qemu runs on.

`boot` is idempotent: a running VM is reported and left alone. Before launching it checks every host port,
naming the port, its config key and the process holding it. `stop` asks the guest to power off (ACPI
`system_powerdown` over QMP), waits `vm.stop_timeout`, then kills; no pidfile or socket outlives qemu.
`destroy` removes the VM's files but never the image cache.

`boot` boots the seed it is given: the caller (`infra/vm/verbs.py`, for `inv vm.run` and the VM step of
`inv up`) makes it for the image `preparing` boots, a bake or the base (`inv up` chooses that image first,
`boots_baked`, and passes the choice to `preparing`). Host processes and ports are `infra/vm/host.py`, the
monitor `infra/vm/qmp.py`, the serial log `infra/guest/console.py`; talking to the guest over SSH is
`infra/guest/ssh.py` (through the verbs), which this module does not import.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from infra.core import files, state, ui
from infra.core.config import Config
from infra.core.errors import VMError, WaitTimeout
from infra.core.state import StatePaths
from infra.core.waits import Probe, wait_until
from infra.guest import console
from infra.vm import host, instance, qemu, qemuimg, qmp
from infra.vm.lock import state_lock

if TYPE_CHECKING:
    from infra.vm.bakecache import Choice

#: Free space the state dir needs before a launch (the overlay grows as the guest writes; qemu's log, the
#: serial log and vm.json are written at once).
MIN_FREE = 256 * 2**20
#: unix socket paths longer than this do not fit sockaddr_un on Linux (108) / macOS (104).
MAX_SOCKET_PATH = 100


# ---------------------------------------------------------------------------------------------- launch --


@dataclass(frozen=True)
class Launch:
    """What `boot` did: the record written to vm.json, and whether this call started the VM."""

    record: dict[str, Any]
    started: bool


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


def boots_baked(cfg: Config) -> bool:
    """Whether the VM boots a baked image, known before anything is checked or downloaded (for `inv up`, which
    makes the seed first): an existing disk keeps the image it was made on (its launch record says which), a
    new one gets the bake matching the configuration when there is one (vm.baked). Chosen so, the answer is
    passed down to `preparing` (`baked=`), which boots that image."""
    p = StatePaths.of(cfg)
    if p.disk.exists():
        return bool(instance.load_record(p).get("baked"))
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
def preparing(cfg: Config, *, baked: bool | None = None) -> Iterator[Running | Boot]:
    """The first half of `inv vm.run`, holding the state dir's lock until the caller's `boot` is done: is the
    VM running already, else the host checks (qemu, ports, socket path), the base image and which image the
    VM boots (a bake or the base: `.baked` says which seed the caller makes), or the one the caller chose
    already (`baked`, from `boots_baked`: its seed is made)."""
    p = StatePaths.of(cfg)
    with state_lock(p, "vm.run", cfg.vm.lock_timeout):
        yield _prepare(cfg, p, baked)


def _prepare(cfg: Config, p: StatePaths, baked: bool | None) -> Running | Boot:
    pid = instance.running_pid(p)
    if pid is not None:
        return Running(cfg, pid, instance.load_record(p))
    # qemu and qemu-img open these by name and would follow a link: none may be one (infra/core/files.py)
    files.no_links(p.root, state.NAMES, "state dir entry", error=VMError)
    free = shutil.disk_usage(p.root).free
    if free < MIN_FREE:  # a guest whose overlay cannot grow is paused by qemu (io-error), not stopped
        raise VMError(
            f"disk full: {p.root} has {free // 2**20} MiB free; the VM's overlay disk, logs and records "
            f"grow there (at least {MIN_FREE // 2**20} MiB needed to start)",
            hint="free space on that filesystem or point project.state_dir elsewhere; nothing was started",
        )
    if instance.clear_stale(p):
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
    qemuimg.check_image(base, "base image")
    disk_existed = p.disk.exists()
    if disk_existed:
        qemuimg.check_image(p.disk, "VM disk (overlay)", fmt="qcow2")
    from infra.vm import bakecache  # its key reads the job specs (hcl2): loaded only when a VM is launched

    choice = bakecache.choose(
        cfg, arch, base, qemuimg.backing(p.disk), baked=baked
    )  # vm.baked: a matching bake, or the base
    if choice.key is not None:
        qemuimg.check_image(choice.image, "baked image", fmt="qcow2")
    return Boot(cfg, p, choice, platform, arch, binary, direct, base, disk_existed)


def boot(prepared: Running | Boot, seed: SeedISO | None) -> Launch:
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
        if qemuimg.ensure_overlay(p.disk, choice.image, cfg.vm.disk_gb):
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
            firmware=firmware, offline=cfg.vm.offline, cpu=cfg.vm.cpu,
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
    """After a failed or interrupted `boot`: kill the qemu it launched (found by pidfile, record or command
    line), then remove what that qemu used — never the other way round (a qemu on a deleted overlay)."""
    pid = instance.running_pid(p)
    if pid is not None:
        _kill(pid)
    for path in (p.pidfile, p.qmp_socket):
        path.unlink(missing_ok=True)
    if "stopped_at" not in instance.load_record(
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
    pid = instance.read_pid(p.pidfile)
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
    pid = instance.running_pid(p)
    if pid is None:
        if instance.clear_stale(p):
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
    launched = instance.load_record(p, strict=False) if record else {}
    if launched:
        launched["stopped_at"] = time.time()
        text = json.dumps(launched, indent=2) + "\n"
        files.write_atomic(p.vm_record, text.encode(), "launch record", error=VMError)
    ui.ok(f"VM stopped ({'ACPI power-off' if powered_off else 'killed'}, pid {pid})")
    return True


#: A power-button press that arrives before the guest's systemd-logind runs is lost: press again this often.
ACPI_REPEAT = 10.0


def _acpi_power_off(p: StatePaths, pid: int, limit: float) -> bool:
    """Press the ACPI power button (QMP system_powerdown) until qemu exits or `limit` passes."""
    pressed = [time.monotonic()]
    answer = min(
        instance.QMP_TIMEOUT, limit
    )  # a stopped or hung qemu accepts the connection and never answers
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


def _kill(pid: int) -> None:
    if not host.kill(pid):
        raise VMError(f"qemu (pid {pid}) survived SIGKILL", hint=f"check `ps -p {pid}`")


# -------------------------------------------------------------------------------------- status / logs --


def facts(cfg: Config) -> dict[str, Any]:
    """Running? pid, forwards, acceleration, uptime, image (from the launch record; `infra.vm.verbs` adds the
    guest's cloud-init state)."""
    p = StatePaths.of(cfg)
    pid = instance.running_pid(p)
    record = instance.load_record(p)
    info: dict[str, Any] = {"running": pid is not None, "state_dir": str(p.root)}
    if cfg.node is not None:
        info |= {"name": cfg.node.name, "cluster_address": cfg.node.address}
    if pid is None:
        info["disk"] = str(p.disk) if p.disk.exists() else None
        return info
    started = float(record.get("started_at", 0)) or None
    try:
        state = instance.run_state(p)
        problem = instance.halted(p, state) if state != "running" else None
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


__all__ = [
    "Boot", "Launch", "Running", "SeedISO", "boot", "boots_baked", "destroy", "facts", "logs_path", "preparing", "stop",
]  # fmt: skip

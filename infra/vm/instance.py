"""Finding the VM of a state dir: its launch record (vm.json), its qemu process and qemu's run state.

The VM is the process whose command line carries `-pidfile <our pidfile>` (psutil): found through the
pidfile, else the launch record's pid, else a scan of command lines, so that garbage in the pidfile or a
recycled pid is never taken for it and a qemu whose pidfile was lost is still found. It is asked for its
run state over its QMP socket — never found by searching process names. Tasks that talk to a running VM use
the forwards it was launched with (`reach`), not the current configuration.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import typing
from pathlib import Path
from typing import Any

from infra.core import ui
from infra.core.config import Config, Port
from infra.core.errors import VMError
from infra.core.state import StatePaths
from infra.vm import host, qmp

#: Seconds a QMP exchange may take; qemu answers in milliseconds unless it is stopped (SIGSTOP) or hung.
QMP_TIMEOUT = 5.0


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
    "HALTED", "QMP_TIMEOUT", "clear_stale", "halted", "load_record", "reach", "read_pid", "require_guest_running",
    "require_running", "run_state", "running_pid",
]  # fmt: skip

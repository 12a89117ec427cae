"""The VM verbs that need more than its lifecycle: `inv vm.run` (the seed made once, then the VM booted on
it), and the verbs that talk to the running guest over SSH (`vm.check`, `vm.ssh`, the cloud-init state of
`vm.status`).

A good `vm.check` is remembered for the boot it checked (<state>/vm-checked.json): the qemu process (pid and
start time), the guest's boot id, and how long the serial log was. `inv up` on a running VM and `inv
vm.status` take that memory instead of logging in again while the same qemu runs and its console shows no
restart of the guest (a finished cloud-init's verdict cannot change during a boot); `inv vm.check` always
checks for real. A failed check is never remembered, and a new check replaces the memory.

It composes `infra.vm` (lifecycle), `infra.seed` (the seed ISO) and `infra.remote` (SSH), so that none of
those imports another: the VM layer flows one way, from here down. Results are returned; `tasks.py` prints.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from infra import console, files, host, remote, ui, vm
from infra.config import Config
from infra.errors import VMError
from infra.state import StatePaths

if TYPE_CHECKING:  # the seed (jsonschema, pycdlib, hcl2) is loaded by `run` alone
    from infra import seed


@dataclass(frozen=True)
class Booted:
    """What `run` did: the launch, and the seed it made (None: the VM was running already)."""

    launch: vm.Launch
    seed: seed.SeedResult | None


def run(cfg: Config) -> Booted:
    """`inv vm.run`: a running VM is left alone (and its seed with it); otherwise the seed is refreshed for
    the image the VM boots (keeping the previous seed's key, see `seed.refresh`) and the VM booted on it."""
    from infra import seed

    with vm.preparing(cfg) as prepared:
        made = None if isinstance(prepared, vm.Running) else seed.refresh(cfg, baked=prepared.baked)
        return Booted(vm.run(prepared, made), made)


def check(cfg: Config) -> remote.CheckReport:
    """`inv vm.check`: the checks of infra.remote against the running VM (its forwards, its start time),
    always for real; a good outcome is remembered for this boot (`remembered`)."""
    p = vm.require_running(cfg)
    vm.require_guest_running(p)  # a paused guest is not a slow boot: fails at once, naming why
    boot = _qemu_boot(p)
    p.vm_checked.unlink(missing_ok=True)  # forgotten until this check passes: a failure is never remembered

    def alive() -> (
        bool
    ):  # qemu runs, and runs the guest: a paused one (io-error: a full host disk) is an error
        if vm.running_pid(p) is None:
            return False
        vm.require_guest_running(p)
        return True

    report = remote.check(vm.reach(cfg), alive=alive, started_at=vm.load_record(p).get("started_at"))
    if boot is not None and _qemu_boot(p) == boot:  # the same qemu before and after the check
        _remember(p, boot, report)
    return report


def check_once(cfg: Config) -> remote.CheckReport | None:
    """`inv up`'s vm.check step: the remembered check of this boot when there is one (no SSH: None), else
    `check`. What this skips is still asked every time of Nomad (`nomad.wait`: node ready, docker driver
    healthy); `inv vm.check` checks the guest itself again."""
    memo = remembered(cfg)
    if memo is None:
        return check(cfg)
    vm.require_guest_running(StatePaths.of(cfg))  # remembered or not, a paused guest is an error now
    when = time.strftime("%H:%M:%S", time.localtime(memo["checked_at"]))
    services = ", ".join(memo["services"]) or "none enabled"
    ui.skip(
        f"VM checked at {when} in this boot (qemu pid {memo['pid']}): cloud-init {memo['cloud_init']}, "
        f"services active: {services}; not asked again (`inv vm.check` checks now)"
    )
    for line in memo.get("recoverable") or []:
        ui.warn(f"cloud-init finished with a recoverable error: {line}")
    return None


def _qemu_boot(p: StatePaths) -> dict[str, Any] | None:
    """What names the running VM's boot on this host: its qemu's pid and that process's start time."""
    pid = vm.running_pid(p)
    started = host.started(pid) if pid is not None else None
    return None if pid is None or started is None else {"pid": pid, "qemu_started": round(started, 2)}


def _remember(p: StatePaths, boot: dict[str, Any], report: remote.CheckReport) -> None:
    """Keep a good check for this boot; anything else (a failed check raised before this) forgets it."""
    if report.cloud_init != "done" or not report.boot_id:
        p.vm_checked.unlink(missing_ok=True)
        return
    memo = boot | {
        "boot_id": report.boot_id,
        "serial_offset": console.size(
            p.serial_log
        ),  # after cloud-init finished: this boot's banner is before
        "checked_at": time.time(),
        "cloud_init": report.cloud_init,
        "recoverable": report.recoverable,
        "services": report.services,
    }
    try:
        files.write_atomic(p.vm_checked, (json.dumps(memo, indent=2) + "\n").encode(), "record of the VM check",
                           error=VMError)  # fmt: skip
    except VMError as exc:  # the check itself passed: only the next `inv up` logs in again
        ui.warn(f"{exc.message}; the next `inv up` checks the VM again")


def remembered(cfg: Config) -> dict[str, Any] | None:
    """The good check remembered for the running VM's boot, None when there is none or it may be stale: no
    VM, another qemu (pid or start time), a restart of the guest on its console since, other services to
    check (provision.*). A failed check is never remembered (`check` raises before `_remember`)."""
    p = StatePaths.of(cfg)
    boot = _qemu_boot(p)
    if boot is None:
        return None
    try:
        memo = json.loads(p.vm_checked.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(memo, dict) or any(memo.get(k) != v for k, v in boot.items()):
        return None
    if memo.get("cloud_init") != "done" or not isinstance(memo.get("services"), dict):
        return None
    if sorted(memo["services"]) != sorted(remote.enabled_services(cfg)):
        return None
    if any(state != "active" for state in memo["services"].values()):
        return None
    offset = memo.get("serial_offset")
    if not isinstance(offset, int) or console.rebooted_since(p.serial_log, offset):
        return None
    return memo


def ssh(cfg: Config, command: str = "") -> int:
    """`inv vm.ssh`: OpenSSH with the project key (interactive, or one command); its exit code."""
    vm.require_running(cfg)
    return subprocess.call(remote.ssh_command(vm.reach(cfg), command))


def status(cfg: Config) -> dict[str, Any]:
    """`inv vm.status`: the VM's status plus, when it runs, cloud-init's state: remembered from this boot's
    check (`remembered`), else read from the guest's state files over SSH, briefly."""
    info = vm.status(cfg)
    if info["running"] and info.get("run_state") not in ("running", "unknown"):
        info["cloud_init"] = f"unknown (the guest does not run: qemu run state {info.get('run_state')})"
    elif info["running"]:
        memo = remembered(cfg)
        if memo is not None:
            info["cloud_init"] = memo["cloud_init"]
            info["checked"] = {"at": memo["checked_at"], "boot_id": memo["boot_id"]}
        else:
            info["cloud_init"] = remote.cloud_init_state(vm.reach(cfg))
    return info


def describe(info: dict[str, Any]) -> None:
    """`status`'s result as a few lines on stderr."""
    if not info["running"]:
        ui.info(f"VM: not running (state dir {info['state_dir']}; disk {info['disk'] or 'none'})")
        return
    state = "running" if info.get("run_state") == "running" else f"qemu runs, guest {info.get('run_state')}"
    ui.info(f"VM: {state}, pid {info['pid']}, {info['arch']}, accel {info['accel']}, up {info['uptime_s']}s")
    if info.get("problem"):
        ui.warn(info["problem"])
        if info.get("hint"):
            ui.info(f"    hint: {info['hint']}")
    which = f"baked {info['baked']}" if info.get("baked") else "base"
    ui.info(f"    image: {which} ({info.get('image') or '?'})")
    for name, port in info["ports"].items():
        ui.info(f"    {name:<18} 127.0.0.1:{port['host']} -> guest {port['guest']}")
    checked = info.get("checked")
    since = (
        f" (vm.check at {time.strftime('%H:%M:%S', time.localtime(checked['at']))} in this boot)"
        if checked
        else ""
    )
    ui.info(f"    cloud-init: {info['cloud_init']}{since}")


__all__ = ["Booted", "check", "check_once", "describe", "remembered", "run", "ssh", "status"]

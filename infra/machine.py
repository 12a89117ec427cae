"""The VM verbs that need more than its lifecycle: `inv vm.run` (the seed made once, then the VM booted on
it), and the verbs that talk to the running guest over SSH (`vm.check`, `vm.ssh`, the cloud-init state of
`vm.status`).

It composes `infra.vm` (lifecycle), `infra.seed` (the seed ISO) and `infra.remote` (SSH), so that none of
those imports another: the VM layer flows one way, from here down. Results are returned; `tasks.py` prints.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from infra import remote, seed, ui, vm
from infra.config import Config


@dataclass(frozen=True)
class Booted:
    """What `run` did: the launch, and the seed it made (None: the VM was running already)."""

    launch: vm.Launch
    seed: seed.SeedResult | None


def run(cfg: Config) -> Booted:
    """`inv vm.run`: a running VM is left alone (and its seed with it); otherwise the seed is refreshed for
    the image the VM boots (keeping the previous seed's key, see `seed.refresh`) and the VM booted on it."""
    with vm.preparing(cfg) as prepared:
        made = None if isinstance(prepared, vm.Running) else seed.refresh(cfg, baked=prepared.baked)
        return Booted(vm.run(prepared, made), made)


def check(cfg: Config) -> remote.CheckReport:
    """`inv vm.check`: the checks of infra.remote against the running VM (its forwards, its start time)."""
    p = vm.require_running(cfg)
    vm.require_guest_running(p)  # a paused guest (io-error: a full host disk) is not a slow boot

    def alive() -> bool:
        if vm.running_pid(p) is None:
            return False
        vm.require_guest_running(p)
        return True

    return remote.check(vm.reach(cfg), alive=alive, started_at=vm.load_record(p).get("started_at"))


def ssh(cfg: Config, command: str = "") -> int:
    """`inv vm.ssh`: OpenSSH with the project key (interactive, or one command); its exit code."""
    vm.require_running(cfg)
    return subprocess.call(remote.ssh_command(vm.reach(cfg), command))


def status(cfg: Config) -> dict[str, Any]:
    """`inv vm.status`: the VM's status plus, when it runs, cloud-init's state (asked over SSH, briefly)."""
    info = vm.status(cfg)
    if info["running"] and info.get("run_state") == "running":
        info["cloud_init"] = remote.cloud_init_state(vm.reach(cfg))
    elif info["running"]:
        info["cloud_init"] = f"unknown (the guest does not run: qemu run state {info.get('run_state')})"
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
    ui.info(f"    cloud-init: {info['cloud_init']}")


__all__ = ["Booted", "check", "describe", "run", "ssh", "status"]

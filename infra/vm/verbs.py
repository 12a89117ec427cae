"""Every verb of `inv vm.*`: run, stop, status, destroy, check, ssh, logs, each also per node of a local
cluster (`--node`; `*_nodes`). `inv vm.run` makes the seed once, then boots the VM on it (and boots the seed
`inv up` made, for the image `up` chose); `vm.check`, `vm.ssh` and the cloud-init state of `vm.status` talk
to the running guest over SSH.

A good `vm.check` is remembered for the boot it checked (<state>/vm-checked.json): the qemu process (pid and
start time), the guest's boot id, and how long the serial log was. `inv up` on a running VM and `inv
vm.status` take that memory instead of logging in again while the same qemu runs and its console shows no
restart of the guest (a finished cloud-init's verdict cannot change during a boot); `inv vm.check` always
checks for real. A failed check is never remembered, and a new check replaces the memory.

It composes `infra/vm/lifecycle.py`, `infra/guest/seed.py` (the seed ISO) and `infra/guest/ssh.py` (SSH),
so that none of those imports another: the VM layer flows one way, from here down. Results are returned;
`tasks.py` prints.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.core import files, nodes, ui
from infra.core.config import Config
from infra.core.errors import VMError
from infra.core.state import StatePaths
from infra.guest import console, ssh
from infra.vm import host, instance, lifecycle, switch
from infra.vm.lock import state_lock

if TYPE_CHECKING:  # the seed (jsonschema, pycdlib, hcl2) is loaded by `run` alone
    from infra.guest import seed


@dataclass(frozen=True)
class Booted:
    """What `run` did: the launch, and the seed (None: the VM was running already and none was given)."""

    launch: lifecycle.Launch
    seed: seed.SeedResult | None


def run(cfg: Config, made: seed.SeedResult | None = None) -> Booted:
    """`inv vm.run`, and the VM step of `inv up`: a running VM is left alone (and its seed with it);
    otherwise the VM is booted on a seed made for the image it boots: `made`, when the caller made it first
    (`inv up`, for the image `lifecycle.boots_baked` chose, which `preparing` then boots), else refreshed here
    for the image `preparing` chose (keeping the previous seed's key, see `seed.refresh`)."""
    from infra.guest import seed

    with lifecycle.preparing(cfg, baked=None if made is None else made.baked) as prepared:
        if made is None and not isinstance(prepared, lifecycle.Running):
            made = seed.refresh(cfg, baked=prepared.baked)
        return Booted(lifecycle.boot(prepared, made), made)


def check(cfg: Config) -> ssh.CheckReport:
    """`inv vm.check`: the checks of infra.guest.ssh against the running VM (its forwards, its start time),
    always for real; a good outcome is remembered for this boot (`remembered`)."""
    p = instance.require_running(cfg)
    instance.require_guest_running(p)  # a paused guest is not a slow boot: fails at once, naming why
    boot = _qemu_boot(p)
    p.vm_checked.unlink(missing_ok=True)  # forgotten until this check passes: a failure is never remembered

    def alive() -> (
        bool
    ):  # qemu runs, and runs the guest: a paused one (io-error: a full host disk) is an error
        if instance.running_pid(p) is None:
            return False
        instance.require_guest_running(p)
        return True

    report = ssh.check(instance.reach(cfg), alive=alive, started_at=instance.load_record(p).get("started_at"))
    if boot is not None and _qemu_boot(p) == boot:  # the same qemu before and after the check
        _remember(p, boot, report)
    return report


def check_once(cfg: Config) -> ssh.CheckReport | None:
    """`inv up`'s vm.check step: the remembered check of this boot when there is one (no SSH: None), else
    `check`. What this skips is still asked every time of Nomad (`nomad.wait`: node ready, docker driver
    healthy); `inv vm.check` checks the guest itself again."""
    memo = remembered(cfg)
    if memo is None:
        return check(cfg)
    instance.require_guest_running(StatePaths.of(cfg))  # remembered or not, a paused guest is an error now
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
    pid = instance.running_pid(p)
    started = host.started(pid) if pid is not None else None
    return None if pid is None or started is None else {"pid": pid, "qemu_started": round(started, 2)}


def _remember(p: StatePaths, boot: dict[str, Any], report: ssh.CheckReport) -> None:
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
    if sorted(memo["services"]) != sorted(ssh.enabled_services(cfg)):
        return None
    if any(state != "active" for state in memo["services"].values()):
        return None
    offset = memo.get("serial_offset")
    if not isinstance(offset, int) or console.rebooted_since(p.serial_log, offset):
        return None
    return memo


def shell(cfg: Config, command: str = "") -> int:
    """`inv vm.ssh`: OpenSSH with the project key (interactive, or one command); its exit code."""
    instance.require_running(cfg)
    return subprocess.call(ssh.ssh_command(instance.reach(cfg), command))


def status(cfg: Config) -> dict[str, Any]:
    """`inv vm.status`: the VM's status plus, when it runs, cloud-init's state: remembered from this boot's
    check (`remembered`), else read from the guest's state files over SSH, briefly."""
    info = lifecycle.facts(cfg)
    if info["running"] and info.get("run_state") not in ("running", "unknown"):
        info["cloud_init"] = f"unknown (the guest does not run: qemu run state {info.get('run_state')})"
    elif info["running"]:
        memo = remembered(cfg)
        if memo is not None:
            info["cloud_init"] = memo["cloud_init"]
            info["checked"] = {"at": memo["checked_at"], "boot_id": memo["boot_id"]}
        else:
            info["cloud_init"] = ssh.cloud_init_state(instance.reach(cfg))
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


# ------------------------------------------------------------------------- every node (vm.nodes >= 1) --
# The verbs with `--node NAME` (empty: every node). With one VM they act on it exactly as the verbs above;
# a cluster's nodes are booted one after the other but boot side by side (qemu daemonizes once started).


def run_nodes(cfg: Config, name: str = "") -> list[Booted]:
    """`inv vm.run [--node NAME]`: the cluster's private network first (its switch), then each node."""
    if not nodes.is_cluster(cfg):
        nodes.select(cfg, name)  # a --node that is not this VM's name is refused
        return [run(cfg)]
    top = nodes.top(cfg)
    with state_lock(top, "vm.run (cluster network)", cfg.vm.lock_timeout):
        from infra.guest import keys  # cryptography: loaded only when a cluster is booted

        keys.ensure_generated(top)  # one key for every node (infra.core.nodes)
        switch.ensure(top)
    return [run(node) for node in nodes.select(cfg, name)]


def stop_nodes(cfg: Config, name: str = "", timeout: float | None = None) -> list[str]:
    """`inv vm.stop [--node NAME]`: the nodes stopped; the switch too once no node runs."""
    stopped = [
        node.node.name if node.node else "vm"
        for node in nodes.select(cfg, name)
        if lifecycle.stop(node, timeout)
    ]
    if nodes.is_cluster(cfg) and not any(_running(node) for node in nodes.all_nodes(cfg)):
        top = nodes.top(cfg)
        if top.root.is_dir():
            with state_lock(top, "vm.stop (cluster network)", cfg.vm.lock_timeout):
                switch.stop(top)
    return stopped


def destroy_nodes(cfg: Config, name: str = "") -> None:
    """`inv vm.destroy [--node NAME]`: each node's disk, seed and records; without --node the cluster's
    network, its key and directories too. The image cache is kept."""
    for node in nodes.select(cfg, name):
        lifecycle.destroy(node)
    if not nodes.is_cluster(cfg) or name:
        return
    top = nodes.top(cfg)
    if not top.root.is_dir():
        return
    with state_lock(top, "vm.destroy (cluster)", cfg.vm.lock_timeout):
        switch.stop(top)
        top.switch_log.unlink(missing_ok=True)
        keydir = top.ssh_key.parent
        if keydir.is_dir():
            shutil.rmtree(keydir)
        with contextlib.suppress(OSError):
            top.nodes_dir.rmdir()
        top.deployed.unlink(missing_ok=True)
        top.lock.unlink(missing_ok=True)
    # as infra.vm.lifecycle's destroy: the marker goes last, and the dir only when nothing else is left in it
    if top.root.is_dir() and [entry.name for entry in top.root.iterdir()] == [top.marker.name]:
        top.marker.unlink()
    with contextlib.suppress(OSError):
        top.root.rmdir()


def _running(node: Config) -> bool:
    return instance.running_pid(StatePaths.of(node)) is not None


def check_nodes(cfg: Config, name: str = "") -> list[tuple[str, ssh.CheckReport]]:
    """`inv vm.check [--node NAME]`: each node's checks, in turn."""
    return [(node.provision.hostname, check(node)) for node in nodes.select(cfg, name)]


def ssh_node(cfg: Config, command: str = "", name: str = "") -> int:
    """`inv vm.ssh [--node NAME]`: one node (default: the first)."""
    return shell(nodes.one(cfg, name), command)


def logs_paths(cfg: Config, name: str = "") -> list[tuple[str, Path]]:
    """The serial logs of the nodes `--node` names (every node's when empty)."""
    return [(node.provision.hostname, lifecycle.logs_path(node)) for node in nodes.select(cfg, name)]


def status_nodes(cfg: Config, name: str = "") -> dict[str, Any]:
    """`inv vm.status [--json]`: {"nodes": [...]}, one entry per node (one VM too): name, running, pid,
    cluster address (None for the one VM: it has no cluster network), its forwards, cloud-init's state."""
    out = []
    for node in nodes.select(cfg, name):
        info = status(node)
        info.setdefault("name", node.provision.hostname)
        info.setdefault("cluster_address", None)
        if not info["running"]:
            info["ports"] = {n: {"host": f.host, "guest": f.guest} for n, f in node.vm.ports.items()}
        out.append(info)
    result: dict[str, Any] = {"nodes": out}
    if nodes.is_cluster(cfg):
        top = nodes.top(cfg)
        pid = switch.running_pid(top)
        result["network"] = {"switch_pid": pid, "running": pid is not None, "sockets": str(top.switch_dir)}
    return result


def describe_nodes(result: dict[str, Any]) -> None:
    """`status_nodes`' result as lines on stderr: the one VM as before, a cluster node by node."""
    infos = result["nodes"]
    if "network" not in result:
        for info in infos:
            describe(info)
        return
    net = result["network"]
    ui.info(
        f"cluster network: vde_switch {'pid ' + str(net['switch_pid']) if net['running'] else 'not running'}"
        f" ({net['sockets']})"
    )
    for info in infos:
        state_word = (
            f"running, pid {info['pid']}, up {info['uptime_s']}s" if info["running"] else "not running"
        )
        ui.info(f"{info['name']}: {state_word}; cluster address {info['cluster_address']}")
        for port_name, port in info["ports"].items():
            ui.info(f"    {port_name:<18} 127.0.0.1:{port['host']} -> guest {port['guest']}")
        if info["running"]:
            ui.info(f"    cloud-init: {info['cloud_init']}")


def require_node(cfg: Config, name: str) -> Config:
    """One node's configuration, VMError when it does not run."""
    node = nodes.one(cfg, name)
    if not _running(node):
        raise VMError(f"node {node.provision.hostname} is not running", hint="`inv vm.run --node NAME`")
    return node


__all__ = [
    "Booted", "check", "check_nodes", "check_once", "describe", "describe_nodes", "destroy_nodes", "logs_paths",
    "remembered", "require_node", "run", "run_nodes", "shell", "ssh_node", "status", "status_nodes", "stop_nodes",
]  # fmt: skip

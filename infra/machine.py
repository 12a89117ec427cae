"""The VM verbs that need more than its lifecycle: `inv vm.run` (the seed made once, then the VM booted on
it), and the verbs that talk to the running guest over SSH (`vm.check`, `vm.ssh`, the cloud-init state of
`vm.status`).

It composes `infra.vm` (lifecycle), `infra.seed` (the seed ISO) and `infra.remote` (SSH), so that none of
those imports another: the VM layer flows one way, from here down. Results are returned; `tasks.py` prints.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import keys, nodes, remote, seed, switch, ui, vm
from infra.config import Config
from infra.errors import VMError
from infra.lock import state_lock
from infra.state import StatePaths


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
    return remote.check(
        vm.reach(cfg),
        alive=lambda: vm.running_pid(p) is not None,
        started_at=vm.load_record(p).get("started_at"),
    )


def ssh(cfg: Config, command: str = "") -> int:
    """`inv vm.ssh`: OpenSSH with the project key (interactive, or one command); its exit code."""
    vm.require_running(cfg)
    return subprocess.call(remote.ssh_command(vm.reach(cfg), command))


def status(cfg: Config) -> dict[str, Any]:
    """`inv vm.status`: the VM's status plus, when it runs, cloud-init's state (asked over SSH, briefly)."""
    info = vm.status(cfg)
    if info["running"]:
        info["cloud_init"] = remote.cloud_init_state(vm.reach(cfg))
    return info


def describe(info: dict[str, Any]) -> None:
    """`status`'s result as a few lines on stderr."""
    if not info["running"]:
        ui.info(f"VM: not running (state dir {info['state_dir']}; disk {info['disk'] or 'none'})")
        return
    ui.info(f"VM: running, pid {info['pid']}, {info['arch']}, accel {info['accel']}, up {info['uptime_s']}s")
    which = f"baked {info['baked']}" if info.get("baked") else "base"
    ui.info(f"    image: {which} ({info.get('image') or '?'})")
    for name, port in info["ports"].items():
        ui.info(f"    {name:<18} 127.0.0.1:{port['host']} -> guest {port['guest']}")
    ui.info(f"    cloud-init: {info['cloud_init']}")


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
        keys.ensure_generated(top)  # one key for every node (infra.nodes)
        switch.ensure(top)
    return [run(node) for node in nodes.select(cfg, name)]


def stop_nodes(cfg: Config, name: str = "", timeout: float | None = None) -> list[str]:
    """`inv vm.stop [--node NAME]`: the nodes stopped; the switch too once no node runs."""
    stopped = [
        node.node.name if node.node else "vm" for node in nodes.select(cfg, name) if vm.stop(node, timeout)
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
        vm.destroy(node)
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
    with contextlib.suppress(OSError):
        top.root.rmdir()  # only when nothing else is left in it


def _running(node: Config) -> bool:
    return vm.running_pid(StatePaths.of(node)) is not None


def check_nodes(cfg: Config, name: str = "") -> list[tuple[str, remote.CheckReport]]:
    """`inv vm.check [--node NAME]`: each node's checks, in turn."""
    return [(node.provision.hostname, check(node)) for node in nodes.select(cfg, name)]


def ssh_node(cfg: Config, command: str = "", name: str = "") -> int:
    """`inv vm.ssh [--node NAME]`: one node (default: the first)."""
    return ssh(nodes.one(cfg, name), command)


def logs_paths(cfg: Config, name: str = "") -> list[tuple[str, Path]]:
    """The serial logs of the nodes `--node` names (every node's when empty)."""
    return [(node.provision.hostname, vm.logs_path(node)) for node in nodes.select(cfg, name)]


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
    "Booted", "check", "check_nodes", "describe", "describe_nodes", "destroy_nodes", "logs_paths",
    "require_node", "run", "run_nodes", "ssh", "ssh_node", "status", "status_nodes", "stop_nodes",
]  # fmt: skip

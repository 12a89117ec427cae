"""The nodes of the configuration: one VM (vm.nodes = 1, the state dir as it always was) or a local cluster
(vm.nodes >= 3) of nomad-1 .. nomad-N, each with a configuration of its own derived here.

A node's configuration is the project's with its own state dir (<state>/nodes/<name>), host name, forwards
(node 1 keeps vm.ports; node k forwards ssh and nomad on those host ports + 100 * (k - 1)), the project's one
SSH key (generated in <state>/ssh) and its `node` identity: its static address on the private network, the
Nomad servers' addresses (the first three nodes), the switch socket and its NIC's MAC. Everything below
(`infra.vm.lifecycle`, `infra.guest.seed`, `infra.guest.ssh`) works on one node's configuration exactly as on the single VM's.
"""

from __future__ import annotations

import dataclasses

from infra.core.config import NODE_PORT_STEP, Config, NodeConfig, Port
from infra.core.errors import ConfigError
from infra.core.state import StatePaths

#: The private cluster network: 10.87.0.0/24, node k at .10+k. It exists only between the guests (a
#: vde_switch on unix sockets): no host interface has an address in it, nothing routes it off this host.
SUBNET = "10.87.0"
PREFIX = 24
#: The host-facing network of every node: the user-mode NIC (qemu's slirp network), where the 127.0.0.1
#: forwards arrive. Each node's agent declares it (infra/guest/seed.py); infra/compose/release.py puts the ingress's
#: entrypoints and Kafka's host listener on it in a cluster.
PUBLIC_HOST_NETWORK = ("public", "10.0.2.0/24")
#: How many of the first nodes are Nomad servers: three tolerate the loss of one (Raft quorum 2 of 3).
SERVERS = 3
#: Forwards every node has (node 1 has all of vm.ports).
EVERY_NODE_PORTS = ("ssh", "nomad")


class UnknownNode(ConfigError):
    """`--node NAME` names no node of the configuration: a bad command-line value (exit 2)."""

    exit_code = 2


def is_cluster(cfg: Config) -> bool:
    return cfg.vm.nodes > 1


def name_of(index: int) -> str:
    return f"nomad-{index}"


def address_of(index: int) -> str:
    return f"{SUBNET}.{10 + index}"


def mac_of(index: int) -> str:
    """The cluster NIC's MAC (qemu's range 52:54:00): the seed's network-config matches it."""
    return f"52:54:00:87:00:{index:02x}"


def primary_mac_of(index: int) -> str:
    """The user-mode NIC's MAC, set too: network-config gives DHCP to that NIC only."""
    return f"52:54:00:86:00:{index:02x}"


def names(cfg: Config) -> list[str]:
    """The node names: the one VM's host name, or nomad-1 .. nomad-N."""
    if not is_cluster(cfg):
        return [cfg.provision.hostname]
    return [name_of(k) for k in range(1, cfg.vm.nodes + 1)]


def top(cfg: Config) -> StatePaths:
    """The project's state dir (a cluster's nodes live below it)."""
    return StatePaths.of(cfg)


def node_config(cfg: Config, index: int) -> Config:
    """Node `index`'s own configuration (1-based); the configuration itself for a single VM."""
    if not is_cluster(cfg):
        return cfg
    name = name_of(index)
    root = top(cfg)
    step = NODE_PORT_STEP * (index - 1)
    ports = {
        key: Port(port.host + step, port.guest)
        for key, port in cfg.vm.ports.items()
        if index == 1 or key in EVERY_NODE_PORTS
    }
    ssh = cfg.ssh
    if not ssh.public_key and not ssh.private_key:  # one generated key for every node (infra.guest.keys)
        ssh = dataclasses.replace(ssh, public_key=str(root.ssh_pubkey), private_key=str(root.ssh_key))
    node = NodeConfig(
        name=name, index=index, address=address_of(index), prefix=PREFIX,
        servers=tuple(address_of(k) for k in range(1, SERVERS + 1)),
        switch=root.switch_dir, mac=mac_of(index), primary_mac=primary_mac_of(index),
    )  # fmt: skip
    return dataclasses.replace(
        cfg,
        project=dataclasses.replace(cfg.project, state_dir=root.node(name).root),
        provision=dataclasses.replace(cfg.provision, hostname=name),
        vm=dataclasses.replace(cfg.vm, ports=ports),
        ssh=ssh,
        node=node,
    )


def all_nodes(cfg: Config) -> list[Config]:
    """Every node's configuration, nomad-1 first."""
    return [node_config(cfg, k) for k in range(1, cfg.vm.nodes + 1)]


def select(cfg: Config, name: str = "") -> list[Config]:
    """The nodes a task with `--node NAME` acts on: that one, or every node when `name` is empty."""
    if not name:
        return all_nodes(cfg)
    known = names(cfg)
    if name not in known:
        raise UnknownNode(
            f"--node {name!r} is not a node of this configuration (vm.nodes is {cfg.vm.nodes}): "
            f"known nodes are {', '.join(known)}",
            hint="leave --node out to act on every node",
        )
    return [node_config(cfg, known.index(name) + 1)]


def one(cfg: Config, name: str = "") -> Config:
    """The node a single-target task (vm.ssh) talks to: `name`, or node 1."""
    return select(cfg, name)[0] if name else node_config(cfg, 1)


__all__ = [
    "EVERY_NODE_PORTS", "PREFIX", "PUBLIC_HOST_NETWORK", "SERVERS", "SUBNET", "UnknownNode", "address_of", "all_nodes", "is_cluster",
    "mac_of", "name_of", "names", "node_config", "one", "primary_mac_of", "select", "top",
]  # fmt: skip

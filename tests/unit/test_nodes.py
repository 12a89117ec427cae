"""A local cluster's configuration (vm.nodes), per node: infra/core/nodes.py, the cluster NIC on the qemu command
line (infra/vm/qemu.py), and each node's seed (infra/guest/seed.py): static address, Nomad servers, node meta."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.launchspec import spec

from infra.core import config, nodes
from infra.core.errors import ConfigError
from infra.guest import seed
from infra.vm import qemu

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBPkFsOzBkaGc663XawP6l6Ir0RQXYvFAyRrdwGFAdIT test@example"

MakeCfg = Callable[..., config.Config]


def test_one_node_is_the_configuration_itself(make_cfg: MakeCfg) -> None:
    cfg = make_cfg()
    assert cfg.vm.nodes == 1 and not nodes.is_cluster(cfg)
    assert nodes.all_nodes(cfg) == [cfg]  # state dir, ports, host name: unchanged
    assert nodes.names(cfg) == ["nomad-1"] and nodes.select(cfg, "nomad-1") == [cfg]
    assert cfg.node is None


def test_three_nodes_each_with_its_own_state_dir_forwards_and_address(
    make_cfg: MakeCfg, tmp_path: Path
) -> None:
    cfg = make_cfg(vm={"nodes": 3})
    state = tmp_path / "state"
    got = nodes.all_nodes(cfg)
    assert [n.provision.hostname for n in got] == ["nomad-1", "nomad-2", "nomad-3"]
    assert [n.project.state_dir for n in got] == [state / "nodes" / f"nomad-{k}" for k in (1, 2, 3)]
    assert got[0].vm.ports == cfg.vm.ports  # node 1: vm.ports
    for k, node in ((2, got[1]), (3, got[2])):  # the others: ssh and nomad, +100 per node
        assert node.vm.ports == {
            name: config.Port(cfg.vm.ports[name].host + 100 * (k - 1), cfg.vm.ports[name].guest)
            for name in ("ssh", "nomad")
        }
    assert [n.node.address for n in got if n.node] == ["10.87.0.11", "10.87.0.12", "10.87.0.13"]
    assert all(n.node and n.node.servers == ("10.87.0.11", "10.87.0.12", "10.87.0.13") for n in got)
    assert len({n.node.mac for n in got if n.node} | {n.node.primary_mac for n in got if n.node}) == 6
    # one SSH key for every node: the project's generated key in the state dir itself
    assert {n.ssh.private_key for n in got} == {str(state / "ssh" / "id_ed25519")}
    assert [n.provision.hostname for n in nodes.select(cfg, "nomad-2")] == ["nomad-2"]
    assert nodes.one(cfg).provision.hostname == "nomad-1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2, r"vm\.nodes is 2: two Nomad servers cannot survive the loss of one \(Raft needs a majority"),
        (0, r"vm\.nodes must be a whole number from 1 to 9, got 0"),
        (10, r"vm\.nodes must be a whole number from 1 to 9, got 10"),
        (3.0, r"vm\.nodes must be a whole number from 1 to 9, got 3\.0"),
    ],
)
def test_bad_node_counts_are_refused(make_cfg: MakeCfg, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_cfg(vm={"nodes": value})


def test_offset_forwards_must_stay_ports(make_cfg: MakeCfg) -> None:
    with pytest.raises(ConfigError, match=r"node 3's forwards .* would pass port 65535"):
        make_cfg(vm={"nodes": 3, "ports": {"ssh": {"host": 65400, "guest": 22}}})


def test_an_unknown_node_is_refused_naming_the_known_ones(make_cfg: MakeCfg) -> None:
    with pytest.raises(nodes.UnknownNode, match=r"known nodes are nomad-1, nomad-2, nomad-3") as caught:
        nodes.select(make_cfg(vm={"nodes": 3}), "nomad-4")
    assert caught.value.exit_code == 2


def option(cmd: list[str], name: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd[:-1]) if arg == name]


def test_the_cluster_nic_is_a_vde_port_and_both_nics_have_their_macs(tmp_path: Path) -> None:
    nic = qemu.ClusterNIC(tmp_path / "switch", "52:54:00:87:00:02", "52:54:00:86:00:02")
    cmd = qemu.build_command(spec(tmp_path, cluster_nic=nic))
    netdevs = option(cmd, "-netdev")
    assert netdevs[0].startswith("user,id=net0,hostfwd=tcp:127.0.0.1:")
    assert netdevs[1:] == [f"vde,id=net1,sock={tmp_path / 'switch'}"]
    devices = option(cmd, "-device")
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:86:00:02" in devices
    assert "virtio-net-pci,netdev=net1,mac=52:54:00:87:00:02" in devices
    # one VM: the command line as before (one NIC, qemu's own MAC)
    single = qemu.build_command(spec(tmp_path))
    assert len(option(single, "-netdev")) == 1 and "virtio-net-pci,netdev=net0" in option(single, "-device")


def test_a_node_seed_has_its_static_address_and_the_one_vm_keeps_dhcp(make_cfg: MakeCfg) -> None:
    one = yaml.safe_load(seed.render(make_cfg(), KEY).network_config)
    assert one == {"version": 2, "ethernets": {"primary": {"match": {"name": "e*"}, "dhcp4": True}}}
    node = nodes.node_config(make_cfg(vm={"nodes": 3}), 3)
    net = yaml.safe_load(seed.render(node, KEY).network_config)
    assert net["ethernets"] == {
        "primary": {"match": {"macaddress": "52:54:00:86:00:03"}, "dhcp4": True},
        "cluster": {
            "match": {"macaddress": "52:54:00:87:00:03"},
            "dhcp4": False,
            "addresses": ["10.87.0.13/24"],
        },
    }


def agent_file(cfg: config.Config) -> dict[str, Any] | None:
    doc = yaml.safe_load(seed.render(cfg, KEY).user_data)
    for f in doc["write_files"]:
        if f["path"] == seed.CLUSTER_AGENT_CONFIG:
            agent: dict[str, Any] = yaml.safe_load(f["content"])  # JSON is YAML
            return agent
    return None


def test_the_first_three_nodes_are_servers_and_every_node_a_client(make_cfg: MakeCfg) -> None:
    cfg = make_cfg(vm={"nodes": 4})
    assert agent_file(cfg) is None  # the top-level configuration is no node
    first, fourth = agent_file(nodes.node_config(cfg, 1)), agent_file(nodes.node_config(cfg, 4))
    assert first is not None and fourth is not None
    # the agent's JSON in the shape of Nomad's own tests (command/agent/testdata/basic.json): blocks as
    # lists of one object
    assert first["server"] == [{
        "enabled": True, "bootstrap_expect": 3,
        "server_join": [{"retry_join": ["10.87.0.11:4648", "10.87.0.12:4648", "10.87.0.13:4648"]}],
    }]  # fmt: skip
    assert first["advertise"] == [{"http": "10.87.0.11", "rpc": "10.87.0.11", "serf": "10.87.0.11"}]
    (client1,), (client4,) = first["client"], fourth["client"]
    assert client1["meta"] == [
        {"infra_lab_node": "nomad-1", "infra_lab_data": "true", "infra_lab_entry": "true"}
    ]
    assert "server" not in fourth and client4["meta"][0]["infra_lab_data"] == "false"
    assert client4["server_join"] == [
        {"retry_join": ["10.87.0.11:4647", "10.87.0.12:4647", "10.87.0.13:4647"]}
    ]
    assert client4["host_network"] == [{"public": [{"cidr": "10.0.2.0/24"}]}]
    assert (
        client4["network_interface"]
        == '{{ GetAllInterfaces | include "network" "10.87.0.0/24" | attr "name" }}'
    )
    env = {
        f["path"]: f["content"]
        for f in yaml.safe_load(seed.render(nodes.node_config(cfg, 4), KEY).user_data)["write_files"]
    }[seed.PROVISION_ENV]
    assert "CLUSTER_ADDRESS=10.87.0.14\n" in env and "NOMAD_SERVER=false\n" in env


def test_the_cluster_file_sorts_after_the_agent_configs_it_overrides() -> None:
    """Nomad loads /etc/nomad.d in name order, later files winning (command/agent/config.go LoadConfigDir)."""
    name = Path(seed.CLUSTER_AGENT_CONFIG).name
    assert sorted([name, "nomad.hcl", "zz-infra-lab.hcl"])[-1] == name


def test_every_node_boots_the_one_bake_of_the_configuration(make_cfg: MakeCfg) -> None:
    """The bake's content key (infra/vm/bakecache.py) hashes the instance-neutral user-data: a node's identity
    (address, cluster agent file, host name) is left out, so `inv image.bake` serves every node."""
    cfg = make_cfg(vm={"nodes": 3})
    neutral = seed.dump(seed.instance_neutral(cfg))
    assert [seed.dump(seed.instance_neutral(n)) for n in nodes.all_nodes(cfg)] == [neutral] * 3
    paths = [f["path"] for f in seed.instance_neutral(nodes.node_config(cfg, 1))["write_files"]]
    assert seed.CLUSTER_AGENT_CONFIG not in paths and "10.87.0." not in neutral

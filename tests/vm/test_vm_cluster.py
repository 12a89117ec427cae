"""A local cluster (vm.nodes: 3) for real, through the `inv` CLI: three small guests of the offline test image
booted side by side on the private network (a vde_switch on unix sockets in the state dir), each with its
static cluster address from its seed's network-config, each reaching the other two over TCP on Nomad's
ports 4647/4648 (listeners started in the guests: the bare test image has python3, no Nomad), the three seeds
differing only in node identity and network; one node stopped (the other two keep running and reaching each
other), started again (it rejoins); destroy leaves no process, the switch included.

Small guests to fit the tier's time: 1 vCPU / 512 MiB each, provisioning parts off. The Nomad side of the
cluster (three servers, leader change, rescheduling) is tested against the Nomad double
(tests/component/test_cluster.py); the e2e runs it on KVM (tests/e2e/test_6_cluster.py).
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pycdlib
import pytest
import yaml
from support.servers.common import processes_of

from vm.conftest import VMEnv, make_vm_env

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(3600),  # a safety net, not a bound: the module fixture boots and checks three guests
    pytest.mark.tools("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "ssh", "vde_switch"),
]

NODES = ("nomad-1", "nomad-2", "nomad-3")
ADDRESS = {"nomad-1": "10.87.0.11", "nomad-2": "10.87.0.12", "nomad-3": "10.87.0.13"}
NOMAD_PORTS = (4647, 4648)  # RPC (Raft) and Serf


@pytest.fixture(scope="module")
def cluster_env(test_image: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMEnv]:
    env = make_vm_env(test_image, tmp_path_factory.mktemp("cluster"), {"nomad": False, "docker": False})
    # generous waits for real events: three TCG guests beside the tier's others on two shared cores (a
    # boot took 250 s to reach udev here under a load of 23)
    env.settings["vm"] |= {
        "nodes": 3,
        "cpus": 1,
        "memory_mb": 512,
        "ssh_timeout": 900,
        "cloud_init_timeout": 900,
    }
    env.config_file.write_text(yaml.safe_dump(env.settings))
    yield env
    # whatever a failed test left: stop every node and the switch by pid (vm.destroy does both), then
    # kill by pid any process still naming the state dir
    env.inv("vm.destroy", timeout=300)
    for proc in processes_of(env.state_dir):
        proc.kill()


def ssh(env: VMEnv, node: str, command: str, timeout: float = 180) -> str:
    result = env.inv("vm.ssh", "--node", node, "--command", command, timeout=timeout)
    assert result.returncode == 0, (
        f"{node}: {command!r} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    )
    return result.stdout


def status(env: VMEnv) -> dict[str, dict[str, Any]]:
    result = env.inv("vm.status", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    return {n["name"]: n for n in json.loads(result.stdout)["nodes"]}


#: Listeners on 4647 and 4648 in a guest, bound to its cluster address, detached from the SSH session.
LISTEN = (
    "for p in 4647 4648; do setsid nohup python3 -m http.server $p --bind {addr} >/dev/null 2>&1 < /dev/null & done;"
    " for i in $(seq 60); do ss -ltn | grep -q '{addr}:4648' && ss -ltn | grep -q '{addr}:4647' && break; sleep 1; done;"
    " ss -ltn"
)
#: From a guest: one TCP connection per (address, port); a line per target, "ok" or the error.
PROBE = (
    "python3 -c 'import socket,sys\n"
    "for t in sys.argv[1:]:\n"
    '    a, p = t.split(":")\n'
    "    try:\n"
    '        socket.create_connection((a, int(p)), timeout=10).close(); print(t, "ok")\n'
    "    except OSError as e:\n"
    "        print(t, type(e).__name__)\n' {targets}"
)


#: Ends what a session printed before its probe (a login costs the TCG guest CPU: one session does both).
PROBE_MARK = "==probe=="


def probe(env: VMEnv, node: str, others: list[str], before: str = "true") -> dict[str, str]:
    """The PROBE from `node` to `others`; `before`: a command run first in the same session."""
    targets = " ".join(f"{ADDRESS[o]}:{p}" for o in others for p in NOMAD_PORTS)
    out = ssh(env, node, f"{before}; echo {PROBE_MARK}; {PROBE.format(targets=targets)}")
    out = out.split(f"{PROBE_MARK}\n", 1)[1]
    return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


#: A node's host name and IPv4 addresses, printed ahead of LISTEN in the fixture's session with each node.
IDENTITY = "hostname; ip -4 -o addr show; echo ==listen=="


@pytest.fixture(scope="module")
def cluster(cluster_env: VMEnv) -> dict[str, Any]:
    """vm.run (every node, one command), then vm.check (every node); each node's host name and addresses,
    read in the session that starts its listeners (one login per node: each costs the TCG guest CPU)."""
    run = cluster_env.inv("vm.run", timeout=600)
    assert run.returncode == 0, run.stderr
    check = cluster_env.check()
    assert check.returncode == 0, f"vm.check failed:\n{check.stderr[-6000:]}"
    identity = {}
    for node in NODES:
        out = ssh(cluster_env, node, IDENTITY + "; " + LISTEN.format(addr=ADDRESS[node]))
        identity[node] = out.split("==listen==\n", 1)[0]
    return {"run": run, "check": json.loads(check.stdout.strip().splitlines()[-1]), "identity": identity}


def test_three_nodes_boot_side_by_side_each_in_its_own_state_dir(
    cluster_env: VMEnv, cluster: dict[str, Any]
) -> None:
    assert [n["name"] for n in cluster["check"]["nodes"]] == list(NODES)
    assert all(n["cloud_init"] == "done" for n in cluster["check"]["nodes"])
    nodes = status(cluster_env)
    assert sorted(nodes) == list(NODES)
    pids = {name: info["pid"] for name, info in nodes.items()}
    assert all(info["running"] for info in nodes.values()) and len(set(pids.values())) == 3
    for name in NODES:
        own = cluster_env.state_dir / "nodes" / name
        assert nodes[name]["state_dir"] == str(own)
        assert {"disk.qcow2", "seed.iso", "qemu.pid", "serial.log", "qmp.sock", "vm.json"} <= {
            p.name for p in own.iterdir()
        }
        assert int((own / "qemu.pid").read_text()) == pids[name]
        assert nodes[name]["cluster_address"] == ADDRESS[name]
    # vm.ports are node 1's; the others forward ssh and nomad 100 and 200 above them
    ports = cluster_env.settings["vm"]["ports"]
    assert nodes["nomad-1"]["ports"] == ports
    for k, name in ((1, "nomad-2"), (2, "nomad-3")):
        assert nodes[name]["ports"] == {
            key: {"host": ports[key]["host"] + 100 * k, "guest": ports[key]["guest"]}
            for key in ("ssh", "nomad")
        }


def test_each_node_has_its_static_cluster_address(cluster_env: VMEnv, cluster: dict[str, Any]) -> None:
    for name in NODES:
        out = cluster["identity"][name]  # `hostname; ip -4 -o addr show` on the node, after vm.check
        assert out.splitlines()[0] == name
        assert f"inet {ADDRESS[name]}/24" in out, out
        assert "inet 10.0.2.15/24" in out, out  # the user-mode NIC (internet, forwards) stays


def test_each_node_reaches_the_other_two_on_the_nomad_ports(
    cluster_env: VMEnv, cluster: dict[str, Any]
) -> None:
    for name in NODES:
        others = [o for o in NODES if o != name]
        assert probe(cluster_env, name, others) == {
            f"{ADDRESS[o]}:{p}": "ok" for o in others for p in NOMAD_PORTS
        }


def iso_files(path: Path) -> dict[str, bytes]:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    out = {}
    for name in ("user-data", "meta-data", "network-config"):
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
        out[name] = buf.getvalue()
    iso.close()
    return out


def test_the_seeds_differ_only_in_node_identity_and_network(
    cluster_env: VMEnv, cluster: dict[str, Any]
) -> None:
    seeds = {n: iso_files(cluster_env.state_dir / "nodes" / n / "seed.iso") for n in NODES}

    def neutral(name: str) -> tuple[str, str, str]:
        text = {k: v.decode() for k, v in seeds[name].items()}
        index = name[-1]
        for what in (ADDRESS[name], name, f"52:54:00:87:00:0{index}", f"52:54:00:86:00:0{index}"):
            assert what in text["user-data"] + text["network-config"] + text["meta-data"], what
            text = {k: v.replace(what, "<node>") for k, v in text.items()}
        meta = yaml.safe_load(text["meta-data"])
        assert meta["local-hostname"] == "<node>" and meta["instance-id"].startswith("iid-")
        meta.pop("instance-id")  # a hash of the content (infra/guest/seed.py): differs with it
        return text["user-data"], text["network-config"], json.dumps(meta)

    first = neutral("nomad-1")
    assert neutral("nomad-2") == first and neutral("nomad-3") == first
    net = yaml.safe_load(seeds["nomad-2"]["network-config"])
    assert net["ethernets"]["cluster"] == {
        "match": {"macaddress": "52:54:00:87:00:02"}, "dhcp4": False, "addresses": ["10.87.0.12/24"],
    }  # fmt: skip


def test_the_network_is_host_local_unix_sockets(cluster_env: VMEnv, cluster: dict[str, Any]) -> None:
    """The switch has no internet socket and no tap device; every qemu's cluster NIC is a vde port (its
    command line) and every internet socket of a qemu is a 127.0.0.1 listener or the user-mode NIC's."""
    pid = int((cluster_env.state_dir / "switch.pid").read_text())
    switch = psutil.Process(pid)
    assert switch.name() == "vde_switch"
    assert switch.net_connections(kind="inet") == []
    assert not [f for f in switch.open_files() if f.path.startswith("/dev/net/tun")]
    assert {c.type for c in switch.net_connections(kind="unix")} and all(
        str(c.laddr).startswith(str(cluster_env.state_dir / "switch")) or not c.laddr
        for c in switch.net_connections(kind="unix")
    )
    for name in NODES:
        record = json.loads((cluster_env.state_dir / "nodes" / name / "vm.json").read_text())
        command = record["command"]
        assert f"vde,id=net1,sock={cluster_env.state_dir / 'switch'}" in command
        assert not [a for a in command if a.startswith(("tap", "bridge", "socket,mcast", "dgram"))]
        listeners = {
            c.laddr.ip for c in psutil.Process(record["pid"]).net_connections("inet") if c.status == "LISTEN"
        }
        assert listeners == {"127.0.0.1"}


def test_stopping_one_node_leaves_the_other_two_running_and_reachable(
    cluster_env: VMEnv, cluster: dict[str, Any]
) -> None:
    before = status(cluster_env)
    stopped = cluster_env.inv("vm.stop", "--node", "nomad-2", timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert (
        not psutil.pid_exists(before["nomad-2"]["pid"])
        or psutil.Process(before["nomad-2"]["pid"]).status() == psutil.STATUS_ZOMBIE
    )
    after = status(cluster_env)
    assert after["nomad-2"]["running"] is False
    for name in ("nomad-1", "nomad-3"):
        assert after[name]["running"] is True and after[name]["pid"] == before[name]["pid"]
    from_1 = probe(cluster_env, "nomad-1", ["nomad-3", "nomad-2"])  # one session, both targets
    assert {t: r for t, r in from_1.items() if t.startswith("10.87.0.13:")} == {
        f"10.87.0.13:{p}": "ok" for p in NOMAD_PORTS
    }
    assert probe(cluster_env, "nomad-3", ["nomad-1"]) == {f"10.87.0.11:{p}": "ok" for p in NOMAD_PORTS}
    gone = {t: r for t, r in from_1.items() if not t.startswith("10.87.0.13:")}
    assert set(gone) == {f"10.87.0.12:{p}" for p in NOMAD_PORTS} and "ok" not in gone.values()
    assert psutil.pid_exists(int((cluster_env.state_dir / "switch.pid").read_text()))


def test_the_stopped_node_starts_again_and_rejoins(cluster_env: VMEnv, cluster: dict[str, Any]) -> None:
    others = {n: status(cluster_env)[n]["pid"] for n in ("nomad-1", "nomad-3")}
    run = cluster_env.inv("vm.run", "--node", "nomad-2", timeout=600)
    assert run.returncode == 0, run.stderr
    assert "node nomad-2 (10.87.0.12) started" in run.stderr and "nomad-1" not in run.stderr
    check = cluster_env.check("--node", "nomad-2")
    assert check.returncode == 0, check.stderr[-4000:]
    # nomad-2 starts its listeners and probes the other two in one session, then nomad-1 probes nomad-2
    from_2 = probe(
        cluster_env, "nomad-2", ["nomad-1", "nomad-3"], before=LISTEN.format(addr=ADDRESS["nomad-2"])
    )
    assert probe(cluster_env, "nomad-1", ["nomad-2"]) == {f"10.87.0.12:{p}": "ok" for p in NOMAD_PORTS}
    assert from_2 == {f"{ADDRESS[o]}:{p}": "ok" for o in ("nomad-1", "nomad-3") for p in NOMAD_PORTS}
    now = status(cluster_env)
    assert {n: now[n]["pid"] for n in others} == others  # the other two were left alone


def test_destroy_removes_every_node_and_leaves_no_process(
    cluster_env: VMEnv, cluster: dict[str, Any]
) -> None:
    pids = [info["pid"] for info in status(cluster_env).values() if info["running"]]
    switch_pid = int((cluster_env.state_dir / "switch.pid").read_text())
    assert len(pids) == 3
    result = cluster_env.inv("vm.destroy", timeout=300)
    assert result.returncode == 0, result.stderr
    for pid in [*pids, switch_pid]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert processes_of(cluster_env.state_dir) == []
    assert not cluster_env.state_dir.exists(), sorted(str(p) for p in cluster_env.state_dir.rglob("*"))
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(cluster_env.state_dir) not in ps

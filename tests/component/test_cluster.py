"""infra/nomad/cluster.py against the STATEFUL Nomad API double: `cluster.wait_ready`'s view of one node while
the VM boots (connection refused, no leader, ineligible, docker unhealthy, the timeout's message), and

the Nomad side of a local cluster (vm.nodes: 3): `inv nomad.wait`'s wait for three
servers in the Raft configuration and three ready nodes (infra/nomad/cluster.py wait_nodes), a leader change, and
what the scheduler does when a node is lost: the app's allocation moves to another node, the stateful job,
constrained to the node whose host volumes hold its data (node meta written by cloud-init, infra/guest/seed.py),
waits for that node instead of starting on an empty disk elsewhere, and comes back with it.

The double models these from Nomad's source (cited where it does them: nomad/status_endpoint.go Peers,
nomad/heartbeat.go invalidateHeartbeat, scheduler/reconciler/reconcile_cluster.go computeStop/markStop,
scheduler/feasible/feasible.go resolveTarget/meetsConstraint). The real VMs of a cluster boot in the VM tier
(tests/vm/test_vm_cluster.py); the real Nomad cluster runs in the e2e (tests/e2e/test_6_cluster.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support.clock import FakeClock
from support.doubles.nomad_api import NODE_ID, NomadAPIDouble, parse_job_hcl
from support.nomad_client import TimeoutRecorder, client_for

from infra import ROOT
from infra.core import config, nodes
from infra.core.errors import WaitTimeout
from infra.core.waits import Probe, wait_until
from infra.guest import seed
from infra.nomad import cluster, rollout
from infra.nomad.client import Client, NomadAPIError, Settings

APP = """
job "app" {
  datacenters = ["*"]
  group "app" {
    count = 1
    task "web" {
      driver = "docker"
      config {
        image = "app:1"
      }
      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
"""
#: The constraint of nomad/datastorage.nomad.hcl, in a small job (its own parse is checked below).
DATA = """
job "data" {
  datacenters = ["*"]
  constraint {
    attribute = "${meta.infra_lab_data}"
    value     = "true"
  }
  group "postgres" {
    count = 1
    task "postgres" {
      driver = "docker"
      config {
        image = "postgres:17"
      }
      resources {
        cpu    = 100
        memory = 256
      }
    }
  }
}
"""


@pytest.fixture
def cfg(make_cfg: Callable[..., config.Config]) -> config.Config:
    return make_cfg(vm={"nodes": 3})  # state and cache in tmp_path


def meta_as_cloud_init_writes_it(double: NomadAPIDouble, cfg: config.Config) -> None:
    """Each node of the double gets the client meta infra/guest/seed.py ships in that node's zzz-cluster.json."""
    for node_cfg in nodes.all_nodes(cfg):
        assert node_cfg.node is not None
        agent = seed.cluster_agent_config(node_cfg.node)
        double.node_named(node_cfg.node.name)["Meta"] = agent["client"][0]["meta"][0]


@pytest.fixture
def double(cfg: config.Config) -> Iterator[NomadAPIDouble]:
    d = NomadAPIDouble(rpc_hold=0.2).cluster(3).start()
    meta_as_cloud_init_writes_it(d, cfg)
    yield d
    d.stop()
    assert not d.errors, d.errors


@pytest.fixture
def client(double: NomadAPIDouble) -> Client:
    return client_for(double)  # limits that only end a request the double never answers


def allocs_of(double: NomadAPIDouble, job: str) -> list[dict[str, object]]:
    return [a for a in double.allocs.values() if a["JobID"] == job]


def test_the_wait_returns_at_once_for_a_settled_three_server_cluster(
    double: NomadAPIDouble, client: Client
) -> None:
    st = cluster.wait_nodes(client, servers=3, nodes=3, timeout=30)
    assert st.leader == "10.87.0.11:4647"
    assert st.peers == ["10.87.0.11:4647", "10.87.0.12:4647", "10.87.0.13:4647"]
    assert sorted(n.node_name for n in st.ready_nodes()) == ["nomad-1", "nomad-2", "nomad-3"]
    # one look: leader, peers, nodes, each asked once
    assert [double.count(p) for p in ("^/v1/status/leader$", "^/v1/status/peers$", "^/v1/nodes$")] == [
        1,
        1,
        1,
    ]


def test_the_wait_holds_until_the_third_server_joins_and_the_third_node_is_ready(
    double: NomadAPIDouble, client: Client
) -> None:
    double.servers = double.servers[:2]
    double.node_named("nomad-3")["Status"] = "initializing"
    double.at(0.5, lambda: double.servers.append("10.87.0.13:4647"))
    double.at(0.8, lambda: double.return_node("nomad-3"))
    st = cluster.wait_nodes(client, servers=3, nodes=3, timeout=60)
    assert len(st.peers) == 3 and len(st.ready_nodes()) == 3
    assert double.count("^/v1/status/peers$") >= 2  # it looked again after the two-server answer


#: What a timed-out wait reports while nomad-2 is lost (the timeout tests below).
NODE_2_LOST = "last state: leader 10.87.0.11:4647; 3/3 servers in the Raft configuration; 2/3 nodes ready"


def test_the_wait_times_out_naming_what_is_missing(double: NomadAPIDouble, client: Client) -> None:
    double.lose_node("nomad-2")
    # The deadline runs on a fake clock that the double moves past it while it answers the first look's
    # /v1/nodes: however slow the machine, that answer is in, and exactly one look happens.
    clock = FakeClock()
    double.on_request("^/v1/nodes$", 1, lambda: clock.advance(301))
    with pytest.raises(WaitTimeout) as caught:
        cluster.wait_nodes(client, servers=3, nodes=3, timeout=300, clock=clock, sleep=clock.sleep)
    message = str(caught.value)
    assert "timed out after 300s waiting for Nomad at" in message
    assert NODE_2_LOST in message
    assert "nomad-2: node nomad-2 down" in message
    assert double.count("^/v1/nodes$") == 1 and clock.sleeps == []


class CutOff(TimeoutRecorder):
    """A session whose requests after the first `keep` get no answer: the first such request is cut off as by
    the call's own limit (requests' ReadTimeout), and the fake clock passes the wait's deadline meanwhile."""

    def __init__(self, clock: FakeClock, keep: int) -> None:
        super().__init__()
        self.clock = clock
        self.keep = keep

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kw: Any) -> requests.Response:
        if len(self.timeouts) >= self.keep:
            self.timeouts.append(tuple(kw["timeout"]))
            self.clock.advance(301)
            raise requests.exceptions.ReadTimeout(f"read timed out (read timeout={kw['timeout'][1]})")
        return super().request(method, url, *args, **kw)


def test_a_look_cut_off_by_the_deadline_keeps_the_state_nomad_last_answered(double: NomadAPIDouble) -> None:
    """The last look of a timed-out wait can be a request the deadline cut off (a loaded machine, a slow
    server): the message still names what Nomad said before, and says that no answer came after it."""
    double.lose_node("nomad-2")
    clock = FakeClock()
    session = CutOff(clock, keep=3)  # the first look's leader, peers and nodes are answered; nothing after
    client = Client(Settings(addr=double.url, retries=0, read_timeout=120), session=session)
    with pytest.raises(WaitTimeout) as caught:
        cluster.wait_nodes(client, servers=3, nodes=3, timeout=300, clock=clock, sleep=clock.sleep)
    message = str(caught.value)
    assert NODE_2_LOST in message
    assert "nomad-2: node nomad-2 down" in message
    assert "(no answer after that: Nomad API not answering (" in message
    assert double.count("^/v1/nodes$") == 1 and len(session.timeouts) == 4  # one answered look, one cut off


def test_a_leader_change_keeps_the_cluster_answering(double: NomadAPIDouble, client: Client) -> None:
    double.lose_node("nomad-1")
    double.set_leader("")
    double.at(0.5, lambda: double.set_leader("10.87.0.12:4647"))
    st = cluster.wait_nodes(client, servers=3, nodes=2, timeout=60)
    assert st.leader == "10.87.0.12:4647"
    # the lost server stays in the Raft configuration (nomad/status_endpoint.go Peers lists every server)
    assert len(st.peers) == 3
    assert sorted(n.node_name for n in st.ready_nodes()) == ["nomad-2", "nomad-3"]


def test_a_lost_node_moves_the_app_and_the_data_job_waits_for_its_own_node(
    double: NomadAPIDouble, client: Client, tmp_path: Path
) -> None:
    for name, text in (("app", APP), ("data", DATA)):
        path = tmp_path / f"{name}.nomad.hcl"
        path.write_text(text)
        assert rollout.deploy_job(client, path, variables={}, timeout=20).outcome == "deployed"
    (app_alloc,) = allocs_of(double, "app")
    (data_alloc,) = allocs_of(double, "data")
    assert app_alloc["NodeName"] == data_alloc["NodeName"] == "nomad-1"

    double.lose_node("nomad-1")
    assert app_alloc["ClientStatus"] == "lost" and data_alloc["ClientStatus"] == "lost"
    moved = [a for a in allocs_of(double, "app") if a["DesiredStatus"] == "run"]
    assert [a["NodeName"] for a in moved] == ["nomad-2"]
    assert moved[0]["PreviousAllocation"] == app_alloc["ID"]
    # no other node holds the data: nothing placed, a blocked evaluation naming the constraint
    assert [a for a in allocs_of(double, "data") if a["DesiredStatus"] == "run"] == []
    evals = [e for e in double.evals.values() if e["JobID"] == "data" and e.get("FailedTGAllocs")]
    assert evals and evals[-1]["FailedTGAllocs"]["postgres"]["ConstraintFiltered"] == {
        "${meta.infra_lab_data} = true": 1
    }

    double.return_node("nomad-1")  # the node rejoins: the blocked evaluation places the data job on it
    cluster.wait_nodes(client, servers=3, nodes=3, timeout=30)

    def placed(_deadline: object) -> Probe[list[object]]:
        found = [a["NodeName"] for a in allocs_of(double, "data") if a["DesiredStatus"] == "run"]
        return Probe(bool(found), f"placed on {found}", found)

    assert wait_until(placed, what="the data job placed again", timeout=60, interval=0.05).value == [
        "nomad-1"
    ]


def test_the_real_data_job_carries_the_constraint_and_only_node_1_meets_it(cfg: config.Config) -> None:
    job, _ = parse_job_hcl((ROOT / "nomad" / "datastorage.nomad.hcl").read_text(), "")
    assert job["Constraints"] == [{"LTarget": "${meta.infra_lab_data}", "RTarget": "true", "Operand": "="}]
    metas = {}
    for node_cfg in nodes.all_nodes(cfg):
        assert node_cfg.node is not None
        (client,) = seed.cluster_agent_config(node_cfg.node)["client"]
        meta = client["meta"][0]
        metas[node_cfg.node.name] = (meta["infra_lab_data"], meta["infra_lab_entry"])
    assert metas == {
        "nomad-1": ("true", "true"),
        "nomad-2": ("false", "false"),
        "nomad-3": ("false", "false"),
    }
    ingress, _ = parse_job_hcl((ROOT / "nomad" / "ingress.nomad.hcl").read_text(), "")
    assert ingress["Constraints"] == [
        {"LTarget": "${meta.infra_lab_entry}", "RTarget": "true", "Operand": "="}
    ]
    # the one VM says "true" in its agent config (the constraint holds there too)
    agent = (seed.FILES_DIR / "nomad" / "zz-infra-lab.hcl").read_text()
    assert 'infra_lab_data  = "true"' in agent and 'infra_lab_entry = "true"' in agent


def test_the_ingress_entrypoints_go_on_the_public_network_in_a_cluster_only(
    double: NomadAPIDouble, client: Client, cfg: config.Config, tmp_path: Path
) -> None:
    """infra/compose/release.py deploy_ingress: the variable host_network "public" in a cluster (each node's agent
    declares it, infra/guest/seed.py), the job's default ("default", what Nomad canonicalizes an empty one to:
    nomad/structs/structs.go NetworkResource.Canonicalize) with one VM."""
    from infra.compose import release

    release.deploy_ingress(cfg, client, detach=True)
    assert 'host_network = "public"\n' in double.parse_calls[-1]["Variables"]

    def placed(_deadline: object) -> Probe[list[object]]:
        found = [a["NodeName"] for a in allocs_of(double, "ingress")]
        return Probe(bool(found), f"placed on {found}", found)

    # the entry point (meta infra_lab_entry)
    assert wait_until(placed, what="Traefik placed", timeout=60, interval=0.05).value == ["nomad-1"]
    release.deploy_ingress(
        dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, nodes=1)), client, detach=True
    )
    assert "host_network" not in double.parse_calls[-1]["Variables"]


def test_status_shows_the_servers_the_nodes_and_the_leader(
    double: NomadAPIDouble, client: Client, cfg: config.Config, capsys: pytest.CaptureFixture[str]
) -> None:
    """`inv status` on a cluster: each node's VM (none runs here), the Raft servers, every client node."""
    from infra.compose import stack

    double.lose_node("nomad-3")
    report = stack.status(cfg, client=client)
    assert report["nomad"]["leader"] == "10.87.0.11:4647"
    assert report["nomad"]["peers"] == ["10.87.0.11:4647", "10.87.0.12:4647", "10.87.0.13:4647"]
    assert [(n["name"], n["status"], n["ready"]) for n in report["nomad"]["nodes"]] == [
        ("nomad-1", "ready", True), ("nomad-2", "ready", True), ("nomad-3", "down", False),
    ]  # fmt: skip
    assert [n["name"] for n in report["vm"]["nodes"]] == ["nomad-1", "nomad-2", "nomad-3"]
    err = capsys.readouterr().err
    assert "leader 10.87.0.11:4647" in err
    assert "servers (Raft): 10.87.0.11:4647, 10.87.0.12:4647, 10.87.0.13:4647" in err
    assert "node   nomad-3 (10.87.0.13): not running" in err
    assert re.search(r"node nomad-3\s+down\s+eligible$", err, re.M), err
    assert "Postgres" not in err  # its port is on the cluster network: no host forward is served


def test_no_cluster_leader_is_surfaced_with_a_hint_then_the_leader_appears(nomad_doubles: Any) -> None:
    d = nomad_doubles(rpc_hold=0.1).start()
    d.register_node(status="ready", docker="healthy")
    c = client_for(d)
    with pytest.raises(NomadAPIError) as info:
        c.nodes()
    assert info.value.no_leader
    assert "HTTP 500: No cluster leader" in str(info.value)
    assert "inv nomad.wait" in str(info.value)

    # nodes request 1 was above, 2 is the wait's first (no leader yet); the leader is elected at the third
    d.on_request("^/v1/nodes$", 3, d.elect_leader)
    seen: list[str] = []
    st = cluster.wait_ready(c, timeout=120, observe=lambda s: seen.append(s.describe()))
    assert st.ready and st.leader
    assert "Nomad API up; no cluster leader yet" in seen
    assert seen[-1].startswith("leader elected; node nomad-1 ready, eligible; docker driver healthy")


def test_nomad_wait_sees_the_vm_boot_from_connection_refused_to_docker_healthy(nomad_doubles: Any) -> None:
    d = nomad_doubles(rpc_hold=0.5).start(listen=False)  # the VM's port refuses connections while it boots
    attempts: list[str] = []

    def attempted(_method: str, path: str) -> None:
        attempts.append(path)
        if len(attempts) == 2:  # the API comes up after one refused attempt
            d.listen()

    # the boot, one change per /v1/nodes request of the wait (tied to the client's requests, not to a clock
    # a loaded machine could outrun): leader + node registered (initializing), node ready, docker healthy
    d.on_request("^/v1/nodes$", 1, lambda: (d.elect_leader(), d.register_node()))
    d.on_request("^/v1/nodes$", 2, lambda: d.set_node(Status="ready"))
    d.on_request("^/v1/nodes$", 3, lambda: d.set_docker("healthy"))
    c = Client(Settings(addr=d.url, connect_timeout=30, read_timeout=60, retries=0), on_request=attempted)
    seen: list[str] = []
    st = cluster.wait_ready(c, timeout=120, observe=lambda s: seen.append(s.describe()))
    assert st.ready and st.node_id == NODE_ID and st.docker_healthy
    assert "not answering" in seen[0] and "onnection refused" in seen[0], seen
    assert any("initializing" in s for s in seen) and any("docker driver not detected" in s for s in seen)
    # blocking queries: one /v1/nodes request per state change, the first one unblocked
    assert d.count("^/v1/nodes$") == 3, [(r.path, r.query) for r in d.requests]
    blocking = [r for r in d.requests if r.path == "/v1/nodes" and "index" in r.query]
    assert len(blocking) == 2 and all(r.query.get("wait", "").endswith("ms") for r in blocking)


def test_nomad_wait_waits_for_eligibility_and_docker_health(nomad_doubles: Any) -> None:
    d = nomad_doubles().start()
    d.leader = "10.0.2.15:4647"
    d.register_node(status="ready", docker="unhealthy")
    d.set_node(SchedulingEligibility="ineligible")
    # each change arrives with the wait's next (blocking) query: one request per change, whatever the load
    d.on_request("^/v1/nodes$", 2, lambda: d.set_node(SchedulingEligibility="eligible"))
    d.on_request("^/v1/nodes$", 3, lambda: d.set_docker("healthy"))
    seen: list[str] = []
    st = cluster.wait_ready(client_for(d), timeout=120, observe=lambda s: seen.append(s.describe()))
    assert st.ready
    assert "ineligible" in seen[0] and "detected, unhealthy (Docker is unresponsive)" in seen[0]
    assert d.count("/v1/nodes") == 3


def test_nomad_wait_timeout_reports_last_state_and_where_to_look(nomad_doubles: Any) -> None:
    d = nomad_doubles().start()
    d.leader = "10.0.2.15:4647"
    d.register_node(status="ready", docker="undetected")
    # The deadline runs on a fake clock that jumps past it once the first look is done: however slow the
    # machine, the double's answer is in before the wait gives up (each request's own limit is the time left
    # by that clock: 300 s here), and exactly one look happens.
    clock = FakeClock()
    with pytest.raises(WaitTimeout) as info:
        cluster.wait_ready(client_for(d), timeout=300, observe=lambda s: clock.advance(301), clock=clock,
                           sleep=clock.sleep)  # fmt: skip
    text = str(info.value)
    assert "timed out after 300s waiting for Nomad" in text
    assert "last state: leader elected; node nomad-1 ready, eligible; docker driver not detected" in text
    assert d.count("/v1/nodes") == 1 and d.count("/v1/agent/self") == 1
    assert "inv vm.logs" in text and "inv vm.check" in text
    assert "node event [Cluster] Node registered" in text
    assert info.value.exit_code == 2


def test_nomad_wait_returns_at_once_when_ready(nomad_doubles: Any) -> None:
    d = nomad_doubles().ready_now().start()
    assert cluster.wait_ready(client_for(d), timeout=60).ready
    assert d.count("/v1/") == 2  # agent/self + one nodes list: no blocking query, no pause


def test_wait_keeps_its_deadline_against_a_server_that_never_answers() -> None:
    """A port that accepts connections but never answers (a wedged proxy, a half-started agent) must not
    hold nomad.wait past its timeout: every request is capped by the deadline."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    session = TimeoutRecorder()
    try:
        client = Client(
            Settings(addr=f"http://127.0.0.1:{port}", read_timeout=30.0, retries=0), session=session
        )
        with pytest.raises(WaitTimeout) as err:
            cluster.wait_ready(client, timeout=2)
    finally:
        listener.close()
    # the limits each request was given (not a stopwatch): within the wait's 2 s, not read_timeout's 30 s
    assert session.timeouts and all(max(t) <= 2 for t in session.timeouts), session.timeouts
    text = str(err.value)
    assert f"no answer from Nomad at http://127.0.0.1:{port} within 2s" in text and "did not answer" in text
    assert "last state" not in text

"""Is the Nomad cluster ready to run our jobs? (`inv nomad.wait`) — and a one-screen summary of it.

Ready means: a leader is elected, THIS node (the client of the agent we talk to; any node when that agent
is a server only) is `ready`, `eligible`, not draining, and its docker driver is Detected && Healthy. The
last part matters on a fresh VM: jobs submitted before the docker driver is fingerprinted fail with
"missing drivers": the scheduler places a task only on a node whose driver is Detected &&
Healthy (scheduler/feasible/feasible.go DriverChecker.hasDrivers, FilterConstraintDrivers).

The wait is one blocking query on GET /v1/nodes per state change: the server holds the request until the
node table changes. While there is no leader, Nomad servers hold requests that need one for a short while
(RPC hold) and then answer 500 "No cluster leader"; while the VM boots the port refuses connections.
Both are states shown on the live line, not errors. What waiting cannot heal stops the wait at once with
Nomad's text and a hint: a refused token, "No path to region", a nonexistent namespace, TLS errors.

Which node is "this node" comes from GET /v1/agent/self, which needs `agent:read`
(command/agent/agent_endpoint.go); a token without it (a namespace-scoped deploy token) gets a 403 there,
and the node is then picked from the node list instead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infra.core.waits import Deadline, Probe, wait_until
from infra.nomad.client import Client, NomadAPIError, NomadTLSError, NomadUnreachable

#: Longest single blocking query while waiting; a shorter one is used near the deadline.
BLOCK_SECONDS = 60.0
#: Pause after an answer that did not block (connection refused, "No cluster leader" with no RPC hold).
RETRY_PAUSE = 0.25

WAIT_HINT = (
    "look at the VM's console with `inv vm.logs` and at cloud-init/docker/nomad with `inv vm.check`; "
    "in the VM: `journalctl -u nomad -u docker`"
)


@dataclass
class ClusterState:
    reachable: bool = False
    leader: bool = False
    node_id: str = ""
    node_name: str = ""
    node_status: str = ""
    eligibility: str = ""
    drain: bool = False
    docker_detected: bool = False
    docker_healthy: bool = False
    docker_description: str = ""
    problem: str = ""

    @property
    def ready(self) -> bool:
        return (
            self.leader
            and self.node_status == "ready"
            and self.eligibility == "eligible"
            and not self.drain
            and self.docker_detected
            and self.docker_healthy
        )

    def describe(self) -> str:
        if self.problem:
            return self.problem
        if not self.node_id:
            return "leader elected; no client node registered yet"
        docker = (
            "healthy"
            if self.docker_detected and self.docker_healthy
            else ("detected, unhealthy" if self.docker_detected else "not detected")
        )
        if self.docker_description and not self.docker_healthy:
            docker += f" ({self.docker_description})"
        drain = ", draining" if self.drain else ""
        return (
            f"leader elected; node {self.node_name or self.node_id[:8]} {self.node_status or '?'}, "
            f"{self.eligibility or '?'}{drain}; docker driver {docker}"
        )


def node_state(stub: dict[str, Any], st: ClusterState) -> ClusterState:
    docker = (stub.get("Drivers") or {}).get("docker") or {}
    st.node_id = str(stub.get("ID", ""))
    st.node_name = str(stub.get("Name", ""))
    st.node_status = str(stub.get("Status", ""))
    st.eligibility = str(stub.get("SchedulingEligibility", ""))
    st.drain = bool(stub.get("Drain", False))
    st.docker_detected = bool(docker.get("Detected", False))
    st.docker_healthy = bool(docker.get("Healthy", False))
    st.docker_description = str(docker.get("HealthDescription", "") or "")
    return st


def _pick(nodes: list[dict[str, Any]], node_id: str) -> dict[str, Any] | None:
    if node_id:
        return next((n for n in nodes if n.get("ID") == node_id), None)
    # The agent we talk to is not a client (a remote cluster's server): any node that can run docker.
    for n in nodes:
        if node_state(n, ClusterState(leader=True)).ready:
            return n
    return nodes[0] if nodes else None


class ReadinessProbe:
    """The probe for wait_until; keeps the blocking-query index and this node's ID between calls."""

    def __init__(
        self,
        client: Client,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        observe: Callable[[ClusterState], None] | None = None,
    ) -> None:
        self.client = client
        self.sleep = sleep
        self.clock = clock
        self.observe = observe
        self.index = 0
        self.node_id: str | None = None  # None: not asked yet; "": the agent has no client
        #: The last state Nomad answered with (a look that got no answer does not replace it).
        self.last = ClusterState(problem="no answer yet")

    def __call__(self, deadline: Deadline) -> Probe[ClusterState]:
        st = self._look(deadline)
        if st.reachable:
            self.last = st
        if self.observe:
            self.observe(st)
        # Unreachable (refused, or no answer before the request's deadline): the look learned nothing.
        return Probe(st.ready, st.describe(), st, answered=st.reachable)

    def _look(self, deadline: Deadline) -> ClusterState:
        started = self.clock()
        st = ClusterState()
        try:
            # Every request is bounded by the deadline: a server that accepts and never answers must not
            # hold `inv nomad.wait` past its --timeout.
            if self.node_id is None:
                self.node_id = own_node_id(self.client, timeout=max(0.5, deadline.remaining()))
            wait = max(0.1, min(BLOCK_SECONDS, deadline.remaining()))
            # the client shortens `wait` so that Nomad's jitter (wait/16) still fits the deadline
            res = self.client.nodes(
                index=self.index or None, wait=wait, retries=0, timeout=max(0.5, deadline.remaining())
            )
        except NomadTLSError:
            raise  # a CA or certificate problem does not heal by waiting
        except NomadUnreachable as exc:
            self._pause(started, 0.5)
            st.problem = f"Nomad API not answering ({exc.message.split(': ', 1)[-1]})"
            return st
        except NomadAPIError as exc:
            if exc.no_leader:
                self._pause(started, RETRY_PAUSE)
                st.reachable = True
                st.problem = "Nomad API up; no cluster leader yet"
                return st
            if exc.permanent:
                raise  # a wrong token/region/namespace does not heal by waiting
            self._pause(started, RETRY_PAUSE)
            st.problem = f"Nomad API answered HTTP {exc.status}: {exc.body[:120]}"
            return st
        st.reachable = True
        # A non-stale read answered by the leader; X-Nomad-KnownLeader confirms it when present.
        st.leader = res.known_leader is not False
        if res.index < self.index:  # the index went backwards (new cluster): start over
            self.index = 0
        else:
            self.index = res.index
        nodes = list(res.body or [])
        if not st.leader:
            st.problem = "Nomad API up; no known leader"
            return st
        chosen = _pick(nodes, self.node_id or "")
        if chosen is None:
            st.problem = (
                f"leader elected; this agent's node {self.node_id[:8]} not registered yet"
                if self.node_id
                else "leader elected; no client node registered yet"
            )
            return st
        return node_state(chosen, st)

    def _pause(self, started: float, seconds: float) -> None:
        rest = seconds - (self.clock() - started)
        if rest > 0:
            self.sleep(rest)


def wait_ready(
    client: Client,
    *,
    timeout: float,
    observe: Callable[[ClusterState], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> ClusterState:
    """Block until the cluster can run docker jobs; WaitTimeout with the last state and a hint otherwise.

    `sleep` and `clock` drive the deadline (tests pass a fake clock); each request's own time limit is
    taken from that deadline's `remaining()`."""
    probe = ReadinessProbe(client, sleep=sleep, clock=clock, observe=observe)

    def details() -> list[str]:
        return _node_events(client, probe.last)

    result = wait_until(
        probe,
        what=f"Nomad at {client.addr} (leader, node ready, docker driver healthy)",
        timeout=timeout,
        interval=0,  # the probe blocks server-side
        hint=WAIT_HINT,
        details=details,
        source=f"Nomad at {client.addr}",
        sleep=sleep,
        clock=clock,
    )
    return result.value if result.value is not None else probe.last


# ----------------------------------------------------------------- a local cluster (vm.nodes >= 3) --


@dataclass
class NodesState:
    """A multi-node cluster as `inv nomad.wait` sees it: the Raft servers, the leader, each client node."""

    reachable: bool = False
    leader: str = ""
    peers: list[str] = dataclasses.field(default_factory=list)
    nodes: list[ClusterState] = dataclasses.field(default_factory=list)
    problem: str = ""

    def ready_nodes(self) -> list[ClusterState]:
        return [n for n in self.nodes if n.ready]

    def ready(self, servers: int, nodes: int) -> bool:
        return bool(self.leader) and len(self.peers) >= servers and len(self.ready_nodes()) >= nodes

    def describe(self, servers: int, nodes: int) -> str:
        if self.problem:
            return self.problem
        waiting = [
            f"{n.node_name or n.node_id[:8]}: {n.describe().split('; ', 1)[-1]}"
            for n in self.nodes
            if not n.ready
        ]
        return (
            f"leader {self.leader or 'none'}; {len(self.peers)}/{servers} servers in the Raft configuration; "
            f"{len(self.ready_nodes())}/{nodes} nodes ready" + (f" ({'; '.join(waiting)})" if waiting else "")
        )


class NodesProbe(ReadinessProbe):
    """`wait_nodes`' probe: the Raft peers (GET /v1/status/peers) and every node (a blocking query on
    GET /v1/nodes, whose stubs carry Status, SchedulingEligibility, Drain and Drivers)."""

    def __init__(self, client: Client, *, servers: int, nodes: int, **kw: Any) -> None:
        super().__init__(client, **kw)
        self.servers = servers
        self.expected = nodes
        self.cluster = NodesState(problem="no answer yet")

    def __call__(self, deadline: Deadline) -> Probe[ClusterState]:
        st = self._look_all(deadline)
        ready = st.ready(self.servers, self.expected)
        summary = ClusterState(reachable=st.reachable, leader=bool(st.leader), problem=st.problem)
        if st.reachable:  # a look that got no answer does not replace what Nomad last said
            self.cluster = st
            self.last = summary
        return Probe(ready, st.describe(self.servers, self.expected), summary, answered=st.reachable)

    def _look_all(self, deadline: Deadline) -> NodesState:
        started = self.clock()
        st = NodesState()
        try:
            bound = max(0.5, deadline.remaining())
            st.leader = self.client.leader(retries=0, timeout=bound)
            st.peers = self.client.peers(retries=0, timeout=bound)
            # block only while the Raft part is complete: a peer joining does not move the nodes' index
            blocking = st.leader and len(st.peers) >= self.servers
            wait = max(0.1, min(BLOCK_SECONDS, deadline.remaining())) if blocking else None
            res = self.client.nodes(
                index=(self.index or None) if blocking else None, wait=wait, retries=0,
                timeout=max(0.5, deadline.remaining()),
            )  # fmt: skip
        except NomadTLSError:
            raise
        except NomadUnreachable as exc:
            self._pause(started, 0.5)
            st.problem = f"Nomad API not answering ({exc.message.split(': ', 1)[-1]})"
            return st
        except NomadAPIError as exc:
            if exc.permanent:
                raise
            self._pause(started, RETRY_PAUSE if exc.no_leader else 1.0)
            st.reachable = True
            st.problem = (
                "Nomad API up; no cluster leader yet"
                if exc.no_leader
                else f"HTTP {exc.status}: {exc.body[:120]}"
            )
            return st
        st.reachable = True
        self.index = 0 if res.index < self.index else res.index
        st.nodes = [node_state(stub, ClusterState(leader=True)) for stub in list(res.body or [])]
        if not (st.leader and len(st.peers) >= self.servers):
            self._pause(started, 1.0)  # peers are polled: nothing to block on
        return st


def wait_nodes(
    client: Client,
    *,
    servers: int,
    nodes: int,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> NodesState:
    """`inv nomad.wait` for a cluster: a leader, `servers` servers in the Raft configuration and `nodes`
    ready, eligible nodes with a healthy docker driver.

    `sleep` and `clock` drive the deadline as in `wait_ready`; a look that got no answer (the last request
    cut by the deadline, say) does not replace the last state Nomad answered with in the timeout message."""
    probe = NodesProbe(client, servers=servers, nodes=nodes, sleep=sleep, clock=clock)
    wait_until(
        probe,
        what=f"Nomad at {client.addr} (leader, {servers} servers, {nodes} nodes ready with docker)",
        timeout=timeout,
        interval=0,
        hint=WAIT_HINT,
        source=f"Nomad at {client.addr}",
        sleep=sleep,
        clock=clock,
    )
    return probe.cluster


def _node_events(client: Client, st: ClusterState) -> list[str]:
    """The node's last events (registration, driver health changes), for a timeout message."""
    lines: list[str] = []
    if st.docker_description:
        lines.append(f"docker driver: {st.docker_description}")
    if not st.node_id:
        return lines
    try:
        node = client.node(st.node_id).body or {}
    except (NomadAPIError, NomadUnreachable):
        return lines
    for ev in (node.get("Events") or [])[-5:]:
        lines.append(f"node event [{ev.get('Subsystem', '')}] {ev.get('Message', '')}")
    return lines


def own_node_id(client: Client, **kw: Any) -> str:
    """The node ID of the agent we talk to ("" when it runs no client, or the token may not ask)."""
    try:
        me = client.agent_self(retries=0, **kw)
    except NomadAPIError as exc:
        if exc.status == 403:  # no agent:read (command/agent/agent_endpoint.go AgentSelfRequest)
            return ""
        raise
    return str(((me.get("stats") or {}).get("client") or {}).get("node_id") or "")


def is_ready(client: Client) -> ClusterState:
    """One quick non-blocking look (for `inv status` and `inv up`'s skip check). Raises NomadAPIError
    when waiting would not help (403, no path to region, ...)."""
    st = ClusterState()
    try:
        node_id = own_node_id(client)
        res = client.nodes(retries=0)
    except NomadUnreachable as exc:
        st.problem = f"unreachable: {exc.message}"
        return st
    except NomadAPIError as exc:
        st.reachable = True
        st.problem = "no cluster leader" if exc.no_leader else f"HTTP {exc.status}: {exc.body[:120]}"
        if exc.permanent:
            raise
        return st
    st.reachable = True
    st.leader = res.known_leader is not False
    chosen = _pick(list(res.body or []), node_id)
    if chosen is not None:
        node_state(chosen, st)
    return st


def leader_address(client: Client) -> str:
    try:
        return client.leader(retries=0)
    except (NomadAPIError, NomadUnreachable):
        return ""

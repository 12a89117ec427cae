"""A STATEFUL TEST DOUBLE of Nomad's HTTP API — not Nomad, and not a mock of our client.

A real Nomad cannot run on our machines (no binary obtainable), so the client and the deploy flow are
tested against this double, served by pytest-httpserver (threaded, optionally TLS). Its responses follow
the shapes in Nomad's API docs (website/content/api-docs/*.mdx in hashicorp/nomad; summarised with sources
in /tmp/research/nomad-api.md): status/leader, agent/self, agent/health, nodes, node/:id, jobs/parse, jobs,
job/:id, job/:id/plan, job/:id/allocations, job/:id/deployment, deployment/:id, deployment/promote/:id,
evaluation/:id, allocation/:id, var/:path, DELETE job/:id?purge=true.

What it models:
- one raft index; a per-table index (nodes, jobs, evals, deployments, allocs, vars) returned as
  X-Nomad-Index; BLOCKING QUERIES: `?index=N&wait=D` holds the request until the table's index passes N
  or D elapses (the handler thread waits on a condition variable);
- no leader: requests that need one are held for `rpc_hold` seconds (Nomad servers hold RPCs while no
  leader is known) and then answered 500 "No cluster leader"; agent/self, agent/health, status/* answer;
- state that changes over time on a schedule (`at(seconds, fn)`; real clock): the leader appears, the
  node registers, becomes ready, the docker driver becomes healthy; allocations go pending -> running ->
  healthy (or fail), deployments running -> successful / failed (+ auto-revert), canaries wait for
  promotion; purge stops allocations and they turn `complete` a moment later;
- a scheduler: a group is placed only on a ready node whose driver is detected and healthy ("missing
  drivers" in FailedTGAllocs.ConstraintFiltered otherwise) and with enough memory ("memory" in
  DimensionExhausted), with a blocked evaluation;
- ACLs: with `acl_token` set, no token -> 403 "Permission denied", a wrong one -> 403 "ACL token not found";
- Variables with check-and-set (`?cas=`; 409 with the current variable on conflict);
- plan diffs: "Added", "Edited", "None" against the registered version; EnforceIndex on register.

LIMITATION — jobs/parse: the double does not implement HCL2. It reads a small subset: `variable` blocks
with `default`, one `job "name"` block, nested blocks `name "label" {` ... `}` (one per line, or an empty /
single-attribute block on one line), attributes `key = value` with string, number, bool, `var.x`,
`"${var.x}"` interpolation, one-line or multi-line lists of literals, `<<EOF` heredocs. Functions,
locals, dynamic blocks and other expressions answer 400 like a parse error. Variables passed in that the
file does not declare are a 400 too. Real job specs beyond that subset are exercised by the replay test
and, for real, only against a real Nomad.

Task behaviour is chosen per task image or task name: `behaviour["img:tag"] = "driver-failure"`, or
"exit-1", or "ok" (default).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

NODE_ID = "f7476465-4d6e-c0de-26d0-e383c49be941"
LEADER_ADDR = "10.0.2.15:4647"


@dataclass
class Timing:
    """Seconds between simulated steps (small, so tests are fast)."""

    evaluate: float = 0.05
    alloc_start: float = 0.05
    alloc_running: float = 0.05
    alloc_healthy: float = 0.1
    alloc_stop: float = 0.15
    gc_after: float | None = None  # remove stopped allocations this long after they stop


@dataclass
class Request_:
    t: float
    method: str
    path: str
    query: dict[str, str]
    status: int = 0


def now_ns() -> int:
    return time.time_ns()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HCLSubsetError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"input.hcl:{line},1-2: {message}")


@dataclass
class Block:
    type: str
    labels: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)

    def children(self, kind: str) -> list[Block]:
        return [b for b in self.blocks if b.type == kind]

    def child(self, kind: str) -> Block | None:
        found = self.children(kind)
        return found[0] if found else None


_BLOCK = re.compile(r'^([A-Za-z_][\w-]*)((?:\s+"[^"]*")*)\s*\{\s*$')
_ONE_LINE_BLOCK = re.compile(r'^([A-Za-z_][\w-]*)((?:\s+"[^"]*")*)\s*\{\s*(.*?)\s*\}\s*$')
_ATTR = re.compile(r"^([A-Za-z_][\w-]*)\s*=\s*(.*?)\s*$")
_INTERP = re.compile(r"\$\{\s*var\.([A-Za-z_][\w-]*)\s*\}")


class HCLSubset:
    """See the module docstring: a deliberately small reader, not HCL2."""

    def __init__(self, text: str, variables: dict[str, Any] | None = None) -> None:
        self.lines = text.splitlines()
        self.vars = variables or {}
        self.pos = 0

    def parse(self) -> Block:
        root = Block("root", [])
        stack = [root]
        while self.pos < len(self.lines):
            lineno = self.pos + 1
            raw = self.lines[self.pos]
            self.pos += 1
            line = raw.strip()
            if not line or line.startswith(("#", "//")):
                continue
            if line == "}":
                if len(stack) == 1:
                    raise HCLSubsetError(lineno, "Argument or block definition required: unexpected }")
                stack.pop()
                continue
            m = _BLOCK.match(line)
            if m:
                blk = Block(m.group(1), re.findall(r'"([^"]*)"', m.group(2)))
                stack[-1].blocks.append(blk)
                stack.append(blk)
                continue
            m = _ONE_LINE_BLOCK.match(line)
            if m:
                blk = Block(m.group(1), re.findall(r'"([^"]*)"', m.group(2)))
                inner = m.group(3)
                if inner:
                    am = _ATTR.match(inner)
                    if not am:
                        raise HCLSubsetError(lineno, f"Unsupported one-line block body: {inner}")
                    blk.attrs[am.group(1)] = self.value(am.group(2), lineno)
                stack[-1].blocks.append(blk)
                continue
            m = _ATTR.match(line)
            if m:
                key, rest = m.group(1), m.group(2)
                if rest == "{":  # a map attribute (meta = {): keep it as a block
                    blk = Block(key, [])
                    stack[-1].blocks.append(blk)
                    stack.append(blk)
                    continue
                stack[-1].attrs[key] = self.value(rest, lineno)
                continue
            raise HCLSubsetError(lineno, f"Invalid expression: {line[:60]}")
        if len(stack) != 1:
            raise HCLSubsetError(len(self.lines), "Unclosed configuration block")
        return root

    def value(self, text: str, lineno: int) -> Any:
        text = re.sub(r"\s+(#|//).*$", "", text) if not text.startswith('"') else text
        if text.startswith("<<"):
            marker = text.lstrip("<-").strip()
            body = []
            while self.pos < len(self.lines) and self.lines[self.pos].strip() != marker:
                body.append(self.lines[self.pos])
                self.pos += 1
            if self.pos >= len(self.lines):
                raise HCLSubsetError(lineno, f"Unterminated template string (heredoc {marker})")
            self.pos += 1
            return "\n".join(body) + "\n"
        if text.startswith("[") and not text.rstrip().endswith("]"):
            while self.pos < len(self.lines):
                item = self.lines[self.pos].strip()
                self.pos += 1
                if item.startswith(("#", "//")):
                    continue
                text += " " + item
                if text.rstrip().endswith("]"):
                    break
        if text.startswith("["):
            inner = text.strip()[1:-1].strip().rstrip(",")
            if not inner:
                return []
            return [self.value(part.strip(), lineno) for part in _split_list(inner)]
        if text.startswith('"'):
            try:
                s = json.loads(text)
            except ValueError as exc:
                raise HCLSubsetError(lineno, f"Invalid string: {text[:60]}") from exc
            return _INTERP.sub(lambda mm: str(self.var(mm.group(1), lineno)), s)
        if text in ("true", "false"):
            return text == "true"
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if re.fullmatch(r"-?\d+\.\d+", text):
            return float(text)
        if re.fullmatch(r"(string|number|bool|any)|(list|set|map)\((string|number|bool|any)\)", text):
            return text  # a variable's type constraint
        m = re.fullmatch(r"var\.([A-Za-z_][\w-]*)", text)
        if m:
            return self.var(m.group(1), lineno)
        raise HCLSubsetError(lineno, f"Unsupported expression (the double reads an HCL subset): {text[:60]}")

    def var(self, name: str, lineno: int) -> Any:
        if name not in self.vars:
            raise HCLSubsetError(lineno, f'Reference to undeclared input variable "{name}"')
        value = self.vars[name]
        if value is _REQUIRED:
            raise HCLSubsetError(lineno, f'Missing required variable: "{name}" has no value')
        return value


_REQUIRED = object()


def _split_list(inner: str) -> list[str]:
    parts, cur, quoted = [], "", False
    for ch in inner:
        if ch == '"' and not cur.endswith("\\"):
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def parse_job_hcl(hcl: str, variables_text: str) -> dict[str, Any]:
    """JobHCL + Variables (a var file) -> canonical-ish Job JSON, or HCLSubsetError."""
    # Pass 1: declared variables and defaults (no var references allowed in defaults).
    decl_root = HCLSubset(_only_variable_blocks(hcl)).parse()
    declared: dict[str, Any] = {}
    for v in decl_root.children("variable"):
        declared[v.labels[0]] = v.attrs.get("default", _REQUIRED)
    given = HCLSubset(variables_text).parse().attrs if variables_text.strip() else {}
    for name in given:
        if name not in declared:
            raise HCLSubsetError(
                1, f'Undeclared variable: a value was given for "{name}", which the job does not declare'
            )
    values = {**declared, **given}
    root = HCLSubset(hcl, values).parse()
    jobs = root.children("job")
    if len(jobs) != 1 or not jobs[0].labels:
        raise HCLSubsetError(1, 'expected exactly one job "name" block')
    jb = jobs[0]
    job_update = jb.child("update")
    groups = []
    for g in jb.children("group"):
        upd = {
            **(job_update.attrs if job_update else {}),
            **(g.child("update").attrs if g.child("update") else {}),
        }
        tasks = []
        for t in g.children("task"):
            res = t.child("resources")
            tasks.append(
                {
                    "Name": t.labels[0],
                    "Driver": t.attrs.get("driver", ""),
                    "Config": dict(t.child("config").attrs) if t.child("config") else {},
                    "Env": dict(t.child("env").attrs) if t.child("env") else None,
                    "Resources": {
                        "CPU": (res.attrs.get("cpu", 100) if res else 100),
                        "MemoryMB": (res.attrs.get("memory", 300) if res else 300),
                    },
                    "Templates": [
                        {
                            "EmbeddedTmpl": tp.attrs.get("data", ""),
                            "DestPath": tp.attrs.get("destination", ""),
                        }
                        for tp in t.children("template")
                    ]
                    or None,
                }
            )
        groups.append(
            {
                "Name": g.labels[0],
                "Count": g.attrs.get("count", 1),
                "Update": _update(upd) if (upd or jb.attrs.get("type", "service") == "service") else None,
                "Tasks": tasks,
            }
        )
    return {
        "ID": jb.labels[0],
        "Name": jb.labels[0],
        "Namespace": jb.attrs.get("namespace", "default"),
        "Region": jb.attrs.get("region", "global"),
        "Type": jb.attrs.get("type", "service"),
        "Priority": jb.attrs.get("priority", 50),
        "Datacenters": jb.attrs.get("datacenters", ["*"]),
        "NodePool": jb.attrs.get("node_pool", "default"),
        "Update": _update(job_update.attrs if job_update else {}),
        "TaskGroups": groups,
        "Meta": dict(jb.child("meta").attrs) if jb.child("meta") else None,
        "Status": "",
        "Stop": False,
        "Stable": False,
        "Version": 0,
        "SubmitTime": None,
        "CreateIndex": 0,
        "ModifyIndex": 0,
        "JobModifyIndex": 0,
    }


def _only_variable_blocks(hcl: str) -> str:
    out, depth, keep = [], 0, False
    for line in hcl.splitlines():
        s = line.strip()
        if depth == 0 and re.match(r'^variable\s+"[^"]+"\s*\{', s):
            keep = True
        out.append(line if keep else "")  # blank lines keep the line numbers of diagnostics
        if not s.startswith(("#", "//")):
            depth += s.count("{") - s.count("}")
        if depth == 0:
            keep = False
    return "\n".join(out)


def _update(attrs: dict[str, Any]) -> dict[str, Any]:
    return {
        "MaxParallel": attrs.get("max_parallel", 1),
        "HealthCheck": attrs.get("health_check", "checks"),
        "MinHealthyTime": attrs.get("min_healthy_time", "10s"),
        "HealthyDeadline": attrs.get("healthy_deadline", "5m"),
        "ProgressDeadline": attrs.get("progress_deadline", "10m"),
        "AutoRevert": attrs.get("auto_revert", False),
        "AutoPromote": attrs.get("auto_promote", False),
        "Canary": attrs.get("canary", 0),
    }


#: Fields of a stored job that are bookkeeping, not specification (ignored by the plan diff).
_BOOKKEEPING = (
    "Status", "Stable", "Version", "SubmitTime", "CreateIndex", "ModifyIndex", "JobModifyIndex", "Stop",
    "StatusDescription",
)  # fmt: skip


def _spec(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in _BOOKKEEPING}


class NomadAPIDouble:
    """The double. Start with `start()` (or `start(after=0.5)` for connection refused while booting)."""

    TABLES = ("nodes", "jobs", "evals", "deployments", "allocs", "vars")

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        acl_token: str | None = None,
        rpc_hold: float = 1.0,
        timing: Timing | None = None,
        node_memory_mb: int = 3800,
        node_name: str = "nomad-1",
    ) -> None:
        self.port = free_port()
        self.server = HTTPServer(host="127.0.0.1", port=self.port, ssl_context=ssl_context, threaded=True)
        self.server.expect_request(re.compile(r"^/.*")).respond_with_handler(self._handle)
        self.scheme = "https" if ssl_context else "http"
        self.acl_token = acl_token
        self.rpc_hold = rpc_hold
        self.timing = timing or Timing()
        self.node_memory_mb = node_memory_mb
        self.node_name = node_name
        self.cond = threading.Condition(threading.RLock())
        self.index = 10
        self.tables = dict.fromkeys(self.TABLES, 1)
        self.leader = ""
        self.node: dict[str, Any] | None = None
        self.jobs: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.allocs: dict[str, dict[str, Any]] = {}
        self.vars: dict[str, dict[str, Any]] = {}
        self.behaviour: dict[str, str] = {}
        self.requests: list[Request_] = []
        self.changes: list[tuple[float, str]] = []  # (monotonic time, what changed), for the benchmark
        self.errors: list[str] = []
        self.fail_next: list[tuple[str, int, str]] = []  # (path regex, status, body): one-shot faults
        self.parse_calls: list[dict[str, Any]] = []
        self._closed = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._timer_cond = threading.Condition()
        self._timer_thread = threading.Thread(target=self._run_timers, daemon=True, name="nomad-double-clock")
        self._starter: threading.Thread | None = None

    # -------------------------------------------------------------------------------------- lifecycle --
    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, after: float = 0.0) -> NomadAPIDouble:
        """Listen now, or after `after` seconds (connections are refused until then, like a booting VM)."""
        self._timer_thread.start()
        if after <= 0:
            self.server.start()
        else:
            self._starter = threading.Thread(target=self._start_later, args=(after,), daemon=True)
            self._starter.start()
        return self

    def _start_later(self, after: float) -> None:
        time.sleep(after)
        if not self._closed:
            self.server.start()
            self.changes.append((time.monotonic(), "api up"))

    def stop(self) -> None:
        with self.cond:
            self._closed = True
            self.cond.notify_all()
        with self._timer_cond:
            self._timer_cond.notify_all()
        if self._starter is not None:
            self._starter.join()
        if self.server.is_running():
            self.server.stop()
        self._timer_thread.join(timeout=2)

    def __enter__(self) -> NomadAPIDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ clock --
    def at(self, delay: float, fn: Callable[[], None]) -> None:
        """Run `fn` (under the state lock) `delay` seconds from now."""
        with self._timer_cond:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
            self._timer_cond.notify_all()

    def _run_timers(self) -> None:
        while not self._closed:
            with self._timer_cond:
                if not self._timers:
                    self._timer_cond.wait(0.5)
                    continue
                due, _, fn = self._timers[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._timer_cond.wait(delay)
                    continue
                heapq.heappop(self._timers)
            try:
                with self.cond:
                    fn()
            except Exception as exc:  # surfaced by tests through `errors`
                self.errors.append(f"timer {fn}: {exc!r}")

    def _bump(self, *tables: str, change: str = "") -> int:
        with self.cond:
            self.index += 1
            for t in tables:
                self.tables[t] = self.index
            if change:
                self.changes.append((time.monotonic(), change))
            self.cond.notify_all()
            return self.index

    # ------------------------------------------------------------------------------------ cluster state --
    def elect_leader(self) -> None:
        with self.cond:
            self.leader = LEADER_ADDR
            self._bump("nodes", change="leader elected")

    def lose_leader(self) -> None:
        with self.cond:
            self.leader = ""
            self._bump(change="leader lost")

    def register_node(self, *, status: str = "initializing", docker: str = "undetected") -> None:
        with self.cond:
            self.node = {
                "ID": NODE_ID,
                "Name": self.node_name,
                "Address": "10.0.2.15",
                "Datacenter": "dc1",
                "NodeClass": "",
                "NodePool": "default",
                "Version": "2.0.7",
                "Drain": False,
                "LastDrain": None,
                "SchedulingEligibility": "eligible",
                "Status": status,
                "StatusDescription": "",
                "Drivers": {},
                "Attributes": {"kernel.name": "linux", "unique.network.ip-address": "10.0.2.15"},
                "NodeResources": {"Cpu": {"CpuShares": 4000}, "Memory": {"MemoryMB": self.node_memory_mb}},
                "Events": [{"CreateIndex": 0, "Details": None, "Message": "Node registered",
                            "Subsystem": "Cluster", "Timestamp": "2026-11-25T09:00:00Z"}],
                "CreateIndex": self.index,
                "ModifyIndex": self.index,
            }  # fmt: skip
            self._set_docker(docker)
            self._bump("nodes", change="node registered")

    def set_node(self, **fields: Any) -> None:
        with self.cond:
            assert self.node is not None, "register_node first"
            self.node.update(fields)
            what = ", ".join(f"{k}={v}" for k, v in fields.items())
            self.node["ModifyIndex"] = self._bump("nodes", change=f"node {what}")
            self._unblock()

    def set_docker(self, state: str) -> None:
        """state: undetected | unhealthy | healthy"""
        with self.cond:
            self._set_docker(state)
            assert self.node is not None
            self.node["ModifyIndex"] = self._bump("nodes", change=f"docker {state}")
            self._unblock()

    def _unblock(self) -> None:
        """A node change re-enqueues blocked evaluations (Nomad's blocked-evals tracker does the same)."""
        for ev in list(self.evals.values()):
            if ev["Status"] == "blocked":
                ev["Status"] = "pending"
                ev["ModifyIndex"] = self._bump("evals")
                self.at(self.timing.evaluate, lambda ev=ev: self._evaluate(ev["ID"]))

    def _set_docker(self, state: str) -> None:
        assert self.node is not None
        detected = state != "undetected"
        healthy = state == "healthy"
        self.node["Drivers"]["docker"] = {
            "Attributes": {"driver.docker.version": "26.1.5"} if detected else None,
            "Detected": detected,
            "Healthy": healthy,
            "HealthDescription": (
                "Healthy"
                if healthy
                else ("Docker is unresponsive" if detected else "Driver docker not detected")
            ),
            "UpdateTime": "2026-11-25T09:00:00Z",
        }
        self.node["Attributes"]["driver.docker"] = "1" if detected else None
        if detected:
            self.node["Events"].append({"CreateIndex": self.index, "Details": {"driver": "docker"},
                                        "Message": f"Driver docker is {'healthy' if healthy else 'unhealthy'}",
                                        "Subsystem": "Driver", "Timestamp": "2026-11-25T09:00:01Z"})  # fmt: skip

    def ready_now(self) -> NomadAPIDouble:
        """A settled single-node cluster: leader, node ready, docker healthy."""
        with self.cond:
            self.leader = LEADER_ADDR
            self.register_node(status="ready", docker="healthy")
        return self

    def boot(
        self, *, leader: float = 0.2, node: float = 0.3, ready: float = 0.4, docker: float = 0.5
    ) -> NomadAPIDouble:
        """Schedule a boot: leader elected, node registers (initializing), turns ready, docker healthy."""
        self.at(leader, self.elect_leader)
        self.at(node, lambda: self.register_node(status="initializing", docker="undetected"))
        self.at(ready, lambda: self.set_node(Status="ready"))
        self.at(docker, lambda: self.set_docker("healthy"))
        return self

    # ------------------------------------------------------------------------------------------ HTTP --
    def count(self, path_regex: str = ".*", method: str | None = None) -> int:
        return sum(
            1
            for r in self.requests
            if re.search(path_regex, r.path) and (method is None or r.method == method)
        )

    def _handle(self, request: Request) -> Response:
        rec = Request_(time.monotonic(), request.method, request.path, dict(request.args))
        self.requests.append(rec)
        try:
            resp = self._route(request)
        except _HTTPError as err:
            resp = Response(err.body, status=err.status, content_type="text/plain; charset=utf-8")
        except Exception as exc:  # a bug in the double: make it loud
            self.errors.append(f"{request.method} {request.path}: {exc!r}")
            raise
        rec.status = resp.status_code
        return resp

    def _json(self, body: Any, table: str | None = None) -> Response:
        headers = {
            "X-Nomad-Index": str(self.tables[table] if table else self.index),
            "X-Nomad-KnownLeader": "true" if self.leader else "false",
            "X-Nomad-LastContact": "0",
        }
        return Response(json.dumps(body), status=200, content_type="application/json", headers=headers)

    def _acl(self, request: Request) -> None:
        if self.acl_token is None:
            return
        token = request.headers.get("X-Nomad-Token", "")
        if not token:
            raise _HTTPError(403, "Permission denied")
        if token != self.acl_token:
            raise _HTTPError(403, "ACL token not found")

    def _hold_for_leader(self) -> None:
        end = time.monotonic() + self.rpc_hold
        with self.cond:
            while not self.leader and not self._closed:
                rest = end - time.monotonic()
                if rest <= 0:
                    raise _HTTPError(500, "No cluster leader")
                self.cond.wait(rest)

    def _block(self, request: Request, table: str) -> None:
        """Blocking query: hold while the table's index <= ?index, up to ?wait (default 5m, max 10m)."""
        try:
            index = int(request.args.get("index", "0"))
        except ValueError:
            raise _HTTPError(400, "Failed to parse index") from None
        if index <= 0:
            return
        wait = _duration(request.args.get("wait", "5m"))
        end = time.monotonic() + min(wait, 600.0)
        with self.cond:
            while self.tables[table] <= index and not self._closed:
                rest = end - time.monotonic()
                if rest <= 0:
                    return
                self.cond.wait(rest)

    def _route(self, request: Request) -> Response:
        path, method = request.path, request.method
        for regex, status, body in list(self.fail_next):
            if re.search(regex, path):
                self.fail_next.remove((regex, status, body))
                raise _HTTPError(status, body)
        if path == "/v1/agent/health":
            return self._health()
        self._acl(request)
        if path == "/v1/status/leader":
            return self._json(self.leader)
        if path == "/v1/status/peers":
            return self._json([self.leader] if self.leader else [])
        if path == "/v1/agent/self":
            return self._json(self._agent_self())
        self._hold_for_leader()
        body = _body(request)
        routes: list[tuple[str, str, Callable[..., Response]]] = [
            ("GET", r"/v1/nodes", self._nodes),
            ("GET", r"/v1/node/(?P<id>[^/]+)", self._node),
            ("POST", r"/v1/jobs/parse", self._parse),
            ("GET", r"/v1/jobs", self._jobs),
            ("POST", r"/v1/jobs", self._register),
            ("POST", r"/v1/job/(?P<id>[^/]+)/plan", self._plan),
            ("GET", r"/v1/job/(?P<id>[^/]+)/allocations", self._job_allocs),
            ("GET", r"/v1/job/(?P<id>[^/]+)/deployment", self._job_deployment),
            ("GET", r"/v1/job/(?P<id>[^/]+)/evaluations", self._job_evals),
            ("GET", r"/v1/job/(?P<id>[^/]+)", self._job),
            ("DELETE", r"/v1/job/(?P<id>[^/]+)", self._deregister),
            ("GET", r"/v1/deployment/(?P<id>[^/]+)", self._deployment),
            ("POST", r"/v1/deployment/promote/(?P<id>[^/]+)", self._promote),
            ("GET", r"/v1/evaluation/(?P<id>[^/]+)", self._evaluation),
            ("GET", r"/v1/allocation/(?P<id>[^/]+)", self._allocation),
            ("GET", r"/v1/var/(?P<id>.+)", self._var_get),
            ("PUT", r"/v1/var/(?P<id>.+)", self._var_put),
        ]
        for m_, regex, fn in routes:
            mm = re.fullmatch(regex, path)
            if mm and m_ == method:
                return fn(request, body, **mm.groupdict())
        raise _HTTPError(404, "Invalid URL")

    # ---------------------------------------------------------------------------------------- agent --
    def _agent_self(self) -> dict[str, Any]:
        return {
            "config": {"Region": "global", "Datacenter": "dc1", "NodeName": self.node_name,
                       "Client": {"Enabled": True}, "Server": {"Enabled": True, "BootstrapExpect": 1},
                       "Version": {"Version": "2.0.7"}},
            "member": {"Name": f"{self.node_name}.global", "Addr": "10.0.2.15", "Port": 4648,
                       "Status": "alive", "Tags": {"role": "nomad", "region": "global", "dc": "dc1"}},
            "stats": {"client": {"node_id": NODE_ID, "known_servers": "10.0.2.15:4647",
                                 "num_allocations": str(len(self.allocs))},
                      "nomad": {"leader": "true" if self.leader else "false", "server": "true",
                                "leader_addr": self.leader, "known_regions": "1"}},
        }  # fmt: skip

    def _health(self) -> Response:
        client_ok = self.node is not None and self.node["Status"] == "ready"
        server_ok = bool(self.leader)
        body = {
            "client": {"ok": client_ok, "message": "ok" if client_ok else "client not yet registered"},
            "server": {"ok": server_ok, "message": "ok" if server_ok else "No cluster leader"},
        }
        status = 200 if client_ok and server_ok else 500
        return Response(json.dumps(body), status=status, content_type="application/json")

    def _nodes(self, request: Request, body: Any) -> Response:
        self._block(request, "nodes")
        with self.cond:
            stubs = []
            if self.node:
                stub = {
                    k: copy.deepcopy(v)
                    for k, v in self.node.items()
                    if k not in ("Attributes", "Events", "NodeResources")
                }
                stubs.append(stub)
            return self._json(stubs, "nodes")

    def _node(self, request: Request, body: Any, id: str) -> Response:
        self._block(request, "nodes")
        with self.cond:
            if not self.node or self.node["ID"] != id:
                raise _HTTPError(404, "node not found")
            return self._json(copy.deepcopy(self.node), "nodes")

    # ------------------------------------------------------------------------------------------ jobs --
    def _parse(self, request: Request, body: Any) -> Response:
        self.parse_calls.append(body)
        if not isinstance(body, dict) or "JobHCL" not in body:
            raise _HTTPError(400, "Job HCL is required")
        try:
            job = parse_job_hcl(body["JobHCL"], body.get("Variables") or "")
        except HCLSubsetError as exc:
            raise _HTTPError(400, f"error parsing: {exc}") from None
        return self._json(job)

    def _jobs(self, request: Request, body: Any) -> Response:
        self._block(request, "jobs")
        with self.cond:
            prefix = request.args.get("prefix", "")
            stubs = [
                {k: j.get(k) for k in ("ID", "Name", "Namespace", "Type", "Priority", "Status", "Stop",
                                       "Version", "CreateIndex", "ModifyIndex", "JobModifyIndex")}
                for j in self.jobs.values() if j["ID"].startswith(prefix)
            ]  # fmt: skip
            return self._json(stubs, "jobs")

    def _job(self, request: Request, body: Any, id: str) -> Response:
        self._block(request, "jobs")
        with self.cond:
            if id not in self.jobs:
                raise _HTTPError(404, "job not found")
            return self._json(copy.deepcopy(self.jobs[id]), "jobs")

    def _plan(self, request: Request, body: Any, id: str) -> Response:
        job = body["Job"]
        with self.cond:
            current = self.jobs.get(id)
            if current is None:
                kind = "Added"
            elif current.get("Stop") or _spec(current) != _spec(job):
                kind = "Edited"
            else:
                kind = "None"
            groups = []
            for tg in job.get("TaskGroups") or []:
                old = next(
                    (g for g in (current or {}).get("TaskGroups") or [] if g["Name"] == tg["Name"]), None
                )
                if old is None:
                    groups.append({"Name": tg["Name"], "Type": "Added", "Updates": {"create": tg["Count"]}})
                elif old == tg and kind == "None":
                    groups.append({"Name": tg["Name"], "Type": "None", "Updates": {"ignore": tg["Count"]}})
                else:
                    groups.append({"Name": tg["Name"], "Type": "Edited",
                                   "Updates": {"create/destroy update": tg["Count"]}})  # fmt: skip
            failed = self._feasibility(job)
            return self._json(
                {
                    "Index": self.index,
                    "NextPeriodicLaunch": "0001-01-01T00:00:00Z",
                    "Warnings": "",
                    "Diff": {"Type": kind, "ID": id, "Fields": None, "Objects": None, "TaskGroups": groups},
                    "CreatedEvals": None,
                    "JobModifyIndex": current["JobModifyIndex"] if current else 0,
                    "FailedTGAllocs": failed or None,
                    "Annotations": {"DesiredTGUpdates": {}},
                }
            )

    def _register(self, request: Request, body: Any) -> Response:
        job = copy.deepcopy(body["Job"])
        job_id = job["ID"]
        with self.cond:
            current = self.jobs.get(job_id)
            if body.get("EnforceIndex"):
                have = current["JobModifyIndex"] if current else 0
                want = int(body.get("JobModifyIndex") or 0)
                if have != want:
                    raise _HTTPError(
                        500,
                        f"Enforcing job modify index {want}: job exists with conflicting job modify index: {have}"
                        if current
                        else f"Enforcing job modify index {want}: job does not exist",
                    )
            unchanged = current is not None and not current.get("Stop") and _spec(current) == _spec(job)
            if unchanged:
                assert current is not None
                job_modify_index = current["JobModifyIndex"]
            else:
                job_modify_index = self._store_version(job, current)
            ev = self._new_eval(job_id, "job-register", job_modify_index)
            self.at(self.timing.evaluate, lambda: self._evaluate(ev["ID"], noop=unchanged))
            return self._json(
                {"EvalID": ev["ID"], "EvalCreateIndex": ev["CreateIndex"], "JobModifyIndex": job_modify_index,
                 "Warnings": "", "Index": ev["CreateIndex"], "LastContact": 0, "KnownLeader": True}
            )  # fmt: skip

    def _store_version(self, job: dict[str, Any], current: dict[str, Any] | None) -> int:
        job_id = job["ID"]
        history = self.versions.setdefault(job_id, [])
        version = (history[-1]["Version"] + 1) if history else 0
        idx = self._bump("jobs", change=f"job {job_id} v{version} registered")
        job.update(
            Version=version, Status="pending", Stop=False, Stable=False, SubmitTime=now_ns(),
            CreateIndex=current["CreateIndex"] if current else idx, ModifyIndex=idx, JobModifyIndex=idx,
        )  # fmt: skip
        self.jobs[job_id] = job
        history.append(copy.deepcopy(job))
        return idx

    def _new_eval(
        self, job_id: str, trigger: str, job_modify_index: int, status: str = "pending"
    ) -> dict[str, Any]:
        idx = self._bump("evals")
        ev = {
            "ID": str(uuid.uuid4()), "Namespace": "default", "Priority": 50, "Type": "service",
            "TriggeredBy": trigger, "JobID": job_id, "JobModifyIndex": job_modify_index, "NodeID": "",
            "NodeModifyIndex": 0, "DeploymentID": "", "Status": status, "StatusDescription": "", "Wait": 0,
            "NextEval": "", "PreviousEval": "", "BlockedEval": "", "FailedTGAllocs": None,
            "ClassEligibility": None, "EscapedComputedClass": False, "AnnotatePlan": False,
            "QueuedAllocations": {}, "SnapshotIndex": idx, "CreateIndex": idx, "ModifyIndex": idx,
            "CreateTime": now_ns(), "ModifyTime": now_ns(),
        }  # fmt: skip
        self.evals[ev["ID"]] = ev
        return ev

    def _finish_eval(self, ev: dict[str, Any], **fields: Any) -> None:
        ev.update(fields)
        ev["Status"] = fields.get("Status", "complete")
        ev["ModifyIndex"] = self._bump("evals", change=f"eval {ev['ID'][:8]} {ev['Status']}")
        ev["ModifyTime"] = now_ns()

    def _feasibility(self, job: dict[str, Any]) -> dict[str, Any]:
        """FailedTGAllocs for groups that do not fit the node (drivers, memory)."""
        failed: dict[str, Any] = {}
        node = self.node
        for tg in job.get("TaskGroups") or []:
            metric: dict[str, Any] = {
                "NodesEvaluated": 0, "NodesFiltered": 0, "NodesInPool": 1 if node else 0,
                "NodesAvailable": {"dc1": 1 if node and node["Status"] == "ready" else 0},
                "ClassFiltered": None, "ConstraintFiltered": None, "NodesExhausted": 0,
                "ClassExhausted": None, "DimensionExhausted": None, "QuotaExhausted": None,
                "ResourcesExhausted": None, "Scores": None, "ScoreMetaData": None, "AllocationTime": 41000,
                "CoalescedFailures": max(0, int(tg.get("Count", 1)) - 1),
            }  # fmt: skip
            if node is None or node["Status"] != "ready":
                failed[tg["Name"]] = metric
                continue
            metric["NodesEvaluated"] = 1
            drivers = {t.get("Driver") for t in tg.get("Tasks") or []}
            if any(not (node["Drivers"].get(d) or {}).get("Healthy") for d in drivers):
                metric.update(NodesFiltered=1, ConstraintFiltered={"missing drivers": 1})
                failed[tg["Name"]] = metric
                continue
            memory = sum(int(t["Resources"]["MemoryMB"]) for t in tg.get("Tasks") or []) * int(
                tg.get("Count", 1)
            )
            if memory > self.node_memory_mb:
                metric.update(NodesExhausted=1, DimensionExhausted={"memory": 1})
                failed[tg["Name"]] = metric
        return failed

    def _evaluate(self, eval_id: str, *, noop: bool = False) -> None:
        """The scheduler: place the job's current version, or record why it cannot."""
        ev = self.evals[eval_id]
        job = self.jobs.get(ev["JobID"])
        if job is None or noop or job.get("Stop"):
            self._finish_eval(ev)
            return
        failed = self._feasibility(job)
        if failed:
            blocked = self._new_eval(job["ID"], "queued-allocs", ev["JobModifyIndex"], status="blocked")
            self._finish_eval(ev, FailedTGAllocs=failed, BlockedEval=blocked["ID"],
                              QueuedAllocations={g: 1 for g in failed})  # fmt: skip
            return
        previous = [a for a in self.allocs.values()
                    if a["JobID"] == job["ID"] and a["DesiredStatus"] == "run"]  # fmt: skip
        dep = self._new_deployment(job, has_previous=bool(previous))
        for tg in job["TaskGroups"]:
            canaries = dep["TaskGroups"][tg["Name"]]["DesiredCanaries"]
            if canaries:
                for i in range(canaries):
                    alloc = self._place(job, tg, i, dep, ev)
                    dep["TaskGroups"][tg["Name"]]["PlacedCanaries"].append(alloc["ID"])
            else:
                for a in previous:
                    if a["TaskGroup"] == tg["Name"]:
                        self._stop_alloc(a)
                for i in range(int(tg.get("Count", 1))):
                    self._place(job, tg, i, dep, ev)
        self._bump("deployments")
        self._finish_eval(ev, DeploymentID=dep["ID"])

    def _new_deployment(self, job: dict[str, Any], *, has_previous: bool) -> dict[str, Any]:
        for d in self.deployments.values():  # a newer version cancels a running deployment
            if d["JobID"] == job["ID"] and d["Status"] == "running":
                d.update(Status="cancelled", StatusDescription="Cancelled due to newer version of job")
        idx = self._bump("deployments", change=f"deployment for {job['ID']} v{job['Version']} running")
        groups = {}
        for tg in job["TaskGroups"]:
            upd = tg.get("Update") or {}
            groups[tg["Name"]] = {
                "AutoRevert": bool(upd.get("AutoRevert")), "AutoPromote": bool(upd.get("AutoPromote")),
                "Promoted": False, "PlacedCanaries": [],
                "DesiredCanaries": int(upd.get("Canary") or 0) if has_previous else 0,
                "DesiredTotal": int(tg.get("Count", 1)), "PlacedAllocs": 0, "HealthyAllocs": 0,
                "UnhealthyAllocs": 0, "ProgressDeadline": 600000000000, "RequireProgressBy": None,
            }  # fmt: skip
        dep = {
            "ID": str(uuid.uuid4()), "Namespace": "default", "JobID": job["ID"], "JobVersion": job["Version"],
            "JobModifyIndex": job["JobModifyIndex"], "JobCreateIndex": job["CreateIndex"],
            "IsMultiregion": False, "TaskGroups": groups, "Status": "running",
            "StatusDescription": "Deployment is running", "CreateIndex": idx, "ModifyIndex": idx,
        }  # fmt: skip
        self.deployments[dep["ID"]] = dep
        return dep

    # ------------------------------------------------------------------------------------ allocations --
    def _place(
        self, job: dict[str, Any], tg: dict[str, Any], i: int, dep: dict[str, Any] | None, ev: dict[str, Any]
    ) -> dict[str, Any]:
        idx = self._bump("allocs")
        alloc = {
            "ID": str(uuid.uuid4()), "EvalID": ev["ID"], "Name": f"{job['ID']}.{tg['Name']}[{i}]",
            "Namespace": "default", "NodeID": NODE_ID, "NodeName": self.node_name, "JobID": job["ID"],
            "JobType": job["Type"], "JobVersion": job["Version"], "TaskGroup": tg["Name"],
            "DesiredStatus": "run", "DesiredDescription": "", "ClientStatus": "pending",
            "ClientDescription": "No tasks have started", "TaskStates": {}, "DeploymentStatus": None,
            "FollowupEvalID": "", "CreateIndex": idx, "ModifyIndex": idx, "CreateTime": now_ns(),
            "ModifyTime": now_ns(),
        }  # fmt: skip
        self.allocs[alloc["ID"]] = alloc
        if dep is not None:
            dep["TaskGroups"][tg["Name"]]["PlacedAllocs"] += 1
        tasks = tg.get("Tasks") or []
        behaviour = "ok"
        for t in tasks:
            b = self.behaviour.get(str((t.get("Config") or {}).get("image", ""))) or self.behaviour.get(
                t["Name"]
            )
            if b:
                behaviour = b
                failing_task = t["Name"]
                break
        else:
            failing_task = ""
        T = self.timing
        self.at(T.alloc_start, lambda: self._alloc_setup(alloc, tasks))
        if behaviour == "ok":
            self.at(T.alloc_start + T.alloc_running, lambda: self._alloc_running(alloc, tasks))
            self.at(
                T.alloc_start + T.alloc_running + T.alloc_healthy,
                lambda: self._alloc_health(alloc, dep, True),
            )
        else:
            self.at(T.alloc_start + T.alloc_running,
                    lambda: self._alloc_fail(alloc, tasks, failing_task, behaviour, dep))  # fmt: skip
        return alloc

    @staticmethod
    def _event(type_: str, display: str, **extra: Any) -> dict[str, Any]:
        ev = {
            "Type": type_, "Time": now_ns(), "DisplayMessage": display, "Details": {}, "FailsTask": False,
            "Message": "", "DriverError": "", "DriverMessage": "", "ExitCode": 0, "Signal": 0,
            "RestartReason": "", "SetupError": "", "DownloadError": "", "ValidationError": "",
            "KillError": "", "KillReason": "", "KillTimeout": 0, "StartDelay": 0, "FailedSibling": "",
            "TaskSignalReason": "",
        }  # fmt: skip
        ev.update(extra)
        return ev

    def _touch(self, alloc: dict[str, Any], change: str) -> None:
        alloc["ModifyIndex"] = self._bump("allocs", change=change)
        alloc["ModifyTime"] = now_ns()

    def _alloc_setup(self, alloc: dict[str, Any], tasks: list[dict[str, Any]]) -> None:
        if alloc["DesiredStatus"] != "run":
            return
        for t in tasks:
            image = (t.get("Config") or {}).get("image", "")
            alloc["TaskStates"][t["Name"]] = {
                "State": "pending", "Failed": False, "Restarts": 0, "LastRestart": None,
                "StartedAt": None, "FinishedAt": None,
                "Events": [self._event("Received", "Task received by client"),
                           self._event("Task Setup", "Building Task Directory", Message="Building Task Directory"),
                           self._event("Driver", f"Downloading image {image}", DriverMessage=f"Downloading image {image}")],
            }  # fmt: skip
        self._touch(alloc, f"alloc {alloc['Name']} setting up")

    def _alloc_running(self, alloc: dict[str, Any], tasks: list[dict[str, Any]]) -> None:
        if alloc["DesiredStatus"] != "run":
            return
        for t in tasks:
            ts = alloc["TaskStates"][t["Name"]]
            ts.update(State="running", StartedAt="2026-11-25T09:00:02Z")
            ts["Events"].append(self._event("Started", "Task started by client"))
        alloc.update(ClientStatus="running", ClientDescription="Tasks are running")
        self._touch(alloc, f"alloc {alloc['Name']} running")
        job = self.jobs.get(alloc["JobID"])
        if job is not None and job["Version"] == alloc["JobVersion"] and job["Status"] == "pending":
            job["Status"] = "running"
            job["ModifyIndex"] = self._bump("jobs")

    def _alloc_fail(
        self,
        alloc: dict[str, Any],
        tasks: list[dict[str, Any]],
        task: str,
        how: str,
        dep: dict[str, Any] | None,
    ) -> None:
        if alloc["DesiredStatus"] != "run":
            return
        ts = alloc["TaskStates"][task]
        image = next(((t.get("Config") or {}).get("image", "") for t in tasks if t["Name"] == task), "")
        if how == "driver-failure":
            err = (f"Failed to pull `{image}`: Error response from daemon: manifest for {image} not found: "
                   "manifest unknown: manifest unknown")  # fmt: skip
            ts["Events"] += [
                self._event("Driver Failure", err, DriverError=err, FailsTask=True),
                self._event("Not Restarting", "Error was unrecoverable", RestartReason="Error was unrecoverable",
                            FailsTask=True),
            ]  # fmt: skip
        elif how == "exit-1":
            ts["Events"] += [
                self._event("Started", "Task started by client"),
                self._event("Terminated", "Exit Code: 1", ExitCode=1, Details={"exit_code": "1"}),
                self._event("Restarting", "Task restarting in 15s", RestartReason="Restart within policy"),
                self._event("Started", "Task started by client"),
                self._event("Terminated", "Exit Code: 1", ExitCode=1, Details={"exit_code": "1"}),
                self._event("Not Restarting", "Exceeded allowed attempts 2 in interval 30m0s and mode is \"fail\"",
                            RestartReason="Exceeded allowed attempts 2 in interval 30m0s and mode is \"fail\"",
                            FailsTask=True),
            ]  # fmt: skip
        else:
            raise ValueError(f"unknown behaviour {how}")
        ts.update(State="dead", Failed=True, FinishedAt="2026-11-25T09:00:03Z")
        for other, ots in alloc["TaskStates"].items():
            if other != task and ots["State"] != "dead":
                ots["Events"].append(self._event("Sibling Task Failed", f"Task's sibling {task!r} failed",
                                                 FailedSibling=task))  # fmt: skip
                ots.update(State="dead")
        alloc.update(ClientStatus="failed", ClientDescription="Failed tasks")
        self._touch(alloc, f"alloc {alloc['Name']} failed")
        self._alloc_health(alloc, dep, False)

    def _alloc_health(self, alloc: dict[str, Any], dep: dict[str, Any] | None, healthy: bool) -> None:
        if alloc["DesiredStatus"] != "run" and healthy:
            return
        alloc["DeploymentStatus"] = {"Healthy": healthy, "Timestamp": "2026-11-25T09:00:04Z", "Canary": False,
                                     "ModifyIndex": self.index}  # fmt: skip
        self._touch(alloc, f"alloc {alloc['Name']} {'healthy' if healthy else 'unhealthy'}")
        if dep is None or dep["Status"] != "running":
            return
        g = dep["TaskGroups"][alloc["TaskGroup"]]
        g["HealthyAllocs" if healthy else "UnhealthyAllocs"] += 1
        if not healthy:
            self._fail_deployment(dep, g["AutoRevert"])
            return
        # done: every group has all its allocations healthy, and its canaries (if any) promoted
        done = all(
            (not x["DesiredCanaries"] or x["Promoted"]) and x["HealthyAllocs"] >= x["DesiredTotal"]
            for x in dep["TaskGroups"].values()
        )
        if done:
            dep.update(Status="successful", StatusDescription="Deployment completed successfully")
            job = self.jobs.get(dep["JobID"])
            if job is not None and job["Version"] == dep["JobVersion"]:
                job.update(Stable=True, Status="running")
                job["ModifyIndex"] = self._bump("jobs")
            for v in self.versions.get(dep["JobID"], []):
                if v["Version"] == dep["JobVersion"]:
                    v["Stable"] = True
        elif any(x["DesiredCanaries"] and not x["Promoted"] and x["HealthyAllocs"] >= x["DesiredCanaries"]
                 for x in dep["TaskGroups"].values()):  # fmt: skip
            if all(x["AutoPromote"] for x in dep["TaskGroups"].values() if x["DesiredCanaries"]):
                self._promote_now(dep)
            else:
                dep["StatusDescription"] = "Deployment is running but requires manual promotion"
        dep["ModifyIndex"] = self._bump("deployments", change=f"deployment {dep['ID'][:8]} {dep['Status']}")

    def _fail_deployment(self, dep: dict[str, Any], auto_revert: bool) -> None:
        description = "Failed due to unhealthy allocations"
        job_id = dep["JobID"]
        stable = [
            v for v in self.versions.get(job_id, []) if v.get("Stable") and v["Version"] != dep["JobVersion"]
        ]
        if auto_revert and stable:
            target = stable[-1]
            description += f" - rolling back to job version {target['Version']}"
        dep.update(Status="failed", StatusDescription=description)
        dep["ModifyIndex"] = self._bump("deployments", change=f"deployment {dep['ID'][:8]} failed")
        if auto_revert and stable:
            revert = copy.deepcopy(target)
            current = self.jobs.get(job_id)
            self._store_version(revert, current)
            ev = self._new_eval(job_id, "rollback", revert["JobModifyIndex"])
            self.at(self.timing.evaluate, lambda: self._evaluate(ev["ID"]))

    def _stop_alloc(self, alloc: dict[str, Any]) -> None:
        if alloc["DesiredStatus"] != "run":
            return
        alloc.update(DesiredStatus="stop", DesiredDescription="alloc is being updated due to job update")
        self._touch(alloc, f"alloc {alloc['Name']} stop requested")

        def stopped() -> None:
            if alloc["ClientStatus"] in ("pending", "running"):
                for ts in alloc["TaskStates"].values():
                    ts["Events"] += [self._event("Killing", "Sent interrupt. Waiting 5s before force killing"),
                                     self._event("Terminated", "Exit Code: 0", ExitCode=0),
                                     self._event("Killed", "Task successfully killed")]  # fmt: skip
                    ts["State"] = "dead"
                alloc.update(ClientStatus="complete", ClientDescription="All tasks have completed")
                self._touch(alloc, f"alloc {alloc['Name']} complete")
            if self.timing.gc_after is not None:
                self.at(self.timing.gc_after, lambda: self._gc(alloc))

        self.at(self.timing.alloc_stop, stopped)

    def _gc(self, alloc: dict[str, Any]) -> None:
        self.allocs.pop(alloc["ID"], None)
        self._bump("allocs", change=f"alloc {alloc['Name']} garbage-collected")

    def _job_allocs(self, request: Request, body: Any, id: str) -> Response:
        self._block(request, "allocs")
        with self.cond:
            allocs = [copy.deepcopy(a) for a in self.allocs.values() if a["JobID"] == id]
            return self._json(allocs, "allocs")

    def _allocation(self, request: Request, body: Any, id: str) -> Response:
        with self.cond:
            if id not in self.allocs:
                raise _HTTPError(404, "alloc not found")
            return self._json(copy.deepcopy(self.allocs[id]), "allocs")

    # ---------------------------------------------------------------------------------- deployments --
    def _job_deployment(self, request: Request, body: Any, id: str) -> Response:
        self._block(request, "deployments")
        with self.cond:
            deps = [d for d in self.deployments.values() if d["JobID"] == id]
            latest = max(deps, key=lambda d: d["CreateIndex"]) if deps else None
            return self._json(copy.deepcopy(latest), "deployments")

    def _deployment(self, request: Request, body: Any, id: str) -> Response:
        self._block(request, "deployments")
        with self.cond:
            if id not in self.deployments:
                raise _HTTPError(404, "deployment not found")
            return self._json(copy.deepcopy(self.deployments[id]), "deployments")

    def _promote(self, request: Request, body: Any, id: str) -> Response:
        with self.cond:
            dep = self.deployments.get(id)
            if dep is None:
                raise _HTTPError(404, "deployment not found")
            if dep["Status"] != "running":
                raise _HTTPError(500, f"can't promote terminal deployment: status {dep['Status']!r}")
            if not any(g["DesiredCanaries"] and not g["Promoted"] for g in dep["TaskGroups"].values()):
                raise _HTTPError(500, "no canaries to promote")
            ev = self._promote_now(dep)
            idx = self._bump("deployments", change=f"deployment {id[:8]} promoted")
            return self._json({"EvalID": ev["ID"], "EvalCreateIndex": ev["CreateIndex"],
                               "DeploymentModifyIndex": idx, "Index": idx})  # fmt: skip

    def _promote_now(self, dep: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs[dep["JobID"]]
        ev = self._new_eval(job["ID"], "deployment-watcher", job["JobModifyIndex"])
        for tg in job["TaskGroups"]:
            g = dep["TaskGroups"][tg["Name"]]
            if not g["DesiredCanaries"] or g["Promoted"]:
                continue
            g["Promoted"] = True
            dep["StatusDescription"] = "Deployment is running"
            for a in list(self.allocs.values()):
                if (
                    a["JobID"] == job["ID"]
                    and a["TaskGroup"] == tg["Name"]
                    and a["JobVersion"] != job["Version"]
                ):
                    self._stop_alloc(a)
            for i in range(g["DesiredCanaries"], int(tg.get("Count", 1))):
                self._place(job, tg, i, dep, ev)
            if g["HealthyAllocs"] >= g["DesiredTotal"]:
                dep.update(Status="successful", StatusDescription="Deployment completed successfully")
        self._finish_eval(ev, DeploymentID=dep["ID"])
        return ev

    def _job_evals(self, request: Request, body: Any, id: str) -> Response:
        self._block(request, "evals")
        with self.cond:
            return self._json([copy.deepcopy(e) for e in self.evals.values() if e["JobID"] == id], "evals")

    def _evaluation(self, request: Request, body: Any, id: str) -> Response:
        self._block(request, "evals")
        with self.cond:
            if id not in self.evals:
                raise _HTTPError(404, "eval not found")
            return self._json(copy.deepcopy(self.evals[id]), "evals")

    def _deregister(self, request: Request, body: Any, id: str) -> Response:
        purge = request.args.get("purge", "") in ("true", "1")
        with self.cond:
            job = self.jobs.get(id)
            if job is None:
                raise _HTTPError(404, "job not found")
            if purge:
                del self.jobs[id]
                self.versions.pop(id, None)
            else:
                job.update(Stop=True, Status="dead")
            idx = self._bump("jobs", change=f"job {id} {'purged' if purge else 'stopped'}")
            ev = self._new_eval(id, "job-deregister", idx)
            for d in self.deployments.values():
                if d["JobID"] == id and d["Status"] == "running":
                    d.update(Status="cancelled", StatusDescription="Cancelled because job is stopped")
                    self._bump("deployments")
            for a in self.allocs.values():
                if a["JobID"] == id:
                    self._stop_alloc(a)
            self._finish_eval(ev)
            return self._json(
                {"EvalID": ev["ID"], "EvalCreateIndex": ev["CreateIndex"], "JobModifyIndex": idx}
            )

    # ------------------------------------------------------------------------------------ variables --
    def _var_get(self, request: Request, body: Any, id: str) -> Response:
        with self.cond:
            if id not in self.vars:
                raise _HTTPError(404, "variable not found")
            return self._json(copy.deepcopy(self.vars[id]), "vars")

    def _var_put(self, request: Request, body: Any, id: str) -> Response:
        with self.cond:
            current = self.vars.get(id)
            cas = request.args.get("cas")
            if cas is not None:
                want = int(cas)
                have = current["ModifyIndex"] if current else 0
                if want != have:
                    conflict = copy.deepcopy(current) if current else {}
                    return Response(json.dumps(conflict), status=409, content_type="application/json")
            if not isinstance(body, dict) or not isinstance(body.get("Items"), dict) or not body["Items"]:
                raise _HTTPError(400, "variable missing required Items object")
            idx = self._bump("vars", change=f"var {id} written")
            var = {
                "Namespace": body.get("Namespace", "default"), "Path": id,
                "CreateIndex": current["CreateIndex"] if current else idx, "ModifyIndex": idx,
                "CreateTime": current["CreateTime"] if current else now_ns(), "ModifyTime": now_ns(),
                "Items": {k: str(v) for k, v in body["Items"].items()},
            }  # fmt: skip
            self.vars[id] = var
            return self._json(copy.deepcopy(var), "vars")


class _HTTPError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def _body(request: Request) -> Any:
    data = request.get_data()
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        raise _HTTPError(400, "Request decode failed: invalid character") from None


def _duration(text: str) -> float:
    """Go duration subset: 300ms, 5s, 5m, 1m30s, or a bare number of seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total

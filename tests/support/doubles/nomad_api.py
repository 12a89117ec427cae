"""A STATEFUL TEST DOUBLE of Nomad's HTTP API — not Nomad, and not a mock of our client.

A real Nomad cannot run on our machines (no binary obtainable), so the client and the deploy flow are
tested against this double, served by pytest-httpserver (threaded, optionally TLS). It follows Nomad's
SOURCE (hashicorp/nomad 2.0.6-dev, read 2026-11-30), not memory: next to each behaviour below, a comment
names the file it follows. Endpoints: status/leader, agent/self, agent/health, nodes, node/:id,
jobs/parse, jobs, job/:id, job/:id/plan, job/:id/allocations, job/:id/deployment, job/:id/deployments, job/:id/evaluations,
deployment/:id, deployment/promote/:id, evaluation/:id, allocation/:id, var/:path, DELETE job/:id,
client/fs/logs/:alloc.

What it models (sources at each place in the code):
- one raft index; a per-table index (nodes, jobs, evals, deployments, allocs, vars) returned as
  X-Nomad-Index; BLOCKING QUERIES: `?index=N&wait=D` holds the request until the table's index passes N
  or D elapses — D capped at 300 s, 300 s when absent, plus up to D/16 of jitter (nomad/rpc.go,
  nomad/structs/structs.go);
- no leader: RPC-backed requests are held for `rpc_hold` seconds and then answered 500 "No cluster
  leader"; agent/self, agent/health, status/leader and jobs/parse (parsed in the agent) answer;
- `?region=` other than the agent's: 500 "No path to region"; a job in a namespace that does not exist:
  500 `job "x" is in nonexistent namespace "y"` (plan and register);
- ACLs: per-endpoint capabilities (agent:read for agent/self, node:read, read-job, submit-job, parse-job,
  list-jobs, variables read/write, read-logs|read-fs); 403 "Permission denied" / "ACL token not found";
- jobs/parse with python-hcl2 (the same parser speclint uses): variables with defaults, `var.x` and
  `${var.x}` interpolation, runtime `${NOMAD_*}`/`${attr.*}`... left as text, heredocs; not Strict, so
  a value for an undeclared variable is dropped (its warning is kept in `parse_warnings`, as Nomad keeps
  it to itself); lifecycle blocks, services and shutdown_delay are kept; what python-hcl2 cannot read or
  the double cannot evaluate (functions) is a 400 "Failed to parse job: input.hcl:L,C: ...";
- plan and register `Warnings` (services without shutdown_delay), merged as Nomad does;
- register with EnforceIndex (the three messages of structs.Job.EnforceIndex); DELETE of an unknown job:
  200 with no evaluation; deployments carrying JobModifyIndex (the job's ModifyIndex) AND
  JobSpecModifyIndex (the registration); job allocations of the CURRENT job only (`all=true`: every one);
- state that changes over time on a schedule (`at(seconds, fn)`; real clock) or at the client's Nth request
  to a path (`on_request`; no clock): the leader appears, the
  node registers, becomes ready, the docker driver becomes healthy; allocations go pending -> running ->
  healthy (or fail), prestart tasks run to completion first; deployments running -> successful / failed
  (+ auto-revert), canaries wait for promotion (auto-promote only when every canary group is
  auto_promote), promotion of named groups or All, checking each group's healthy canaries;
- a scheduler: a group is placed only on a ready node whose driver is detected and healthy ("missing
  drivers" in FailedTGAllocs.ConstraintFiltered otherwise) and with enough memory ("memory" in
  DimensionExhausted), with a blocked evaluation;
- docker images on the node: with `pullable`, an image neither on the node nor in a registry fails to pull;
  images are reference-counted by tasks and removed `image_delay` after the last one stops, unless
  gc.image = false (`docker_gc`, or `gc_from_agent_config`);
- Variables with check-and-set (`?cas=`; 409 with the current variable on conflict) and the window after
  bootstrap where writes answer 500 "keyring has not been initialized yet";
- task logs: framed JSON {File, Offset, Data} with `{}` heartbeats while following, or plain text.

Faults for tests: `fail_next` (one-shot status + body), `drop_answer` (the request is applied, then the
connection is cut before the answer), `before_next` (one-shot: run a change right before a matching
request, e.g. `rewind` — every index goes back, as after a restore from an older snapshot — or `revert`).
Task behaviour per task image or task name:
`behaviour["img:tag"] = "driver-failure"`, or "exit-1", or "ok" (default); `health_delay[name]` delays
a task's health (inf: until `release_health()`).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import heapq
import itertools
import json
import random
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hcl2
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from support.servers.common import free_port

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


class HCLParseError(Exception):
    """A jobspec2 diagnostic: `input.hcl:LINE,COL: summary` (the agent names its input "input.hcl",
    command/agent/job_endpoint.go JobsParseRequest: ParseConfig{Path: "input.hcl"})."""

    def __init__(self, line: int, message: str, col: int = 1) -> None:
        super().__init__(f"input.hcl:{line},{col}: {message}")


#: python-hcl2's serialization: blocks as lists of {label: body}, strings unquoted, heredocs raw (we strip
#: their markers below, so escapes inside them stay literal as in HCL).
_HCL_OPTIONS = hcl2.SerializationOptions(
    with_comments=False, strip_string_quotes=True, explicit_blocks=True, preserve_heredocs=True
)
_WHOLE_VAR = re.compile(r"^\$\{\s*var\.([A-Za-z_][\w-]*)\s*\}$")
_INTERP = re.compile(r"(?<!\$)\$\{([^{}]*)\}")
#: Names jobspec2 leaves for the client to interpolate at run time (jobspec2/parse.go: only `var.` and
#: `local.` are HCL variables; `${NOMAD_*}`, `${attr.*}`, `${node.*}`, `${meta.*}`, `${env ...}` stay text).
_RUNTIME = re.compile(
    r"^\s*(NOMAD_[\w]+|attr\.[\w.-]+|node\.[\w.-]+|meta\.[\w.-]+|env\[.*\]|[A-Z_][A-Z0-9_]*)\s*$"
)
_REQUIRED = object()
#: A few of jobspec2's functions (jobspec2/functions.go); the double names but does not evaluate them.
_KNOWN_FUNCTIONS = {"format", "join", "split", "lower", "upper", "replace", "concat", "merge", "lookup",
                    "file", "jsonencode", "jsondecode", "base64encode", "trimspace", "coalesce", "length"}  # fmt: skip


def _hcl_load(text: str) -> dict[str, Any]:
    try:
        return dict(hcl2.loads(text, serialization_options=_HCL_OPTIONS))
    except Exception as exc:  # lark's UnexpectedInput carries line/column
        line = int(getattr(exc, "line", 1) or 1)
        col = int(getattr(exc, "column", 1) or 1)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HCLParseError(line, f"Invalid expression; {first}", col) from None


def _line_of(text: str, needle: str) -> int:
    pos = text.find(needle)
    return text.count("\n", 0, pos) + 1 if pos >= 0 else 1


def _heredoc(value: str) -> str:
    head, _, rest = value.partition("\n")
    body = rest.rsplit("\n", 1)[0] if "\n" in rest else ""
    lines = body.split("\n")
    if head.startswith("<<-"):  # indented heredoc: strip the common leading whitespace
        indents = [len(x) - len(x.lstrip()) for x in lines if x.strip()]
        cut = min(indents) if indents else 0
        lines = [x[cut:] for x in lines]
    return "\n".join(lines) + "\n"


class _Resolver:
    """Evaluates what jobspec2 would: `var.X` references and `${var.X}` interpolation; everything else a
    Nomad job spec may hold at run time is left as text (see _RUNTIME)."""

    def __init__(self, text: str, values: dict[str, Any]) -> None:
        self.text = text
        self.values = values

    def var(self, name: str, expr: str) -> Any:
        if name not in self.values:
            raise HCLParseError(
                _line_of(self.text, expr), f'Reference to undeclared input variable; "{name}"'
            )
        value = self.values[name]
        if value is _REQUIRED:
            raise HCLParseError(
                _line_of(self.text, expr), f'Missing required variable; "{name}" has no default and no value'
            )
        return value

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items() if k != "__is_block__"}
        if not isinstance(value, str):
            return value
        if value.startswith("<<") and "\n" in value:
            value = _heredoc(value)
        whole = _WHOLE_VAR.match(value)
        if whole:  # `x = var.y` keeps y's type (number, bool, list)
            return self.var(whole.group(1), value)

        def sub(m: re.Match[str]) -> str:
            inner = m.group(1).strip()
            ref = re.fullmatch(r"var\.([A-Za-z_][\w-]*)", inner)
            if ref:
                v = self.var(ref.group(1), m.group(0))
                return json.dumps(v) if isinstance(v, bool) else str(v)
            if _RUNTIME.match(inner):
                return m.group(0)
            call = re.match(r"([a-z_][\w]*)\s*\(", inner)
            if call and call.group(1) not in _KNOWN_FUNCTIONS:
                raise HCLParseError(
                    _line_of(self.text, inner),
                    f'Call to unknown function; There is no function named "{call.group(1)}".',
                )
            raise HCLParseError(
                _line_of(self.text, inner),
                f"Unsupported expression in the test double (jobspec2 would evaluate it): {inner[:60]}",
            )

        out = _INTERP.sub(sub, value)
        return out.replace("$${", "${").replace("%%{", "%{")  # HCL template escapes


def _blocks(body: dict[str, Any], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """Labelled blocks (`group "x" {}`) as (label, body); unlabelled ones (`update {}`) as ("", body)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for item in body.get(kind) or []:
        if not isinstance(item, dict):
            continue
        if item.get("__is_block__") is True and not any(
            isinstance(v, dict) and v.get("__is_block__") for v in item.values()
        ):
            out.append(("", item))
        else:
            for label, inner in item.items():
                if isinstance(inner, dict):
                    out.append((label, inner))
    return out


def _block(body: dict[str, Any], kind: str) -> dict[str, Any] | None:
    found = _blocks(body, kind)
    return found[0][1] if found else None


def _attrs(body: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (body or {}).items() if k != "__is_block__" and not _is_block_list(v)}


def _is_block_list(v: Any) -> bool:
    return (
        isinstance(v, list)
        and bool(v)
        and all(isinstance(x, dict) for x in v)
        and any(
            x.get("__is_block__") or any(isinstance(y, dict) and y.get("__is_block__") for y in x.values())
            for x in v
        )
    )


def parse_job_hcl(hcl: str, variables_text: str) -> tuple[dict[str, Any], list[str]]:
    """JobHCL + Variables (var-file content) -> (canonical-ish Job JSON, jobspec2 warnings), or HCLParseError.

    Follows jobspec2/types.variables.go: a value for an undeclared variable is a WARNING unless the parse
    is Strict — and the parse API (command/agent/job_endpoint.go JobsParseRequest) does not set Strict and
    returns only the job, so such a value is silently dropped. The warnings are returned for tests to see.
    """
    if not hcl.strip():
        raise HCLParseError(1, "Job spec is empty")
    doc = _hcl_load(hcl)
    declared: dict[str, Any] = {}
    for name, body in _blocks(doc, "variable"):
        declared[name] = body.get("default", _REQUIRED)
    given = _hcl_load(variables_text) if variables_text.strip() else {}
    warnings = []
    plain = _Resolver(hcl, {})
    values = {k: v if v is _REQUIRED else plain(v) for k, v in declared.items()}
    for name, value in given.items():
        if name not in declared:
            warnings.append(
                f'<value for var.{name}>: Undefined variable; A "{name}" variable was set but was not '
                "declared in an input variable block"
            )
            continue
        values[name] = value.replace("$${", "${").replace("%%{", "%{") if isinstance(value, str) else value
    resolve = _Resolver(hcl, values)
    jobs = _blocks(doc, "job")
    if len(jobs) != 1 or not jobs[0][0]:
        raise HCLParseError(1, 'Missing job block; expected exactly one job "name" block')
    job_id, jb = jobs[0]
    jattrs = resolve(_attrs(jb))
    job_update = resolve(_attrs(_block(jb, "update")))
    groups = []
    for gname, g in _blocks(jb, "group"):
        gattrs = resolve(_attrs(g))
        upd = {**job_update, **resolve(_attrs(_block(g, "update")))}
        tasks = []
        for tname, t in _blocks(g, "task"):
            tattrs = resolve(_attrs(t))
            res = resolve(_attrs(_block(t, "resources")))
            life = _block(t, "lifecycle")
            tasks.append(
                {
                    "Name": tname,
                    "Driver": tattrs.get("driver", ""),
                    "User": tattrs.get("user", ""),  # api/tasks.go Task.User
                    "Config": resolve(_block(t, "config") or {}),
                    "Env": resolve(_attrs(_block(t, "env"))) or None,
                    "Resources": {"CPU": res.get("cpu", 100), "MemoryMB": res.get("memory", 300)},
                    # client/allocrunner/taskrunner: prestart tasks run to completion before main tasks
                    "Lifecycle": (
                        {
                            "Hook": resolve(life.get("hook", "")),
                            "Sidecar": bool(resolve(life.get("sidecar", False))),
                        }
                        if life
                        else None
                    ),
                    "ShutdownDelay": _duration_ns(tattrs.get("shutdown_delay")),
                    "Services": [_service(n, resolve(s)) for n, s in _blocks(t, "service")] or None,
                    "Templates": [
                        {
                            "EmbeddedTmpl": resolve(tp.get("data", "")),
                            "DestPath": resolve(tp.get("destination", "")),
                        }
                        for _, tp in _blocks(t, "template")
                    ]
                    or None,
                }
            )
        groups.append(
            {
                "Name": gname,
                "Count": gattrs.get("count", 1),
                "Update": _update(upd) if (upd or jattrs.get("type", "service") == "service") else None,
                "ShutdownDelay": _duration_ns(gattrs.get("shutdown_delay")) or None,
                "Services": [_service(n, resolve(s)) for n, s in _blocks(g, "service")] or None,
                "Constraints": _constraints(g, resolve),
                "Tasks": tasks,
            }
        )
    job = {
        "ID": job_id,
        "Name": job_id,
        "Namespace": jattrs.get("namespace", "default"),
        "Region": jattrs.get("region", "global"),
        "Type": jattrs.get("type", "service"),
        "Priority": jattrs.get("priority", 50),
        "Datacenters": jattrs.get("datacenters", ["*"]),
        "NodePool": jattrs.get("node_pool", "default"),
        "Update": _update(job_update),
        "TaskGroups": groups,
        "Meta": resolve(_attrs(_block(jb, "meta"))) or None,
        "Constraints": _constraints(jb, resolve),
        "Status": "",
        "Stop": False,
        "Stable": False,
        "Version": 0,
        "SubmitTime": None,
        "CreateIndex": 0,
        "ModifyIndex": 0,
        "JobModifyIndex": 0,
    }
    return job, warnings


def _constraints(body: dict[str, Any], resolve: _Resolver) -> list[dict[str, str]] | None:
    """`constraint { attribute, operator, value }` blocks as api.Constraint {LTarget, Operand, RTarget}
    (jobspec2 decodes them into api.Constraint; the operator defaults to "=")."""
    out = []
    for _, c in _blocks(body, "constraint"):
        a = resolve(_attrs(c))
        out.append({"LTarget": str(a.get("attribute", "")), "RTarget": str(a.get("value", "")),
                    "Operand": str(a.get("operator", "="))})  # fmt: skip
    return out or None


def _service(name: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "Name": body.get("name", name),
        "Provider": body.get("provider", "consul"),
        "PortLabel": body.get("port", ""),
        "TaskName": body.get("task", ""),
        "Tags": body.get("tags"),
        "CanaryTags": body.get("canary_tags"),
    }


def _duration_ns(value: Any) -> int:
    if value in (None, ""):
        return 0
    return int(_duration(str(value)) * 1e9)


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


def job_warnings(job: dict[str, Any]) -> list[str]:
    """nomad/structs/structs.go (TaskGroup).Warnings: services without a shutdown_delay (Nomad 2.0.1+)."""
    out = []
    for tg in job.get("TaskGroups") or []:
        tasks = tg.get("Tasks") or []
        referenced = {s["TaskName"] for s in tg.get("Services") or [] if s.get("TaskName")}
        unscoped = any(not s.get("TaskName") for s in tg.get("Services") or [])
        any_task_delay = False
        for t in tasks:
            if t["Name"] in referenced and not t.get("ShutdownDelay"):
                out.append(
                    f'group "{tg["Name"]}" references task "{t["Name"]}" in a service definition, but the '
                    "task has no shutdown_delay set"
                )
            if t.get("ShutdownDelay"):
                any_task_delay = True
            elif t.get("Services"):
                out.append(
                    f'task "{t["Name"]}" in group "{tg["Name"]}" defines services, but has no shutdown_delay set'
                )
        if unscoped and not tg.get("ShutdownDelay") and not any_task_delay:
            out.append(
                f'group "{tg["Name"]}" defines services, but neither the group nor any of its tasks have '
                "shutdown_delay set"
            )
    return out


def merge_warnings(warnings: list[str]) -> str:
    """helper/warning.go MergeMultierrorWarnings: "1 warning:\\n\\n* ..." (empty when none)."""
    if not warnings:
        return ""
    head = "1 warning:" if len(warnings) == 1 else f"{len(warnings)} warnings:"
    return head + "\n\n" + "\n".join(f"* {w}" for w in warnings) + "\n\n"


def gc_from_agent_config(text: str) -> tuple[bool, float]:
    """The docker plugin's image GC settings from an agent config (drivers/docker/config.go: `gc { image =
    true, image_delay = "3m" }` are the defaults when the block or a field is missing)."""
    doc = _hcl_load(text)
    image, delay = True, 180.0
    for label, plugin in _blocks(doc, "plugin"):
        if label != "docker":
            continue
        gc = _block(_block(plugin, "config") or {}, "gc") or {}
        image = bool(gc.get("image", image))
        delay = _duration(str(gc.get("image_delay", "3m")))
    return image, delay


#: Fields of a stored job that are bookkeeping, not specification (ignored by the plan diff).
_BOOKKEEPING = (
    "Status", "Stable", "Version", "SubmitTime", "CreateIndex", "ModifyIndex", "JobModifyIndex", "Stop",
    "StatusDescription",
)  # fmt: skip


def _spec(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in _BOOKKEEPING}


class NomadAPIDouble:
    """The double. Start with `start()` (or `start(after=0.5)` for connection refused while booting)."""

    TABLES = ("nodes", "jobs", "evals", "deployments", "allocs", "vars", "services")

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        acl_token: str | None = None,
        rpc_hold: float = 1.0,
        timing: Timing | None = None,
        node_memory_mb: int = 3800,
        node_name: str = "nomad-1",
        acl_tokens: dict[str, set[str]] | None = None,
        jitter: str = "random",
        namespaces: tuple[str, ...] = ("default",),
        region: str = "global",
        pullable: Callable[[str], bool] | None = None,
        docker_gc: tuple[bool, float] = (True, 180.0),
        keyring_delay: float = 0.0,
        memo_parse: bool = False,
    ) -> None:
        """`acl_token`: a management token (every capability). `acl_tokens`: more tokens, each with the
        capabilities it grants: "agent:read", "node:read", and namespace capabilities as in acl/policy.go
        ("read-job", "submit-job", "list-jobs", "parse-job", "read-logs", "variables:read"/"variables:write").
        `jitter`: "random" (nomad/rpc.go blockingRPC adds RandomStagger(wait/16)), "max" or "none".
        `pullable(image)`: whether the registry has an image; None = every image can be pulled. Images
        `load_image`d are on the node and garbage-collected per `docker_gc` = (gc.image, image_delay seconds)
        (drivers/docker/config.go defaults: true, 3m; `gc_from_agent_config` reads them from an agent config).
        `keyring_delay`: seconds after the leader is elected during which variable writes fail with
        "keyring has not been initialized yet" (nomad/encrypter.go activeCipherSet); inf: until release_keyring().
        `memo_parse`: answer a jobs/parse seen before from memory (it is a pure function of JobHCL and
        Variables): python-hcl2 takes about 0.1 s a job here where Nomad's Go parser takes milliseconds, so
        a benchmark of our commands (scripts/bench-noop) would otherwise time the double's parser."""
        self.port = free_port()
        self.server = HTTPServer(host="127.0.0.1", port=self.port, ssl_context=ssl_context, threaded=True)
        self.server.expect_request(re.compile(r"^/.*")).respond_with_handler(self._handle)
        self.scheme = "https" if ssl_context else "http"
        self.acl_token = acl_token
        self.acl_tokens = dict(acl_tokens or {})
        if acl_token is not None:
            self.acl_tokens[acl_token] = {"*"}
        self.jitter = jitter
        self.namespaces = set(namespaces)
        self.region = region
        self.pullable = pullable
        self.docker_gc_image, self.docker_image_delay = docker_gc
        self.keyring_delay = keyring_delay
        self.memo_parse = memo_parse
        self._parsed: dict[tuple[str, str], tuple[dict[str, Any], list[str]]] = {}
        self._keyring_at = 0.0
        self.images: dict[str, set[str]] = {}  # image on the node -> IDs of allocations using it
        self.image_events: list[str] = []
        self.logs: dict[tuple[str, str, str], bytearray] = {}  # (alloc, task, stdout|stderr) -> bytes
        self.task_output: dict[str, tuple[str, str]] = {}  # task name -> (stdout, stderr) written at start
        self.parse_warnings: list[list[str]] = []
        self.heartbeat = 1.0  # client/fs_endpoint.go streamHeartbeatRate
        self.rpc_hold = rpc_hold
        self.timing = timing or Timing()
        self.node_memory_mb = node_memory_mb
        self.node_name = node_name
        self.cond = threading.Condition(threading.RLock())
        self.index = 10
        self.tables = dict.fromkeys(self.TABLES, 1)
        self.leader = ""
        self.node: dict[str, Any] | None = None
        # A cluster (`cluster(...)`): the Raft configuration's servers, and the client nodes beyond `node`
        self.servers: list[str] = []
        self.more_nodes: list[dict[str, Any]] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.allocs: dict[str, dict[str, Any]] = {}
        self.vars: dict[str, dict[str, Any]] = {}
        self.services: dict[str, dict[str, Any]] = {}  # service registration ID -> registration
        self.behaviour: dict[str, str] = {}
        self.requests: list[Request_] = []
        self.changes: list[tuple[float, str]] = []  # (monotonic time, what changed), for the benchmark
        self.errors: list[str] = []
        self.fail_next: list[tuple[str, int, str]] = []  # (path regex, status, body): one-shot faults
        self.drop_answer: list[str] = []  # "METHOD path" regexes: applied, then the connection is cut
        self.drop_request: list[str] = []  # "METHOD path" regexes: the connection is cut, nothing applied
        # (regex on "METHOD path?query", fn): when such a request arrives, fn() runs first (one-shot each):
        # what another writer or the server did just before it (a revert, a snapshot restore)
        self.before_next: list[tuple[str, Callable[[], None]]] = []
        self.promote_bodies: list[Any] = []
        self._task_lists: dict[
            str, list[dict[str, Any]]
        ] = {}  # alloc ID -> its tasks (the job may be purged)
        self.health_delay: dict[str, float] = {}  # task name or image -> extra seconds before healthy
        self.held_stops: list[Callable[[], None]] = []  # Timing.alloc_stop inf: until release_stops()
        self.held_health: list[Callable[[], None]] = []  # health_delay inf: until release_health()
        self.parse_calls: list[dict[str, Any]] = []
        self._closed = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._request_hooks: list[tuple[str, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._timer_cond = threading.Condition()
        self._timer_thread = threading.Thread(target=self._run_timers, daemon=True, name="nomad-double-clock")
        self._starter: threading.Thread | None = None

    # -------------------------------------------------------------------------------------- lifecycle --
    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, after: float = 0.0, *, listen: bool = True) -> NomadAPIDouble:
        """Listen now, or after `after` seconds, or (`listen=False`) when `listen()` is called: connections
        are refused until then, like a booting VM's."""
        self._timer_thread.start()
        if not listen:
            return self
        if after <= 0:
            self.server.start()
        else:
            self._starter = threading.Thread(target=self._start_later, args=(after,), daemon=True)
            self._starter.start()
        return self

    def _start_later(self, after: float) -> None:
        time.sleep(after)
        if not self._closed:
            self.listen()

    def listen(self) -> None:
        """Start answering (after `start(listen=False)`)."""
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

    def on_request(self, path_regex: str, nth: int, fn: Callable[[], None]) -> None:
        """Run `fn` (under the state lock) when the `nth` request whose path matches arrives, before it is
        answered: a change tied to what the client did rather than to the clock, so a slow machine cannot
        reorder it (a blocking query that arrives then sees the change at once)."""
        with self.cond:
            self._request_hooks.append((path_regex, nth, fn))

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

    def rewind(self, to: int) -> None:
        """Every index goes back to `to` (at most), the objects kept: a server restarted on an older raft
        snapshot, or a snapshot restore (nomad/fsm.go nomadFSM.Restore: a new state store with the snapshot's
        indexes replaces the old one, whose Abandon() wakes the blocked queries; nomad/rpc.go blockingRPC
        then re-runs each and, its index still <= the client's, blocks again until its wait ends)."""
        with self.cond:
            self.index = min(self.index, to)
            self.tables = {t: min(v, to) for t, v in self.tables.items()}
            self.changes.append((time.monotonic(), f"indexes rewound to {to}"))

    def release_stops(self) -> None:
        """Allocations stopping while Timing.alloc_stop is inf are stopped now (runs under the state lock,
        so an on_request hook may call it: the answer it precedes already shows them complete)."""
        with self.cond:
            for fn in self.held_stops:
                fn()
            self.held_stops.clear()

    def release_keyring(self) -> None:
        """The keyring is ready now (for keyring_delay inf: variable writes fail until a test says so; runs
        under the state lock, so an on_request hook may call it before the request it precedes)."""
        with self.cond:
            self._keyring_at = 0.0

    def release_health(self) -> None:
        """Allocations whose health_delay is inf turn healthy now (in placement order)."""
        with self.cond:
            for fn in self.held_health:
                self.at(0, fn)
            self.held_health.clear()

    def revert(self, job_id: str, version: int) -> None:
        """Register an earlier version of a job again, as a new version (nomad/job_endpoint.go Revert ->
        doRegister: the old job copied, Stable false, a job-register evaluation) — what `nomad job revert`
        or another deployer does between someone's plan and their register."""
        with self.cond:
            target = next(v for v in self.versions[job_id] if v["Version"] == version)
            revert = copy.deepcopy(target)
            index = self._store_version(revert, self.jobs.get(job_id))
            ev = self._new_eval(job_id, "job-register", index)
            self.at(self.timing.evaluate, lambda: self._evaluate(ev["ID"]))

    # ------------------------------------------------------------------------------------ cluster state --
    def elect_leader(self) -> None:
        with self.cond:
            self.leader = LEADER_ADDR
            self._keyring_at = time.monotonic() + self.keyring_delay
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
                # client.meta of cloud-init/files/nomad/zz-infra-lab.hcl: this node holds the data
                "Meta": {"infra_lab_data": "true", "infra_lab_entry": "true"},
                "NodeResources": {"Cpu": {"CpuShares": 4000}, "Memory": {"MemoryMB": self.node_memory_mb}},
                "Events": [{"CreateIndex": 0, "Details": None, "Message": "Node registered",
                            "Subsystem": "Cluster", "Timestamp": "2026-11-25T09:00:00Z"}],
                "CreateIndex": self.index,
                "ModifyIndex": self.index,
            }  # fmt: skip
            self._set_docker(docker)
            self._bump("nodes", change="node registered")

    # ------------------------------------------------------------------- a cluster (vm.nodes >= 3) --
    def all_nodes(self) -> list[dict[str, Any]]:
        return ([self.node] if self.node else []) + self.more_nodes

    def cluster(self, count: int = 3, *, servers: int = 3, subnet: str = "10.87.0") -> NomadAPIDouble:
        """A settled local cluster as infra/core/nodes.py makes it: nomad-1 .. nomad-N at <subnet>.10+k, the first
        `servers` of them in the Raft configuration (their RPC addresses, nomad/status_endpoint.go Peers),
        nomad-1 the leader, every node ready with docker healthy; node meta as infra/guest/seed.py writes it
        (infra_lab_node, infra_lab_data "true" on nomad-1 only)."""
        with self.cond:
            self.register_node(status="ready", docker="healthy")
            assert self.node is not None
            self._cluster_identity(self.node, 1, subnet)
            for k in range(2, count + 1):
                node = copy.deepcopy(self.node)
                node["ID"] = str(uuid.UUID(int=k))
                self._cluster_identity(node, k, subnet)
                self.more_nodes.append(node)
            self.servers = [f"{subnet}.{10 + k}:4647" for k in range(1, servers + 1)]
            self.leader = self.servers[0]
            self._keyring_at = time.monotonic() + self.keyring_delay
            self._bump("nodes", change=f"cluster of {count}")
        return self

    def _cluster_identity(self, node: dict[str, Any], k: int, subnet: str) -> None:
        node.update(Name=f"nomad-{k}", Address=f"{subnet}.{10 + k}")
        node["Attributes"] = dict(node["Attributes"], **{"unique.network.ip-address": f"{subnet}.{10 + k}"})
        first = "true" if k == 1 else "false"
        node["Meta"] = {"infra_lab_node": f"nomad-{k}", "infra_lab_data": first, "infra_lab_entry": first}

    def node_named(self, name: str) -> dict[str, Any]:
        return next(n for n in self.all_nodes() if n["Name"] == name)

    def set_leader(self, address: str) -> None:
        """A leader change (another server won the election), or "" (none)."""
        with self.cond:
            assert not address or address in self.servers, f"{address} is not a server"
            self.leader = address
            self._bump("nodes", change=f"leader {address or 'lost'}")

    def lose_node(self, name: str) -> None:
        """A node stops heartbeating: nomad/heartbeat.go invalidateHeartbeat sets it down (event "Node
        heartbeat missed"); nomad/node_endpoint.go createNodeEvals makes an evaluation for each job with
        allocations on it; the scheduler (scheduler/reconciler/reconcile_cluster.go computeStop, markStop with
        AllocClientStatusLost and "alloc is lost since its node is down") marks those allocations lost and
        computePlacements replaces them on a feasible node (constraints: scheduler/feasible/feasible.go
        ConstraintChecker, resolveTarget for ${meta.*}); where none is feasible, a blocked evaluation."""
        with self.cond:
            node = self.node_named(name)
            node["Status"] = "down"
            node["Events"].append({"CreateIndex": self.index, "Details": None, "Message": "Node heartbeat missed",
                                   "Subsystem": "Cluster", "Timestamp": "2026-11-25T09:10:00Z"})  # fmt: skip
            node["ModifyIndex"] = self._bump("nodes", change=f"node {name} down")
            lost = [a for a in self.allocs.values() if a["NodeID"] == node["ID"] and a["DesiredStatus"] == "run"
                    and a["ClientStatus"] in ("pending", "running")]  # fmt: skip
            for alloc in lost:
                alloc.update(DesiredStatus="stop", ClientStatus="lost",
                             DesiredDescription="alloc is lost since its node is down")  # fmt: skip
                alloc["ModifyIndex"] = self._bump("allocs", change=f"alloc {alloc['Name']} lost")
            for job_id in sorted({a["JobID"] for a in lost}):
                job = self.jobs.get(job_id)
                if job is None:
                    continue
                ev = self._new_eval(job_id, "node-update", job["JobModifyIndex"])
                self._replace_lost(job, [a for a in lost if a["JobID"] == job_id], ev)

    def return_node(self, name: str) -> None:
        """The node heartbeats again (nomad/node_endpoint.go UpdateStatus: ready); blocked evaluations are
        re-enqueued (nomad/blocked_evals.go)."""
        with self.cond:
            node = self.node_named(name)
            node["Status"] = "ready"
            node["ModifyIndex"] = self._bump("nodes", change=f"node {name} ready")
            self._unblock()

    def feasible_nodes(self, job: dict[str, Any], tg: dict[str, Any]) -> list[dict[str, Any]]:
        """Ready nodes with the group's drivers healthy that meet the job's and group's constraints."""
        drivers = {t.get("Driver") for t in tg.get("Tasks") or []}
        constraints = (job.get("Constraints") or []) + (tg.get("Constraints") or [])
        return [
            n for n in self.all_nodes()
            if n["Status"] == "ready"
            and all((n["Drivers"].get(d) or {}).get("Healthy") for d in drivers)
            and all(_meets(c, n) for c in constraints)
        ]  # fmt: skip

    def _replace_lost(self, job: dict[str, Any], lost: list[dict[str, Any]], ev: dict[str, Any]) -> None:
        groups = {tg["Name"]: tg for tg in job["TaskGroups"]}
        blocked: dict[str, Any] = {}
        for alloc in lost:
            tg = groups.get(alloc["TaskGroup"])
            if tg is None:
                continue
            targets = self.feasible_nodes(job, tg)
            if not targets:
                filtered = {f"{c['LTarget']} {c['Operand']} {c['RTarget']}": 1
                            for c in (job.get("Constraints") or []) + (tg.get("Constraints") or [])}  # fmt: skip
                blocked[tg["Name"]] = {"NodesEvaluated": len(self.all_nodes()), "ConstraintFiltered": filtered or None,
                                       "NodesAvailable": {"dc1": len([n for n in self.all_nodes() if n["Status"] == "ready"])}}  # fmt: skip
                continue
            index = int(alloc["Name"].rsplit("[", 1)[1].rstrip("]"))
            new = self._place(job, tg, index, None, ev, node=targets[0])
            new["PreviousAllocation"] = alloc["ID"]
            alloc["NextAllocation"] = new["ID"]
        if blocked:
            later = self._new_eval(job["ID"], "queued-allocs", job["JobModifyIndex"], status="blocked")
            self._finish_eval(ev, FailedTGAllocs=blocked, BlockedEval=later["ID"])
        else:
            self._finish_eval(ev)

    def set_node(self, **fields: Any) -> None:
        with self.cond:
            assert self.node is not None, "register_node first"
            self.node.update(fields)
            what = ", ".join(f"{k}={v}" for k, v in fields.items())
            self.node["ModifyIndex"] = self._bump("nodes", change=f"node {what}")
            self._unblock()

    def set_job_status(self, job_id: str, status: str) -> None:
        """A job status change (nomad/state/state_store.go setJobStatus): Status and ModifyIndex move,
        JobModifyIndex (the registration) does not."""
        with self.cond:
            job = self.jobs[job_id]
            job["Status"] = status
            job["ModifyIndex"] = self._bump("jobs", change=f"job {job_id} {status}")

    def set_docker(self, state: str) -> None:
        """state: undetected | unhealthy | healthy"""
        with self.cond:
            self._set_docker(state)
            assert self.node is not None
            self.node["ModifyIndex"] = self._bump("nodes", change=f"docker {state}")
            self._unblock()

    def _unblock(self) -> None:
        # nomad/blocked_evals.go: a node update unblocks evaluations waiting for capacity
        """A node change re-enqueues blocked evaluations (Nomad's blocked-evals tracker does the same)."""
        for ev in list(self.evals.values()):
            if ev["Status"] == "blocked":
                ev["Status"] = "pending"
                ev["ModifyIndex"] = self._bump("evals")
                self.at(self.timing.evaluate, functools.partial(self._evaluate, ev["ID"]))

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
            self._keyring_at = time.monotonic() + self.keyring_delay
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

    # ------------------------------------------------------------------------- service registrations --
    # Nomad's own service discovery (provider = "nomad"), as a Nomad client writes it and as Traefik's
    # Nomad provider reads it (traefik pkg/provider/nomad/nomad.go getNomadServiceData: GET /v1/services,
    # then GET /v1/service/<name>?filter=Tags contains "traefik.enable=true" per enabled name).
    def register_service(
        self,
        name: str,
        *,
        address: str,
        port: int,
        tags: list[str],
        canary_tags: list[str] | None = None,
        canary: bool = False,
        job_id: str = "app",
        alloc_id: str | None = None,
        task: str = "group-web",
        port_label: str = "http",
        namespace: str = "default",
    ) -> str:
        """Register one allocation's service as the client does (client/serviceregistration/nsd/nsd.go
        generateNomadServiceRegistration): a canary with a non-empty `canary_tags` is registered with
        those INSTEAD of `tags`. The ID is MakeAllocServiceID's (client/serviceregistration/id.go):
        _nomad-task-<alloc>-<task or group-name>-<service>-<port label>. Returns the ID."""
        alloc_id = alloc_id or str(uuid.uuid4())
        service_id = f"_nomad-task-{alloc_id}-{task}-{name}-{port_label}"
        chosen = list(canary_tags) if canary and canary_tags else list(tags)
        with self.cond:
            index = self._bump("services", change=f"service {name} registered")
            self.services[service_id] = {
                "ID": service_id, "ServiceName": name, "Namespace": namespace, "NodeID": NODE_ID,
                "Datacenter": "dc1", "JobID": job_id, "AllocID": alloc_id, "Tags": chosen,
                "Address": address, "Port": port, "CreateIndex": index, "ModifyIndex": index,
                "_tags": list(tags),
            }  # fmt: skip
        return service_id

    def promote_service(self, service_id: str) -> None:
        """The allocation is no longer a canary: its client re-registers the service with the normal tags
        (client/allocrunner/group_service_hook.go Update -> UpdateWorkload with Canary false, then
        nsd.go generateNomadServiceRegistration)."""
        with self.cond:
            reg = self.services[service_id]
            reg["Tags"] = list(reg["_tags"])
            reg["ModifyIndex"] = self._bump("services", change=f"service {service_id} promoted")

    def deregister_service(self, service_id: str) -> None:
        """The allocation stops (group_service_hook.go deregister, before shutdown_delay) or
        DELETE /v1/service/<name>/<id>: the registration is gone."""
        with self.cond:
            self.services.pop(service_id, None)
            self._bump("services", change=f"service {service_id} deregistered")

    @staticmethod
    def _public(reg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in reg.items() if not k.startswith("_")}

    def _services_list(self, request: Request, body: Any) -> Response:
        """GET /v1/services (command/agent/service_registration_endpoint.go
        ServiceRegistrationListRequest; nomad/service_registration_endpoint.go List): one stub per
        namespace with every service name and the UNION of its registrations' tags (serviceTagSet);
        [] when the namespace has none."""
        self._block(request, "services")
        namespace = request.args.get("namespace") or "default"
        with self.cond:
            tags: dict[str, list[str]] = {}
            for reg in self.services.values():
                if reg["Namespace"] == namespace:
                    union = tags.setdefault(reg["ServiceName"], [])
                    union.extend(t for t in reg["Tags"] if t not in union)
        stubs = [{"ServiceName": n, "Tags": t} for n, t in sorted(tags.items())]
        return self._json([{"Namespace": namespace, "Services": stubs}] if stubs else [], "services")

    def _service_get(self, request: Request, body: Any, name: str) -> Response:
        """GET /v1/service/<name> (service_registration_endpoint.go serviceGetRequest; nomad/
        service_registration_endpoint.go GetService): every registration of that name in the namespace,
        through the paginator, which applies ?filter= (nomad/state/paginator/paginator.go NewPaginator:
        a filter bexpr cannot read is a 400 "failed to read filter expression"). The one filter form
        modelled is Traefik's: `Tags contains "<tag>"`."""
        self._block(request, "services")
        namespace = request.args.get("namespace") or "default"
        wanted: str | None = None
        expr = request.args.get("filter", "")
        if expr:
            m = re.fullmatch(r'\s*Tags\s+contains\s+"((?:[^"\\]|\\.)*)"\s*', expr)
            if not m:
                raise _HTTPError(400, f"failed to read result page: failed to read filter expression: {expr}")
            wanted = json.loads(f'"{m.group(1)}"')
        with self.cond:
            regs = [
                self._public(r)
                for r in self.services.values()
                if r["ServiceName"] == name and r["Namespace"] == namespace
                and (wanted is None or wanted in r["Tags"])
            ]  # fmt: skip
        return self._json(regs, "services")

    def _service_delete(self, request: Request, body: Any, name: str, id: str) -> Response:
        """DELETE /v1/service/<name>/<id> (service_registration_endpoint.go serviceDeleteRequest)."""
        self.deregister_service(id)
        return self._json(None, "services")

    # ------------------------------------------------------------------------------------------ HTTP --
    def count(self, path_regex: str = ".*", method: str | None = None) -> int:
        return sum(
            1
            for r in self.requests
            if re.search(path_regex, r.path) and (method is None or r.method == method)
        )

    def _handle(self, request: Request) -> Response:
        rec = Request_(time.monotonic(), request.method, request.path, dict(request.args))
        with self.cond:
            self.requests.append(rec)
            for hook in list(self._request_hooks):
                if re.search(hook[0], request.path) and self.count(hook[0]) == hook[1]:
                    self._request_hooks.remove(hook)
                    hook[2]()
        query = request.query_string.decode()
        target = f"{request.method} {request.path}" + (f"?{query}" if query else "")
        for regex, fn in list(self.before_next):
            if re.search(regex, target):
                self.before_next.remove((regex, fn))
                with self.cond:
                    fn()
                break
        for regex in list(self.drop_request):
            if re.search(regex, f"{request.method} {request.path}"):
                self.drop_request.remove(regex)  # the connection breaks before Nomad sees the request
                rec.status = -1
                self._cut(request)
                return Response(b"", status=200)
        try:
            resp = self._route(request)
        except _HTTPError as err:
            resp = Response(err.body, status=err.status, content_type="text/plain; charset=utf-8")
        except Exception as exc:  # a bug in the double: make it loud
            self.errors.append(f"{request.method} {request.path}: {exc!r}")
            raise
        rec.status = resp.status_code
        for regex in list(self.drop_answer):
            if re.search(regex, f"{request.method} {request.path}"):
                # the request was applied, its answer is lost on the way (a dropped connection, a proxy
                # restart): the client sees "Connection aborted"/"RemoteDisconnected"
                self.drop_answer.remove(regex)
                rec.status = -1
                self._cut(request)
                return Response(b"", status=200)
        return resp

    @staticmethod
    def _cut(request: Request) -> None:
        sock = request.environ.get("werkzeug.socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _json(self, body: Any, table: str | None = None) -> Response:
        # command/agent/http.go setIndex / setKnownLeader / setLastContact: X-Nomad-Index,
        # X-Nomad-KnownLeader, X-Nomad-LastContact on every query answer
        headers = {
            "X-Nomad-Index": str(self.tables[table] if table else self.index),
            "X-Nomad-KnownLeader": "true" if self.leader else "false",
            "X-Nomad-LastContact": "0",
        }
        return Response(json.dumps(body), status=200, content_type="application/json", headers=headers)

    def _acl(self, request: Request, *needed: str) -> None:
        """ACL check for one endpoint: any of `needed` capabilities. command/agent/http.go maps
        structs.ErrPermissionDenied / ErrTokenNotFound to 403 "Permission denied" / "ACL token not found";
        the capabilities per endpoint are cited at each route in _route."""
        if not self.acl_tokens:
            return
        token = request.headers.get("X-Nomad-Token", "")
        if token and token not in self.acl_tokens:
            raise _HTTPError(403, "ACL token not found")
        caps = self.acl_tokens.get(token, set())  # no token: the anonymous policy (empty here)
        if not needed or "*" in caps or any(n in caps for n in needed):
            return
        raise _HTTPError(403, "Permission denied")

    def _hold_for_leader(self) -> None:
        # nomad/rpc.go forward: while no leader is known a server holds the RPC for
        # RPCHoldTimeout, then fails it with structs.ErrNoLeader (500 "No cluster leader")
        end = time.monotonic() + self.rpc_hold
        with self.cond:
            while not self.leader and not self._closed:
                rest = end - time.monotonic()
                if rest <= 0:
                    raise _HTTPError(500, "No cluster leader")
                self.cond.wait(rest)

    def _region(self, request: Request) -> None:
        """nomad/rpc.go forwardRegion/findRegionServer: a region with no known servers ->
        structs.ErrNoRegionPath, answered 500 "No path to region" (command/agent/http.go wrap)."""
        region = request.args.get("region", "")
        if region and region != self.region:
            raise _HTTPError(500, "No path to region")

    def _block(self, request: Request, table: str) -> None:
        """Blocking query (nomad/rpc.go blockingRPC): hold while the table's index <= ?index, for ?wait
        capped at 300 s (structs.MaxBlockingRPCQueryTime; 300 s when absent, DefaultBlockingRPCQueryTime),
        plus jitter up to wait/16 (structs.JitterFraction, helper.RandomStagger)."""
        try:
            index = int(request.args.get("index", "0"))
        except ValueError:
            raise _HTTPError(400, "Invalid index") from None  # command/agent/http.go parseWait
        if index <= 0:
            return
        try:
            wait = _duration(request.args.get("wait", "")) if request.args.get("wait") else 300.0
        except ValueError:
            raise _HTTPError(400, "Invalid wait time") from None
        wait = min(wait, 300.0) if wait > 0 else 300.0
        jitter = {"none": 0.0, "max": wait / 16}.get(self.jitter)
        if jitter is None:
            jitter = random.uniform(0, wait / 16)  # noqa: S311 - timing jitter, not a secret
        end = time.monotonic() + wait + jitter
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
        if path == "/v1/agent/self":
            self._acl(request, "agent:read")  # command/agent/agent_endpoint.go: aclObj.AllowAgentRead()
            return self._json(self._agent_self())
        body = _body(request)
        if path == "/v1/jobs/parse" and method in ("POST", "PUT"):
            # command/agent/job_endpoint.go JobsParseRequest: parsed in the agent (no RPC, no leader);
            # parse-job or submit-job in the namespace
            self._acl(request, "parse-job", "submit-job")
            return self._parse(request, body)
        m = re.fullmatch(r"/v1/client/fs/logs/(?P<id>[^/]*)", path)
        if m and method == "GET":
            # client/fs_endpoint.go logs: read-logs or read-fs in the allocation's namespace
            self._acl(request, "read-logs", "read-fs")
            return self._logs(request, m.group("id"))
        self._region(request)
        if path in ("/v1/status/leader", "/v1/status/peers"):
            # nomad/status_endpoint.go Leader/Peers: authentication errors are thrown away, no ACL check.
            # Peers is forwarded to the leader (s.srv.forward: "No cluster leader" without one) and lists
            # raft.GetConfiguration().Servers: every server in the configuration, a down one included
            # (it stays until autopilot removes it).
            if path.endswith("leader"):
                return self._json(self.leader)
            if self.servers and not self.leader:
                self._hold_for_leader()
            return self._json(list(self.servers) if self.servers else ([self.leader] if self.leader else []))
        # capability per route: nomad/node_endpoint.go (AllowNodeRead), nomad/job_endpoint.go (read-job,
        # submit-job, list-jobs), nomad/deployment_endpoint.go (read-job; promote: submit-job or
        # promote-deployment), nomad/eval_endpoint.go + alloc_endpoint.go (read-job),
        # nomad/variables_endpoint.go (variables read / write on the path)
        routes: list[tuple[str, str, tuple[str, ...], Callable[..., Response]]] = [
            ("GET", r"/v1/nodes", ("node:read",), self._nodes),
            ("GET", r"/v1/node/(?P<id>[^/]+)", ("node:read",), self._node),
            ("GET", r"/v1/jobs", ("list-jobs", "read-job"), self._jobs),
            ("POST", r"/v1/jobs", ("submit-job",), self._register),
            ("POST", r"/v1/job/(?P<id>[^/]+)/plan", ("submit-job",), self._plan),
            ("GET", r"/v1/job/(?P<id>[^/]+)/allocations", ("read-job",), self._job_allocs),
            ("GET", r"/v1/job/(?P<id>[^/]+)/deployments", ("read-job",), self._job_deployments),
            ("GET", r"/v1/job/(?P<id>[^/]+)/deployment", ("read-job",), self._job_deployment),
            ("GET", r"/v1/job/(?P<id>[^/]+)/evaluations", ("read-job",), self._job_evals),
            ("GET", r"/v1/job/(?P<id>[^/]+)", ("read-job",), self._job),
            ("DELETE", r"/v1/job/(?P<id>[^/]+)", ("submit-job",), self._deregister),
            ("GET", r"/v1/deployment/(?P<id>[^/]+)", ("read-job",), self._deployment),
            (
                "POST",
                r"/v1/deployment/promote/(?P<id>[^/]+)",
                ("submit-job", "promote-deployment"),
                self._promote,
            ),
            ("GET", r"/v1/evaluation/(?P<id>[^/]+)", ("read-job",), self._evaluation),
            ("GET", r"/v1/allocation/(?P<id>[^/]+)", ("read-job",), self._allocation),
            ("GET", r"/v1/var/(?P<id>.+)", ("variables:read",), self._var_get),
            ("PUT", r"/v1/var/(?P<id>.+)", ("variables:write",), self._var_put),
            # acl/acl.go AllowServiceRegistrationReadList: read-job in the namespace (or a workload
            # identity); the delete needs submit-job (nomad/service_registration_endpoint.go DeleteByID)
            ("GET", r"/v1/services", ("read-job",), self._services_list),
            ("GET", r"/v1/service/(?P<name>[^/]+)", ("read-job",), self._service_get),
            ("DELETE", r"/v1/service/(?P<name>[^/]+)/(?P<id>[^/]+)", ("submit-job",), self._service_delete),
        ]
        for m_, regex, caps, fn in routes:
            mm = re.fullmatch(regex, path)
            if mm and m_ == method:
                self._acl(request, *caps)
                self._hold_for_leader()  # nomad/rpc.go forward: servers hold RPCs while no leader
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
        # command/agent/agent_endpoint.go HealthRequest: {client, server: {ok, message}}, 500 when
        # either is not ok
        client_ok = self.node is not None and self.node["Status"] == "ready"
        server_ok = bool(self.leader)
        body = {
            "client": {"ok": client_ok, "message": "ok" if client_ok else "client not yet registered"},
            "server": {"ok": server_ok, "message": "ok" if server_ok else "No cluster leader"},
        }
        status = 200 if client_ok and server_ok else 500
        return Response(json.dumps(body), status=status, content_type="application/json")

    def _nodes(self, request: Request, body: Any) -> Response:
        # nomad/node_endpoint.go List (node:read): structs.NodeListStub, no Attributes/Events
        self._block(request, "nodes")
        with self.cond:
            stubs = []
            for node in self.all_nodes():  # one node, or a cluster's (`cluster`)
                stub = {
                    k: copy.deepcopy(v)
                    for k, v in node.items()
                    if k not in ("Attributes", "Events", "NodeResources", "Meta")
                }
                stubs.append(stub)
            return self._json(stubs, "nodes")

    def _node(self, request: Request, body: Any, id: str) -> Response:
        # nomad/node_endpoint.go GetNode; command/agent/node_endpoint.go: 404 "node not found"
        self._block(request, "nodes")
        with self.cond:
            found = next((n for n in self.all_nodes() if n["ID"] == id), None)
            if found is None:
                raise _HTTPError(404, "node not found")
            return self._json(copy.deepcopy(found), "nodes")

    # ------------------------------------------------------------------------------------------ jobs --
    def _parse(self, request: Request, body: Any) -> Response:
        """command/agent/job_endpoint.go JobsParseRequest: 400 "Job spec is empty", 400 "Failed to parse
        job: <diagnostics>"; the answer is the bare Job (no Warnings field: jobspec2's warnings are dropped)."""
        self.parse_calls.append(body)
        if not isinstance(body, dict) or not body.get("JobHCL"):
            raise _HTTPError(400, "Job spec is empty")
        key = (str(body["JobHCL"]), str(body.get("Variables") or ""))
        try:
            job, warnings = self._parsed.get(key) or parse_job_hcl(*key)
        except HCLParseError as exc:
            raise _HTTPError(400, f"Failed to parse job: {exc}") from None
        if self.memo_parse:
            self._parsed[key] = (job, warnings)
            job = copy.deepcopy(job)
        self.parse_warnings.append(warnings)
        return self._json(job)

    def _namespace(self, request: Request, job: dict[str, Any]) -> None:
        """nomad/job_endpoint_validators.go (admission validator) and nomad/state/state_store.go upsertJob:
        a job in a namespace that does not exist -> 500 `job "x" is in nonexistent namespace "y"`."""
        # command/agent/job_endpoint.go namespaceForJob: the query's namespace wins over the job's
        ns = request.args.get("namespace") or job.get("Namespace") or "default"
        if ns not in self.namespaces:
            raise _HTTPError(500, f'job "{job.get("ID")}" is in nonexistent namespace "{ns}"')

    def _jobs(self, request: Request, body: Any) -> Response:
        # nomad/job_endpoint.go List: structs.JobListStub, filtered by ?prefix
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
        # command/agent/job_endpoint.go jobQuery: 404 "job not found"
        self._block(request, "jobs")
        with self.cond:
            if id not in self.jobs:
                raise _HTTPError(404, "job not found")
            return self._json(copy.deepcopy(self.jobs[id]), "jobs")

    def _plan(self, request: Request, body: Any, id: str) -> Response:
        # nomad/job_endpoint.go Plan: Diff (nomad/structs/diff.go: Added/Edited/None), the current
        # JobModifyIndex (0 for a new job), FailedTGAllocs from a scheduler dry run
        job = body["Job"]
        self._namespace(request, job)
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
                    "Warnings": merge_warnings(job_warnings(job)),  # nomad/job_endpoint.go Plan
                    "Diff": {"Type": kind, "ID": id, "Fields": None, "Objects": None, "TaskGroups": groups},
                    "CreatedEvals": None,
                    "JobModifyIndex": current["JobModifyIndex"] if current else 0,
                    "FailedTGAllocs": failed or None,
                    "Annotations": {"DesiredTGUpdates": {}},
                }
            )

    def _register(self, request: Request, body: Any) -> Response:
        # nomad/job_endpoint.go Register; an unchanged spec keeps its version
        # (nomad/structs/structs.go SpecChanged) but still gets an evaluation
        job = copy.deepcopy(body["Job"])
        job_id = job["ID"]
        self._namespace(request, job)
        with self.cond:
            current = self.jobs.get(job_id)
            if body.get("EnforceIndex"):
                # nomad/structs/job.go (Job).EnforceIndex, called by nomad/job_endpoint.go Register; a plain
                # error, so HTTP 500 (command/agent/http.go)
                want = int(body.get("JobModifyIndex") or 0)
                if current is not None and want == 0:
                    raise _HTTPError(500, "Enforcing job modify index 0: job already exists")
                if current is not None and want != current["JobModifyIndex"]:
                    raise _HTTPError(
                        500,
                        f"Enforcing job modify index {want}: job exists with conflicting job modify index: "
                        f"{current['JobModifyIndex']}",
                    )
                if current is None and want != 0:
                    raise _HTTPError(500, f"Enforcing job modify index {want}: job does not exist")
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
                 # nomad/job_endpoint.go Register: reply.Warnings = MergeMultierrorWarnings(job warnings)
                 "Warnings": merge_warnings(job_warnings(job)), "Index": ev["CreateIndex"], "LastContact": 0,
                 "KnownLeader": True}
            )  # fmt: skip

    def _store_version(self, job: dict[str, Any], current: dict[str, Any] | None) -> int:
        # nomad/state/state_store.go upsertJobImpl: Version+1, ModifyIndex = JobModifyIndex =
        # the raft index, CreateIndex kept from the existing job
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
        # nomad/structs/structs.go Evaluation (TriggeredBy job-register, deployment-watcher, ...)
        idx = self._bump("evals")
        ev: dict[str, Any] = {
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
        # scheduler/feasible/feasible.go DriverChecker: "missing drivers" in ConstraintFiltered;
        # nomad/structs/funcs.go AllocsFit: "memory" in DimensionExhausted
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
            unmet = [
                c
                for c in (job.get("Constraints") or []) + (tg.get("Constraints") or [])
                if not _meets(c, node)
            ]
            if unmet:  # scheduler/feasible/feasible.go ConstraintChecker: the constraint's text as the key
                c = unmet[0]
                metric.update(
                    NodesFiltered=1, ConstraintFiltered={f"{c['LTarget']} {c['Operand']} {c['RTarget']}": 1}
                )
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
        # scheduler/generic_sched.go: place the groups, or record FailedTGAllocs and create a
        # blocked evaluation (createBlockedEval)
        """The scheduler: place the job's current version, or record why it cannot."""
        ev = self.evals[eval_id]
        if ev["Status"] == "complete":  # nomad/eval_broker.go: an acked evaluation is not handed out again
            return
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
        # nomad/structs/deployment.go NewDeployment; a newer job version cancels a running
        # deployment (DeploymentStatusDescriptionNewerJob)
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
            # nomad/structs/deployment.go NewDeployment: JobModifyIndex is the job's ModifyIndex (any change,
            # status included), JobSpecModifyIndex its JobModifyIndex (the registration)
            "JobModifyIndex": job["ModifyIndex"], "JobSpecModifyIndex": job["JobModifyIndex"],
            "JobCreateIndex": job["CreateIndex"],
            "IsMultiregion": False, "TaskGroups": groups, "Status": "running",
            "StatusDescription": "Deployment is running", "CreateIndex": idx, "ModifyIndex": idx,
        }  # fmt: skip
        self.deployments[dep["ID"]] = dep
        return dep

    # ------------------------------------------------------------------------------------ allocations --
    def _place(
        self,
        job: dict[str, Any],
        tg: dict[str, Any],
        i: int,
        dep: dict[str, Any] | None,
        ev: dict[str, Any],
        *,
        node: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        # scheduler/reconciler: canaries first, the rest after promotion; nomad/structs/structs.go
        # Allocation (DesiredStatus run/stop, ClientStatus pending/running/complete/failed)
        idx = self._bump("allocs")
        alloc = {
            "ID": str(uuid.uuid4()), "EvalID": ev["ID"], "Name": f"{job['ID']}.{tg['Name']}[{i}]",
            "Namespace": "default", "NodeID": node["ID"] if node else NODE_ID,
            "NodeName": node["Name"] if node else self.node_name, "JobID": job["ID"],
            "JobType": job["Type"], "JobVersion": job["Version"], "JobCreateIndex": job["CreateIndex"],
            "TaskGroup": tg["Name"],
            "DesiredStatus": "run", "DesiredDescription": "", "ClientStatus": "pending",
            "ClientDescription": "No tasks have started", "TaskStates": {}, "DeploymentStatus": None,
            "FollowupEvalID": "", "CreateIndex": idx, "ModifyIndex": idx, "CreateTime": now_ns(),
            "ModifyTime": now_ns(),
        }  # fmt: skip
        self.allocs[alloc["ID"]] = alloc
        self._task_lists[alloc["ID"]] = list(tg.get("Tasks") or [])
        if dep is not None:
            dep["TaskGroups"][tg["Name"]]["PlacedAllocs"] += 1
        tasks = tg.get("Tasks") or []
        behaviour = "ok"
        for t in tasks:
            b = self.behaviour.get(str((t.get("Config") or {}).get("image", ""))) or self.behaviour.get(
                t["Name"]
            )
            image = str((t.get("Config") or {}).get("image", ""))
            if not b and image and self.pullable is not None and image not in self.images:
                # drivers/docker/driver.go createImage: not on the node -> pull; the registry refuses
                b = "" if self.pullable(image) else "pull-denied"
            if b:
                behaviour = b
                failing_task = t["Name"]
                break
        else:
            failing_task = ""
        T = self.timing
        self.at(T.alloc_start, lambda: self._alloc_setup(alloc, tasks))
        if behaviour == "ok":
            extra = max(
                [self.health_delay.get(t["Name"], 0.0) for t in tasks]
                + [self.health_delay.get(str((t.get("Config") or {}).get("image", "")), 0.0) for t in tasks]
            )
            self.at(T.alloc_start + T.alloc_running, lambda: self._alloc_running(alloc, tasks))
            if extra == float("inf"):  # held until release_health(): the test decides when
                self.held_health.append(lambda: self._alloc_health(alloc, dep, True))
            else:
                self.at(
                    T.alloc_start + T.alloc_running + T.alloc_healthy + extra,
                    lambda: self._alloc_health(alloc, dep, True),
                )
        else:
            self.at(T.alloc_start + T.alloc_running,
                    lambda: self._alloc_fail(alloc, tasks, failing_task, behaviour, dep))  # fmt: skip
        return alloc

    # ----------------------------------------------------------------------------- docker images --
    def load_image(self, image: str) -> None:
        """An image built or loaded on the node (`docker build` / `docker load` in the VM)."""
        with self.cond:
            self.images.setdefault(image, set())  # not reference-counted until a task uses it
            self.image_events.append(f"loaded {image}")

    def _alloc_tasks(self, alloc: dict[str, Any]) -> list[dict[str, Any]]:
        return self._task_lists.get(alloc["ID"], [])

    def _use_image(self, alloc: dict[str, Any], task: dict[str, Any]) -> None:
        """drivers/docker/coordinator.go IncrementImageReference: the task holds a reference."""
        image = str((task.get("Config") or {}).get("image", ""))
        if image:
            self.images.setdefault(image, set()).add(f"{alloc['ID']}/{task['Name']}")

    def _release_image(self, alloc: dict[str, Any], task: dict[str, Any]) -> None:
        """drivers/docker/coordinator.go RemoveImage: the last reference gone, the image is removed after
        removeDelay (gc.image_delay) unless it is referenced again; never with gc.image = false."""
        image = str((task.get("Config") or {}).get("image", ""))
        refs = self.images.get(image)
        if refs is None:
            return
        refs.discard(f"{alloc['ID']}/{task['Name']}")
        self._schedule_image_gc(image)

    def _schedule_image_gc(self, image: str) -> None:
        if not self.docker_gc_image or self.images.get(image):
            return

        def remove() -> None:
            if image in self.images and not self.images[image]:
                del self.images[image]
                self.image_events.append(f"removed {image}")

        self.at(self.docker_image_delay, remove)

    # ------------------------------------------------------------------------------------------ logs --
    def write_log(self, alloc_id: str, task: str, kind: str, text: str | bytes) -> None:
        with self.cond:
            data = text.encode() if isinstance(text, str) else text
            self.logs.setdefault((alloc_id, task, kind), bytearray()).extend(data)
            self.cond.notify_all()

    def _logs(self, request: Request, alloc_id: str) -> Response:
        """GET /v1/client/fs/logs/:alloc — command/agent/fs_endpoint.go Logs (parameter checks, 400s) and
        client/fs_endpoint.go logs (unknown allocation 404, unknown task 400, not started 404). Without
        plain=true the body is a stream of JSON StreamFrames {Offset, Data (base64), File}
        (client/lib/streamframer/framer.go; empty fields omitted, so a heartbeat is `{}`, sent every
        second while following: streamHeartbeatRate)."""
        q = request.args
        if not alloc_id:
            raise _HTTPError(400, "must provide a valid alloc id")
        task = q.get("task", "")
        if not task:
            raise _HTTPError(400, "must provide task name")

        def boolean(name: str) -> bool:
            v = q.get(name, "")
            if v == "":
                return False
            if v.lower() in ("1", "t", "true"):
                return True
            if v.lower() in ("0", "f", "false"):
                return False
            raise _HTTPError(
                400,
                f"failed to parse {name} field to boolean: strconv.ParseBool: parsing {v!r}: invalid syntax",
            )

        follow, plain = boolean("follow"), boolean("plain")
        kind = q.get("type", "")
        if kind not in ("stdout", "stderr"):
            raise _HTTPError(400, "must provide log type (stdout/stderr)")
        try:
            offset = int(q.get("offset", "0") or 0)
        except ValueError:
            raise _HTTPError(
                400, f"error parsing offset: strconv.ParseInt: parsing {q.get('offset')!r}: invalid syntax"
            ) from None
        origin = q.get("origin", "") or "start"
        if origin not in ("start", "end"):
            raise _HTTPError(400, "origin must be start or end")
        with self.cond:
            alloc = self.allocs.get(alloc_id)
            if alloc is None:
                raise _HTTPError(404, f'Unknown allocation "{alloc_id}"')
            ts = alloc["TaskStates"].get(task)
            if ts is None:
                raise _HTTPError(400, f'unknown task name "{task}"')
            if not ts.get("StartedAt"):
                raise _HTTPError(404, f'task "{task}" not started yet. No logs available')
            data = bytes(self.logs.get((alloc_id, task, kind), b""))
        start = max(0, len(data) - offset) if origin == "end" else min(offset, len(data))
        name = f"alloc/logs/{task}.{kind}.0"
        if plain and not follow:
            return Response(data[start:], status=200, content_type="text/plain")

        def frames() -> Any:
            pos = start
            while True:
                with self.cond:
                    chunk = bytes(self.logs.get((alloc_id, task, kind), b""))[pos:]
                    if not chunk and follow and not self._closed:
                        self.cond.wait(self.heartbeat)
                        chunk = bytes(self.logs.get((alloc_id, task, kind), b""))[pos:]
                if chunk:
                    if plain:
                        yield chunk
                    else:
                        frame = {
                            "Offset": pos + len(chunk),
                            "Data": base64.b64encode(chunk).decode(),
                            "File": name,
                        }
                        yield json.dumps(frame).encode()
                    pos += len(chunk)
                elif not follow or self._closed:
                    return
                elif not plain:
                    yield b"{}"  # heartbeat

        return Response(frames(), status=200, content_type="text/plain" if plain else "application/json")

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
        # client/allocrunner/taskrunner: task events Received, Task Setup, Driver (image pull)
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
            self._use_image(alloc, t)
            out, err = self.task_output.get(t["Name"], (f"{t['Name']}: started\n", ""))
            self.write_log(alloc["ID"], t["Name"], "stdout", out)
            self.write_log(alloc["ID"], t["Name"], "stderr", err)
            life = t.get("Lifecycle") or {}
            if life.get("Hook") == "prestart" and not life.get("Sidecar"):
                # client/allocrunner/tasklifecycle/coordinator.go (Coordinator.isPrestartDone): a prestart
                # task that is not a sidecar runs to completion before the main tasks start; dead, not failed
                ts["Events"] += [self._event("Terminated", "Exit Code: 0", ExitCode=0)]
                ts.update(State="dead", FinishedAt="2026-11-25T09:00:02Z")
                self._release_image(alloc, t)
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
        # nomad/structs/structs.go TaskEvent types (Driver Failure, Terminated, Restarting, Not
        # Restarting, Sibling Task Failed) as client/allocrunner/taskrunner emits them
        if alloc["DesiredStatus"] != "run":
            return
        ts = alloc["TaskStates"][task]
        image = next(((t.get("Config") or {}).get("image", "") for t in tasks if t["Name"] == task), "")
        if how == "pull-denied":
            repo = image.split(":")[0]
            err = (f"Failed to pull `{image}`: Error response from daemon: pull access denied for {repo}, "
                   "repository does not exist or may require 'docker login': denied: requested access to the "
                   "resource is denied")  # fmt: skip
            ts["Events"] += [
                self._event("Driver Failure", err, DriverError=err, FailsTask=True),
                self._event("Not Restarting", "Error was unrecoverable", RestartReason="Error was unrecoverable",
                            FailsTask=True),
            ]  # fmt: skip
        elif how == "driver-failure":
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
        for t in tasks:
            self._release_image(alloc, t)
        self._touch(alloc, f"alloc {alloc['Name']} failed")
        self._alloc_health(alloc, dep, False)

    def _alloc_health(self, alloc: dict[str, Any], dep: dict[str, Any] | None, healthy: bool) -> None:
        # client/allochealth + nomad/deploymentwatcher: health counts per group; descriptions
        # from nomad/structs/deployment.go (Successful, RunningNeedsPromotion)
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
            # nomad/deploymentwatcher/deployment_watcher.go autoPromoteDeployment: only when EVERY group with
            # canaries is auto_promote and all its canaries are healthy (then All: true)
            canary_groups = [x for x in dep["TaskGroups"].values() if x["DesiredCanaries"]]
            if all(x["AutoPromote"] and x["HealthyAllocs"] >= x["DesiredCanaries"] for x in canary_groups):
                self._promote_now(dep)
            elif all(x["AutoPromote"] for x in canary_groups):
                dep["StatusDescription"] = "Deployment is running pending automatic promotion"
            else:
                dep["StatusDescription"] = "Deployment is running but requires manual promotion"
        dep["ModifyIndex"] = self._bump("deployments", change=f"deployment {dep['ID'][:8]} {dep['Status']}")

    def _fail_deployment(self, dep: dict[str, Any], auto_revert: bool) -> None:
        # nomad/deploymentwatcher/deployment_watcher.go: unhealthy allocations fail the
        # deployment (DeploymentStatusDescriptionFailedAllocations); auto_revert registers the
        # latest stable version again (DeploymentStatusDescriptionRollback)
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
        # scheduler: old allocations get DesiredStatus stop; the client kills the tasks
        # (Killing, Terminated, Killed events) and reports complete
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
                for t in self._alloc_tasks(alloc):
                    self._release_image(alloc, t)
            if self.timing.gc_after is not None:
                self.at(self.timing.gc_after, lambda: self._gc(alloc))

        if self.timing.alloc_stop == float("inf"):  # held until release_stops(): a test decides when
            self.held_stops.append(stopped)
        else:
            self.at(self.timing.alloc_stop, stopped)

    def _gc(self, alloc: dict[str, Any]) -> None:
        # nomad/core_sched.go: terminal allocations are garbage-collected
        self.allocs.pop(alloc["ID"], None)
        self._bump("allocs", change=f"alloc {alloc['Name']} garbage-collected")

    def _job_allocs(self, request: Request, body: Any, id: str) -> Response:
        """nomad/state/state_store.go AllocsByJob(anyCreateIndex=?all): without all=true, only allocations
        of the CURRENT job (same CreateIndex); every allocation with the ID when the job is gone."""
        self._block(request, "allocs")
        every = request.args.get("all", "") in ("true", "1")
        with self.cond:
            job = self.jobs.get(id)
            allocs = [
                copy.deepcopy(a)
                for a in self.allocs.values()
                if a["JobID"] == id and (every or job is None or a["JobCreateIndex"] == job["CreateIndex"])
            ]
            return self._json(allocs, "allocs")

    def _allocation(self, request: Request, body: Any, id: str) -> Response:
        # command/agent/alloc_endpoint.go: 404 "alloc not found"
        with self.cond:
            if id not in self.allocs:
                raise _HTTPError(404, "alloc not found")
            return self._json(copy.deepcopy(self.allocs[id]), "allocs")

    # ---------------------------------------------------------------------------------- deployments --
    def _job_deployment(self, request: Request, body: Any, id: str) -> Response:
        # nomad/job_endpoint.go LatestDeployment: the newest by CreateIndex, null when none
        self._block(request, "deployments")
        with self.cond:
            deps = [d for d in self.deployments.values() if d["JobID"] == id]
            latest = max(deps, key=lambda d: d["CreateIndex"]) if deps else None
            return self._json(copy.deepcopy(latest), "deployments")

    def _job_deployments(self, request: Request, body: Any, id: str) -> Response:
        # command/agent/job_endpoint.go jobDeployments -> nomad/job_endpoint.go (*Job).Deployments ->
        # nomad/state/state_store.go DeploymentsByJobID: without all=true only the deployments of the job
        # as registered now (JobCreateIndex == the job's CreateIndex); an empty list, never null
        self._block(request, "deployments")
        every = request.args.get("all", "") in ("true", "1")
        with self.cond:
            job = self.jobs.get(id)
            deps = [
                d for d in self.deployments.values()
                if d["JobID"] == id and (every or job is None or d["JobCreateIndex"] == job["CreateIndex"])
            ]  # fmt: skip
            return self._json(copy.deepcopy(deps), "deployments")

    def _deployment(self, request: Request, body: Any, id: str) -> Response:
        # command/agent/deployment_endpoint.go: 404 "deployment not found"
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
                raise _HTTPError(500, f"Deployment {id!r} has terminal status {dep['Status']!r}:")
            if not isinstance(body, dict) or body.get("DeploymentID") != id:
                # command/agent/deployment_endpoint.go deploymentPromote
                raise _HTTPError(400, "Deployment ID does not match")
            self.promote_bodies.append(body)
            every = bool(body.get("All"))
            groups = set(body.get("Groups") or [])
            # nomad/state/state_store.go UpdateDeploymentPromotion: every group promoted (All: true, auto-promote
            # groups included) must have all its canaries healthy, else a multierror (HTTP 500)
            problems = []
            for name, g in sorted(dep["TaskGroups"].items()):
                if (not every and name not in groups) or not g["DesiredCanaries"]:
                    continue
                healthy = sum(
                    1
                    for a in self.allocs.values()
                    if a["ID"] in g["PlacedCanaries"]
                    and a["ClientStatus"] not in ("complete", "failed", "lost")
                    and (a.get("DeploymentStatus") or {}).get("Healthy") is True
                )
                if healthy < g["DesiredCanaries"]:
                    problems.append(
                        f'Task group "{name}" has {healthy}/{g["DesiredCanaries"]} healthy allocations'
                    )
            if problems:
                n = len(problems)
                raise _HTTPError(
                    500,
                    f"{n} error{'s' if n > 1 else ''} occurred:\n"
                    + "".join(f"\t* {p}\n" for p in problems)
                    + "\n",
                )
            ev = self._promote_now(dep, None if every else groups)
            idx = self._bump("deployments", change=f"deployment {id[:8]} promoted")
            return self._json({"EvalID": ev["ID"], "EvalCreateIndex": ev["CreateIndex"],
                               "DeploymentModifyIndex": idx, "Index": idx})  # fmt: skip

    def _promote_now(self, dep: dict[str, Any], groups: set[str] | None = None) -> dict[str, Any]:
        job = self.jobs[dep["JobID"]]
        ev = self._new_eval(job["ID"], "deployment-watcher", job["JobModifyIndex"])
        for tg in job["TaskGroups"]:
            g = dep["TaskGroups"][tg["Name"]]
            if not g["DesiredCanaries"] or g["Promoted"] or (groups is not None and tg["Name"] not in groups):
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
        if all(
            (not x["DesiredCanaries"] or x["Promoted"]) and x["HealthyAllocs"] >= x["DesiredTotal"]
            for x in dep["TaskGroups"].values()
        ):  # every group done, not only the one promoted
            dep.update(Status="successful", StatusDescription="Deployment completed successfully")
            job.update(Stable=True, Status="running")
            for v in self.versions.get(dep["JobID"], []):
                if v["Version"] == dep["JobVersion"]:
                    v["Stable"] = True
        self._finish_eval(ev, DeploymentID=dep["ID"])
        return ev

    def _job_evals(self, request: Request, body: Any, id: str) -> Response:
        # nomad/job_endpoint.go Evaluations
        self._block(request, "evals")
        with self.cond:
            return self._json([copy.deepcopy(e) for e in self.evals.values() if e["JobID"] == id], "evals")

    def _evaluation(self, request: Request, body: Any, id: str) -> Response:
        # command/agent/eval_endpoint.go: 404 "eval not found"
        self._block(request, "evals")
        with self.cond:
            if id not in self.evals:
                raise _HTTPError(404, "eval not found")
            return self._json(copy.deepcopy(self.evals[id]), "evals")

    def _deregister(self, request: Request, body: Any, id: str) -> Response:
        # nomad/job_endpoint.go Deregister: stop (or purge) with a job-deregister evaluation;
        # running deployments cancelled (DeploymentStatusDescriptionStoppedJob)
        purge = request.args.get("purge", "") in ("true", "1")
        with self.cond:
            job = self.jobs.get(id)
            if job is None:
                # nomad/job_endpoint.go Deregister: an unknown job is not an error; no evaluation
                return self._json(
                    {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0, "Index": self.index}
                )
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
        # command/agent/variable_endpoint.go: 404 "variable not found"
        with self.cond:
            if id not in self.vars:
                raise _HTTPError(404, "variable not found")
            return self._json(copy.deepcopy(self.vars[id]), "vars")

    def _var_put(self, request: Request, body: Any, id: str) -> Response:
        # command/agent/variable_endpoint.go variableUpsert: ?cas=N check-and-set; a conflict
        # answers 409 with the current variable (empty when it does not exist)
        if time.monotonic() < self._keyring_at:
            # nomad/variables_endpoint.go Apply -> encrypt -> nomad/encrypter.go activeCipherSet
            raise _HTTPError(500, "variable error: encrypt: keyring has not been initialized yet")
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


def _meets(constraint: dict[str, str], node: dict[str, Any]) -> bool:
    """scheduler/feasible/feasible.go meetsConstraint: resolveTarget on both sides (${meta.X} -> node.Meta,
    ${attr.X} -> node.Attributes, ${node.unique.name} -> Name; a literal is itself), then the operand;
    the double knows "=" / "==" / "is" and "!=" / "not" (checkConstraint), and an unresolved target fails."""

    def resolve(target: str) -> tuple[str, bool]:
        if not target.startswith("${"):
            return target, True
        if target == "${node.unique.name}":
            return str(node.get("Name", "")), True
        for prefix, table in (("${meta.", "Meta"), ("${attr.", "Attributes")):
            if target.startswith(prefix):
                key = target[len(prefix) : -1]
                values = node.get(table) or {}
                return str(values.get(key, "")), key in values
        return "", False

    left, lfound = resolve(constraint["LTarget"])
    right, rfound = resolve(constraint["RTarget"])
    operand = constraint.get("Operand") or "="
    if operand in ("=", "==", "is"):
        return lfound and rfound and left == right
    if operand in ("!=", "not"):
        return not (lfound and rfound and left == right)
    raise AssertionError(f"the double does not model constraint operand {operand!r}")


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

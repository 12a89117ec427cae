"""The deploy engine: job specs through Nomad's API, followed to the end; promote, purge, task logs.

It knows Nomad (through infra/nomad/client.py's Client) and nothing of this project: it reads no configuration,
names no job and keeps no state (only its error hints name the `inv` verbs and settings a user reaches for).
Which job gets which image, variables and secrets is infra/compose/release.py's choice; it calls this module, never
the reverse. Results are dataclasses (DeployResult, JobSummary).

The flow for one HCL file, the same steps `nomad job run` takes:

1. `POST /v1/jobs/parse` {JobHCL, Variables, Canonicalize}: the server turns HCL into the job's JSON
   (no HCL parser of our own; HCL variables are passed as a var-file string).
2. `POST /v1/job/:id/plan` with Diff: `Diff.Type == "None"` means the registered job is identical —
   nothing to do, and we say so. Otherwise register with `POST /v1/jobs`, check-and-set against the
   plan's JobModifyIndex so a concurrent change is not overwritten silently.
3. Follow the evaluation (blocking queries) until it completes. Unplaced groups (FailedTGAllocs: which
   constraint filtered the node, which resource ran out) are a PlacementError, exit code 2 like
   `nomad job run`.
4. Follow the deployment (blocking queries) until successful or failed; canaries are promoted once
   healthy when the group does not auto-promote. On failure, the failing allocations' recent task events
   name job, group, task and reason (Levant's habit) and DeployError exits 1.

Secrets: `ensure_secret` makes sure a Nomad Variable holds a key (a random value unless one is given,
never printed), with check-and-set; a job spec reads it with a `nomadVar` template.

Writes are never retried blindly: a register whose answer was lost is checked by re-reading the job
(a changed JobModifyIndex means Nomad has it); a variable write by re-reading the variable. Nomad's
warnings (plan and register `Warnings`; variables the file does not declare, which /v1/jobs/parse drops
silently as it does not parse Strict — jobspec2/types.variables.go) are shown to the user.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape as rich_escape

from infra.core import files, ui
from infra.core.errors import DeployError, NomadError, WaitTimeout, printable
from infra.core.waits import Deadline, Probe, wait_until
from infra.nomad.client import Client, NomadAnswerLost, NomadAPIError, NomadConflict, NomadNotFound, Result

#: Longest single blocking query while following an evaluation or a deployment.
BLOCK_SECONDS = 60.0
#: Largest job file read (job specs are a few KiB).
MAX_JOB_FILE = 1024 * 1024

TERMINAL_EVAL = ("complete", "failed", "canceled", "cancelled")
TERMINAL_DEPLOYMENT = ("successful", "failed", "cancelled", "canceled")
TERMINAL_ALLOC = ("complete", "failed", "lost")
#: Task event types that say why a task did not start or stopped (Levant and `nomad alloc status`).
FAILURE_EVENTS = (
    "Driver Failure",
    "Setup Failure",
    "Failed Validation",
    "Failed Artifact Download",
    "Failed Registering",
    "Template",
    "Terminated",
    "Killing",
    "Killed",
    "Not Restarting",
    "Restarting",
    "Sibling Task Failed",
    "Alloc Unhealthy",
    "Task hook failed",
)


class PlacementError(DeployError):
    """The scheduler could not place allocations (constraints, missing drivers, exhausted resources)."""

    exit_code = 2


class NotRegistered(DeployError):
    """Nomad refused the registration: nothing of this deploy reached the job (no rollback to report)."""


#: Registrations refused because the job changed since our plan ("Enforcing job modify index"), each
#: followed by a new plan, before the deploy gives up: a job that changes this often is being fought over.
REGISTER_ATTEMPTS = 3


@dataclass(frozen=True)
class DeployResult:
    job_id: str
    outcome: str  # "unchanged" | "deployed" | "registered" (--detach)
    version: int | None = None
    eval_id: str = ""
    deployment_id: str = ""
    elapsed: float = 0.0


# ---------------------------------------------------------------------------------------- job files --
_JOB_FILE_HINT = "the job specs live in nomad/ (config deploy.*_job names them)"


def read_job_file(path: Path) -> str:
    if not path.exists():
        raise DeployError(
            f"job file not found: {path}",
            hint="the job specs live in nomad/ (config deploy.*_job names them)",
        )
    text = files.read_text(path, "job file", error=DeployError, limit=MAX_JOB_FILE, hint=_JOB_FILE_HINT)
    if not text.strip():
        raise DeployError(f"job file is empty: {path}")
    return text


_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def hcl_variables(variables: Mapping[str, str] | None) -> str:
    """A var-file string for /v1/jobs/parse: `name = "value"` lines, values quoted as HCL strings."""
    lines = []
    for name, value in (variables or {}).items():
        if not _VAR_NAME.fullmatch(name):
            raise DeployError(f"invalid HCL variable name {name!r}")
        quoted = json.dumps(str(value)).replace("${", "$${").replace("%{", "%%{")
        lines.append(f"{name} = {quoted}")
    return "\n".join(lines) + ("\n" if lines else "")


def job_id_of(path: Path) -> str:
    """The job's ID as written in the file (`job "name" {`), without asking Nomad; else the file stem."""
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(MAX_JOB_FILE).decode("utf-8", errors="replace")
        m = re.search(r'^\s*job\s+"([^"]+)"\s*\{', head, re.MULTILINE)
        if m:
            return m.group(1)
    return path.name.split(".")[0]


def declared_variables(hcl: str) -> set[str]:
    """Names of the `variable "name" {` blocks of a job file (what jobspec2 would accept values for)."""
    return set(re.findall(r'^\s*variable\s+"([^"]+)"\s*\{', hcl, re.MULTILINE))


def parse(client: Client, path: Path, variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    hcl = read_job_file(path)
    # /v1/jobs/parse is not Strict: a value for an undeclared variable is dropped with a warning Nomad
    # never returns (command/agent/job_endpoint.go JobsParseRequest, jobspec2/types.variables.go)
    for name in sorted(set(variables or {}) - declared_variables(hcl)):
        ui.warn(f"{path}: variable {name!r} is not declared in the job file; Nomad ignores the value given")
    try:
        job = client.parse_job(hcl, hcl_variables(variables))
    except NomadAPIError as exc:
        if exc.status == 400:  # command/agent/job_endpoint.go: 400 "Failed to parse job: ..."
            # Nomad names the HCL "input.hcl" in its diagnostics; put the real path back.
            raise DeployError(
                f"{path}: Nomad could not parse the job: {exc.body.replace('input.hcl', str(path))}",
                hint="`nomad fmt -check` / `nomad job validate` show the same; check the variables passed",
            ) from exc
        raise  # 403, 500 "No cluster leader", ...: say what it is (NomadAPIError's message and hint)
    if not isinstance(job, dict) or not job.get("ID"):
        raise DeployError(f"{path}: /v1/jobs/parse returned no job ID: {str(job)[:200]}")
    return job


# ------------------------------------------------------------------------------------------- deploy --
def deploy_job(
    client: Client,
    path: Path,
    *,
    variables: Mapping[str, str] | None = None,
    detach: bool = False,
    timeout: float = 900.0,
    clock: Callable[[], float] = time.monotonic,
) -> DeployResult:
    """Parse, plan, register and follow one job file (`clock`: what the follow's deadline is read on). Unchanged jobs are left alone. A register refused
    because the job changed after our plan (EnforceIndex: an auto-revert, another deployer) is planned
    again, saying what changed, up to REGISTER_ATTEMPTS times."""
    started = time.monotonic()
    job = parse(client, path, variables)
    job_id = str(job["ID"])
    plan = client.plan_job(job)
    shown = _warn(job_id, plan.get("Warnings"))
    diff = plan.get("Diff") or {}
    if diff.get("Type") == "None":
        return _unchanged(client, job_id, timeout, started)

    ui.step(f"deploying job {job_id} from {path.name}: {_plan_summary(plan)}")
    for attempt in range(1, REGISTER_ATTEMPTS + 1):
        modify_index = int(plan.get("JobModifyIndex") or 0)
        try:
            reg = _register(client, job, modify_index)
            break
        except _Conflict as exc:
            changed = _what_changed(client, job_id, modify_index)
            if attempt == REGISTER_ATTEMPTS:
                raise NotRegistered(
                    f"job {job_id} was not registered: it changed in Nomad after each of our "
                    f"{REGISTER_ATTEMPTS} plans ({exc.body}); last: {changed}",
                    hint="someone else is deploying this job (or Nomad is reverting it): let that finish, "
                    f"look at `nomad job history {job_id}`, then deploy again",
                ) from exc
            ui.info(f"    {job_id}: changed in Nomad after our plan ({changed}); planning again")
            plan = client.plan_job(job)
            shown = _warn(job_id, plan.get("Warnings"), shown)
            if (plan.get("Diff") or {}).get("Type") == "None":
                return _unchanged(client, job_id, timeout, started)
    _warn(job_id, reg.get("Warnings"), shown)
    eval_id = str(reg.get("EvalID") or "")
    if detach:
        ui.ok(f"{job_id}: registered (evaluation {eval_id[:8]}); not following it (--detach)")
        return DeployResult(job_id, "registered", eval_id=eval_id, elapsed=time.monotonic() - started)

    deadline = Deadline(timeout, clock=clock)
    ev = follow_evaluation(client, job, eval_id, deadline) if eval_id else {}
    dep_id = str(ev.get("DeploymentID") or "") or _find_deployment(client, job_id, reg)
    if dep_id:
        dep = follow_deployment(client, job, dep_id, deadline)
        version = dep.get("JobVersion")
    else:  # system/batch jobs or jobs without an update block: no deployment, watch the allocations
        version = _wait_allocations_running(client, job, deadline)
    elapsed = time.monotonic() - started
    ui.ok(f"{job_id}: version {version} deployed and healthy ({elapsed:.1f}s)")
    return DeployResult(job_id, "deployed", version, eval_id, dep_id, elapsed)


def _unchanged(client: Client, job_id: str, timeout: float, started: float) -> DeployResult:
    """Identical job already registered: report, but do not hide a running or failed deployment."""
    current = client.job(job_id) or {}
    version = current.get("Version")
    dep = client.job_deployment(job_id).body
    if dep and dep.get("JobVersion") == version:
        status = dep.get("Status")
        if status in ("running", "pending", "initializing", "paused"):
            ui.info(f"{job_id}: unchanged; its deployment {dep['ID'][:8]} is still {status}, following it")
            dep = follow_deployment(client, current, str(dep["ID"]), Deadline(timeout))
        elif status == "failed":
            raise DeployError(
                f"job {job_id} is unchanged (version {version}) but its last deployment failed: "
                f"{dep.get('StatusDescription', '')}",
                details=failure_details(client, current, dep),
                hint=f"fix the job spec and deploy again, or `inv purge {job_id}` and deploy again",
            )
    if current.get("Status") == "pending" and not (dep and dep.get("JobVersion") == version):
        _raise_if_blocked(client, current)
    if current.get("Stop"):
        raise DeployError(
            f"job {job_id} is registered but stopped", hint=f"`inv purge {job_id}`, then deploy"
        )
    ui.skip(f"{job_id}: unchanged (version {version}), nothing to do")
    return DeployResult(job_id, "unchanged", version, elapsed=time.monotonic() - started)


def _raise_if_blocked(client: Client, job: Mapping[str, Any]) -> None:
    """An unchanged job that is still pending: is the scheduler waiting for a node that fits?"""
    evals = client.job_evaluations(str(job["ID"]))
    if not any(e.get("Status") == "blocked" for e in evals):
        return
    failed = [e for e in evals if e.get("FailedTGAllocs")]
    latest = max(failed, key=lambda e: int(e.get("ModifyIndex") or 0)) if failed else {}
    _check_evaluation(job, {**latest, "Status": latest.get("Status", "blocked")})


def _register(client: Client, job: Mapping[str, Any], modify_index: int) -> dict[str, Any]:
    """POST /v1/jobs with EnforceIndex at the plan's JobModifyIndex. When the answer is lost, the job is read
    back: registered (its JobModifyIndex moved) -> carry on; not registered -> send it once more, which
    EnforceIndex makes safe (a second registration would fail "Enforcing job modify index ...",
    nomad/structs/job.go)."""
    job_id = str(job["ID"])
    for attempt in (1, 2):
        try:
            return client.register_job(job, modify_index=modify_index)
        except NomadAnswerLost as exc:
            found = _registered_anyway(client, job_id, modify_index, exc)
            if found is not None:
                return found
            if attempt == 2:
                raise DeployError(
                    f"job {job_id} was not registered: {exc.message}",
                    hint="nothing changed in Nomad; deploy again when it answers",
                ) from exc
            ui.info(f"    {job_id}: the registration did not reach Nomad; sending it once more")
        except NomadAPIError as exc:
            if ENFORCE_INDEX_PREFIX in exc.body:
                raise _Conflict(exc.body) from exc
            raise NotRegistered(
                f"job {job_id}: Nomad refused to register it: {exc.body}", hint=exc.hint
            ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


#: nomad/structs/job.go RegisterEnforceIndexErrPrefix: (*Job).EnforceIndex, checked by nomad/job_endpoint.go
#: (*Job).Register against a snapshot before the raft apply, fails a register whose JobModifyIndex is not
#: the job's ("job exists with conflicting job modify index: M", "job already exists", "job does not
#: exist"): a plain error, so HTTP 500 with that text (command/job_run.go matches the same prefix).
ENFORCE_INDEX_PREFIX = "Enforcing job modify index"


class _Conflict(Exception):
    """The job changed between our plan and our register (EnforceIndex refused it); nothing was written."""

    def __init__(self, body: str) -> None:
        super().__init__(body)
        self.body = printable(body, limit=300)


def _what_changed(client: Client, job_id: str, planned_at: int) -> str:
    """What the job is now, against the JobModifyIndex our plan was made at: its version, image, and the
    latest deployment's description when it says why (an auto-revert: "rolling back to job version N")."""
    try:
        current = client.job(job_id)
        # Not the latest deployment: after an auto-revert that is soon the revert's own; the one that says
        # why is the failed one, changed after our plan.
        deployments = client.job_deployments(job_id)
    except NomadError as exc:
        return f"the job cannot be read back: {exc.message}"
    reverting = [
        d for d in deployments
        if "rolling back" in str(d.get("StatusDescription") or "") and int(d.get("ModifyIndex") or 0) > planned_at
    ]  # fmt: skip
    dep = max(reverting, key=lambda d: int(d.get("CreateIndex") or 0), default={})
    if current is None:
        return f"job {job_id} is no longer registered (our plan was made at JobModifyIndex {planned_at})"
    parts = [
        f"JobModifyIndex {planned_at} -> {current.get('JobModifyIndex')}",
        f"now version {current.get('Version')}",
    ]
    image = live_image(client, job_id)
    if image:
        parts.append(f"image {printable(image, limit=120)}")
    description = str(dep.get("StatusDescription") or "")
    if dep:
        parts.append(f"deployment {str(dep.get('ID', ''))[:8]}: {printable(description, limit=200)}")
    return ", ".join(parts)


def _registered_anyway(
    client: Client, job_id: str, modify_index: int, lost: NomadAnswerLost
) -> dict[str, Any] | None:
    """The register's answer was lost: did Nomad register it? A JobModifyIndex other than the plan's says
    so; its evaluation is the job-register one at that index. None: it did not."""
    try:
        current = client.job(job_id)
    except NomadError as exc:
        raise DeployError(
            f"job {job_id}: the answer to its registration was lost ({lost.message}) and the job cannot be "
            f"read back: {exc.message}",
            hint="look at `nomad job status` and deploy again",
        ) from exc
    index = int((current or {}).get("JobModifyIndex") or 0)
    if current is None or index == modify_index:
        return None
    evals = [
        e
        for e in client.job_evaluations(job_id)
        if int(e.get("JobModifyIndex") or 0) == index and e.get("TriggeredBy") == "job-register"
    ]
    latest = max(evals, key=lambda e: int(e.get("CreateIndex") or 0)) if evals else {}
    ui.info(
        f"    {job_id}: the answer to the registration was lost, but Nomad has it (JobModifyIndex {index})"
    )
    return {"EvalID": latest.get("ID", ""), "JobModifyIndex": index, "Warnings": ""}


def warning_lines(warnings: Any) -> list[str]:
    """Nomad's merged warnings ("2 warnings:\n\n* a\n* b", helper/warning.go) as one line each."""
    lines = []
    for line in str(warnings or "").splitlines():
        line = line.strip()
        if not line or re.fullmatch(r"\d+ warnings?:", line):
            continue
        lines.append(printable(line.removeprefix("* ")))
    return lines


def _warn(job_id: str, warnings: Any, shown: Iterable[str] = ()) -> list[str]:
    """Show each warning once; returns those shown (plan and register carry the same ones)."""
    seen = set(shown)
    out = list(seen)
    for line in warning_lines(warnings):
        if line not in seen:
            ui.warn(f"{job_id}: {rich_escape(line)}")
            seen.add(line)
            out.append(line)
    return out


def _plan_summary(plan: Mapping[str, Any]) -> str:
    diff = plan.get("Diff") or {}
    parts = []
    for tg in diff.get("TaskGroups") or []:
        updates = ", ".join(f"{k} {v}" for k, v in sorted((tg.get("Updates") or {}).items()) if v)
        parts.append(f"{tg.get('Name')} ({updates or tg.get('Type', '').lower()})")
    kind = {"Added": "new job", "Edited": "changed", "Deleted": "removed"}.get(str(diff.get("Type")), "")
    return f"{kind}; " + ", ".join(parts) if parts else kind or "registering"


# ---------------------------------------------------------------------------------------- evaluation --
def follow_evaluation(
    client: Client, job: Mapping[str, Any], eval_id: str, deadline: Deadline
) -> dict[str, Any]:
    """Block until the evaluation is terminal; raise PlacementError when groups could not be placed."""

    def judge(body: Any) -> tuple[bool, str]:
        status = str((body or {}).get("Status", "?"))
        done = status in TERMINAL_EVAL or status == "blocked"
        if done:
            _check_evaluation(job, body)
        return done, f"evaluation {eval_id[:8]} {status}"

    fetch = functools.partial(client.evaluation, eval_id)
    return dict(_follow(fetch, judge, what=f"job {job['ID']}: scheduling", deadline=deadline) or {})


def _check_evaluation(job: Mapping[str, Any], ev: Mapping[str, Any]) -> None:
    """Raise when a terminal evaluation did not place everything (called inside the wait, so the live
    line never reports a failure as "ok")."""
    job_id = str(job["ID"])
    failed = ev.get("FailedTGAllocs") or {}
    if failed:
        raise PlacementError(
            f"job {job_id}: Nomad could not place {len(failed)} task group(s)",
            details=placement_details(job, failed),
            hint=_placement_hint(failed)
            + f"; the job stays registered and is placed when a node fits (`inv purge {job_id}` removes it)",
        )
    if ev.get("Status") != "complete":
        raise DeployError(
            f"job {job_id}: evaluation {str(ev.get('ID', ''))[:8]} {ev.get('Status')}: "
            f"{ev.get('StatusDescription', '')}",
            hint="the servers' log says more (`journalctl -u nomad` in the VM)",
        )


def _group_tasks(job: Mapping[str, Any], group: str) -> list[str]:
    for tg in job.get("TaskGroups") or []:
        if tg.get("Name") == group:
            return [str(t.get("Name")) for t in tg.get("Tasks") or []]
    return []


def placement_details(job: Mapping[str, Any], failed: Mapping[str, Any]) -> list[str]:
    """One line per cause, the way `nomad job status` shows placement failures."""
    lines = []
    job_id = job.get("ID")
    for group, m in sorted(failed.items()):
        m = m or {}
        tasks = ", ".join(_group_tasks(job, group)) or "?"
        unplaced = int(m.get("CoalescedFailures") or 0) + 1
        lines.append(
            f"job {job_id}, group {group} (task {tasks}): {unplaced} allocation(s) not placed; "
            f"nodes evaluated {m.get('NodesEvaluated', 0)}, filtered {m.get('NodesFiltered', 0)}, "
            f"exhausted {m.get('NodesExhausted', 0)}"
        )
        available = m.get("NodesAvailable") or {}
        if available and not any(available.values()):
            lines.append(f"  no nodes available in datacenter(s) {', '.join(sorted(available))}")
        for key, label in (("ConstraintFiltered", "constraint"), ("ClassFiltered", "node class")):
            for what, n in sorted((m.get(key) or {}).items()):
                lines.append(f"  {label} {what!r} filtered {n} node(s)")
        for dim, n in sorted((m.get("DimensionExhausted") or {}).items()):
            lines.append(f"  resources exhausted: {dim} on {n} node(s)")
        for q in m.get("QuotaExhausted") or []:
            lines.append(f"  quota exhausted: {q}")
    return lines


def _placement_hint(failed: Mapping[str, Any]) -> str:
    text = json.dumps(failed)
    if "missing drivers" in text:
        return (
            "the node has no healthy docker driver: `inv nomad.wait` waits for it; "
            "`inv vm.check` shows whether docker runs"
        )
    if "memory" in text or "cpu" in text:
        return "the node lacks CPU/memory: lower the job's resources or raise vm.memory_mb / vm.cpus"
    if "port" in text:
        return "a static port is taken on the node: check vm.ports and other jobs"
    return "compare the job's constraints with the node (`nomad node status -verbose`)"


# ---------------------------------------------------------------------------------------- deployment --
def _find_deployment(client: Client, job_id: str, reg: Mapping[str, Any]) -> str:
    """When the evaluation does not name it: the job's latest deployment, if made for this registration.
    The registration's index is the deployment's JobSpecModifyIndex; its JobModifyIndex is the job's
    ModifyIndex, which any status change moves (nomad/structs/deployment.go NewDeployment)."""
    dep = client.job_deployment(job_id).body
    if dep and int(dep.get("JobSpecModifyIndex") or -1) == int(reg.get("JobModifyIndex") or -2):
        return str(dep["ID"])
    return ""


def _groups_line(dep: Mapping[str, Any]) -> str:
    parts = []
    for name, g in sorted((dep.get("TaskGroups") or {}).items()):
        s = f"{name} {g.get('HealthyAllocs', 0)}/{g.get('DesiredTotal', 0)} healthy"
        if g.get("UnhealthyAllocs"):
            s += f", {g['UnhealthyAllocs']} unhealthy"
        if g.get("DesiredCanaries"):
            promoted = "promoted" if g.get("Promoted") else "not promoted"
            s += f", canaries {len(g.get('PlacedCanaries') or [])}/{g['DesiredCanaries']} {promoted}"
        parts.append(s)
    return "; ".join(parts)


def needs_promotion(dep: Mapping[str, Any]) -> list[str]:
    """The groups to promote now, by name: those whose canaries are all healthy and not promoted yet.

    None while every group with canaries is auto_promote: Nomad promotes those itself, all together
    (nomad/deploymentwatcher/deployment_watcher.go autoPromoteDeployment). Otherwise Nomad never
    auto-promotes, so each group is promoted as soon as its canaries are healthy — named, never
    `All: true`, which fails while any group's canaries are not healthy yet (nomad/state/state_store.go
    UpdateDeploymentPromotion)."""
    if dep.get("Status") != "running":
        return []
    canary = {n: g for n, g in (dep.get("TaskGroups") or {}).items() if int(g.get("DesiredCanaries") or 0)}
    if all(g.get("AutoPromote") for g in canary.values()):
        return []
    return sorted(
        n
        for n, g in canary.items()
        if not g.get("Promoted") and int(g.get("HealthyAllocs") or 0) >= int(g["DesiredCanaries"])
    )


def follow_deployment(
    client: Client, job: Mapping[str, Any], dep_id: str, deadline: Deadline
) -> dict[str, Any]:
    job_id = str(job["ID"])

    def judge(body: Any) -> tuple[bool, str]:
        dep = dict(body or {})
        _promote(client, job_id, dep_id, needs_promotion(dep))
        done = dep.get("Status") in TERMINAL_DEPLOYMENT
        if done:
            _check_deployment(client, job, dep)
        return done, f"deployment {dep_id[:8]} {dep.get('Status', '?')}: {_groups_line(dep)}"

    fetch = functools.partial(client.deployment, dep_id)
    try:
        return dict(_follow(fetch, judge, what=f"job {job_id}: deployment", deadline=deadline) or {})
    except WaitTimeout as exc:
        exc.details.extend(failure_details(client, job, {"ID": dep_id}))
        raise


def _promote(client: Client, job_id: str, dep_id: str, groups: list[str]) -> None:
    if not groups:
        return
    try:
        client.promote_deployment(dep_id, groups)
    except NomadAnswerLost:
        return  # the next read shows whether it was promoted (and promotes again if not)
    ui.info(f"    {job_id}: canaries healthy, promoted {', '.join(groups)} in deployment {dep_id[:8]}")


def _check_deployment(client: Client, job: Mapping[str, Any], dep: Mapping[str, Any]) -> None:
    if dep.get("Status") == "successful":
        return
    job_id = str(job["ID"])
    description = str(dep.get("StatusDescription", "") or "")
    message = f"deployment {str(dep.get('ID', ''))[:8]} of job {job_id} {dep.get('Status')}: {description}"
    revert = re.search(r"rolling back to job version (\d+)", description)
    if revert:
        message += f" (auto_revert: Nomad rolls job {job_id} back to version {revert.group(1)})"
    error = DeployError(
        message,
        details=failure_details(client, job, dep),
        hint="the task events above say why; more in `nomad alloc logs <alloc>` / `nomad alloc status <alloc>`",
    )
    error.deployment = dict(dep)
    raise error


def _wait_allocations_running(client: Client, job: Mapping[str, Any], deadline: Deadline) -> Any:
    job_id = str(job["ID"])

    def judge(body: Any) -> tuple[bool, str]:
        allocs = [a for a in body or [] if a.get("DesiredStatus") == "run"]
        failed = [a for a in allocs if a.get("ClientStatus") in ("failed", "lost")]
        if failed:
            raise DeployError(
                f"job {job_id}: {len(failed)} allocation(s) failed",
                details=_alloc_lines(job_id, failed),
            )
        running = [a for a in allocs if a.get("ClientStatus") == "running"]
        return bool(allocs) and len(running) == len(
            allocs
        ), f"{len(running)}/{len(allocs)} allocations running"

    fetch = functools.partial(client.job_allocations, job_id)
    _follow(fetch, judge, what=f"job {job_id}: allocations", deadline=deadline)
    current = client.job(job_id) or {}
    return current.get("Version")


def failure_details(client: Client, job: Mapping[str, Any], dep: Mapping[str, Any]) -> list[str]:
    """Failing allocations of the deployment's job version, with their recent task events."""
    job_id = str(job["ID"])
    try:
        allocs = list(client.job_allocations(job_id).body or [])
    except NomadAPIError as exc:
        return [f"(could not list allocations of {job_id}: {exc.body})"]
    version = dep.get("JobVersion")
    if version is not None:
        allocs = [a for a in allocs if a.get("JobVersion") == version] or allocs
    bad = [a for a in allocs if _alloc_failing(a)]
    lines = _alloc_lines(job_id, bad or allocs)
    return lines or [f"job {job_id}: no allocations were placed"]


def _alloc_failing(a: Mapping[str, Any]) -> bool:
    if a.get("ClientStatus") in ("failed", "lost"):
        return True
    if (a.get("DeploymentStatus") or {}).get("Healthy") is False:
        return True
    return any(t.get("Failed") for t in (a.get("TaskStates") or {}).values())


def _alloc_lines(job_id: str, allocs: Iterable[Mapping[str, Any]], events: int = 4) -> list[str]:
    lines = []
    for a in allocs:
        group = a.get("TaskGroup", "?")
        alloc = f"alloc {str(a.get('ID', ''))[:8]} {a.get('ClientStatus', '?')}"
        states = a.get("TaskStates") or {}
        if not states:
            lines.append(
                f"job {job_id}, group {group}, task ? ({alloc}): "
                f"{a.get('ClientDescription') or 'no task has started'}"
            )
        for task, ts in sorted(states.items()):
            evs = list(ts.get("Events") or [])
            reasons = [e for e in evs if e.get("Type") in FAILURE_EVENTS] or evs[-1:]
            head = f"job {job_id}, group {group}, task {task} ({alloc}, task {ts.get('State', '?')})"
            if not reasons:
                lines.append(f"{head}: no task events")
            for ev in reasons[-events:]:
                lines.append(f"{head}: {ev.get('Type')}: {event_reason(ev)}")
    return lines


def event_reason(ev: Mapping[str, Any]) -> str:
    """The human reason of a task event (the fields `nomad alloc status` prints)."""
    t = ev.get("Type")
    details = ev.get("Details") or {}
    for key in (
        "DriverError",
        "SetupError",
        "ValidationError",
        "DownloadError",
        "KillError",
        "TaskSignalReason",
    ):
        if ev.get(key):
            return str(ev[key])
    if t == "Terminated":
        code = ev.get("ExitCode", details.get("exit_code", "?"))
        text = f"exit code {code}"
        if ev.get("Signal") or details.get("signal"):
            text += f", signal {ev.get('Signal') or details.get('signal')}"
        msg = ev.get("Message") or ("OOM Killed" if details.get("oom_killed") == "true" else "")
        return f"{text}: {msg}" if msg else text
    for key in ("RestartReason", "KillReason", "FailedSibling"):
        if ev.get(key):
            return f"sibling task {ev[key]} failed" if key == "FailedSibling" else str(ev[key])
    return str(ev.get("DisplayMessage") or ev.get("Message") or ev.get("DriverMessage") or "(no message)")


# ------------------------------------------------------------------------------------------ variables --
def ensure_secret(
    client: Client,
    path: str,
    key: str,
    *,
    generate: Callable[[], str] = lambda: secrets.token_urlsafe(24),
    value: str | None = None,
    keyring_wait: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Make sure the Nomad Variable `path` has `key` and return its value (never printed).

    Missing: set it to `value`, or a fresh random one. With `value` given, an existing different value
    is replaced (used to keep copies in step). Check-and-set: cas=0 creates only, an update applies only
    at the ModifyIndex read, so two concurrent runs never overwrite each other (the loser re-reads).

    Right after a cluster bootstraps, a write can answer 500 "keyring has not been initialized yet"
    (nomad/encrypter.go): retried for up to `keyring_wait` seconds. A write whose answer was lost is not
    resent: the next read shows whether it landed (check-and-set keeps a resend from doing harm anyway).
    """
    conflicts = 0
    keyring_deadline = time.monotonic() + keyring_wait
    pause = 0.5
    while conflicts < 3:
        var = client.var_get(path)
        items = dict((var or {}).get("Items") or {})
        current = items.get(key)
        if current and (value is None or current == value):
            return str(current)
        items[key] = value if value is not None else generate()
        cas = int(var["ModifyIndex"]) if var else 0
        try:
            client.var_put(path, items, cas=cas)
        except NomadConflict:
            conflicts += 1
            continue  # someone else wrote it in between (or our lost write landed): look again
        except NomadAnswerLost:
            conflicts += 1
            continue  # did it land? the next read says
        except NomadAPIError as exc:
            if "keyring has not been initialized" in exc.body and time.monotonic() < keyring_deadline:
                ui.debug(f"Nomad's keyring is not ready yet; writing {path} again in {pause:.1f}s")
                sleep(pause)
                pause = min(pause * 2, 4.0)
                continue
            raise DeployError(f"cannot write Nomad Variable {path}: {exc.body}", hint=exc.hint) from exc
        ui.ok(f"{'updated' if current else 'created'} {key} in Nomad Variable {path}")
        return str(items[key])
    raise DeployError(f"Nomad Variable {path} keeps changing under us (check-and-set lost 3 times)")


# ---------------------------------------------------------------------------------------------- purge --
def purge(client: Client, jobs: Iterable[str], *, timeout: float = 300.0) -> list[str]:
    """Stop and purge each job, then wait until none of its allocations is still running. Idempotent."""
    purged = []
    for job_id in jobs:
        if client.job(job_id) is None:
            ui.skip(f"{job_id}: not registered")
            continue
        try:
            client.stop_job(job_id, purge=True)
        except NomadNotFound:
            ui.skip(f"{job_id}: not registered")
            continue
        except NomadAnswerLost:
            if client.job(job_id) is not None:  # the DELETE did not land: say so (not resent blindly)
                raise
        purged.append(job_id)
        wait_allocations_gone(client, job_id, timeout=timeout)
    return purged


def wait_allocations_gone(client: Client, job_id: str, *, timeout: float) -> None:

    def fetch(**blocking: Any) -> Result:
        try:
            return client.job_allocations(job_id, **blocking)
        except NomadNotFound:  # the job and its allocations are gone
            return Result([], 0)

    def judge(body: Any) -> tuple[bool, str]:
        live = [a for a in body or [] if a.get("ClientStatus") not in TERMINAL_ALLOC]
        return not live, f"{len(live)} allocation(s) still running"

    _follow(
        fetch,
        judge,
        what=f"job {job_id}: purged, allocations stopped",
        deadline=Deadline(timeout),
        hint="an allocation that does not stop usually has a task ignoring SIGTERM: `nomad alloc status`",
    )


# ------------------------------------------------------------------------------------------ status --
@dataclass(frozen=True)
class JobSummary:
    job_id: str
    status: str  # Nomad's job Status (pending/running/dead) or "not registered"
    version: int | None
    deployment: str
    healthy: int
    desired: int
    running: int
    image: str = ""  # the main task's image as registered (`main_image`)


def job_summary(client: Client, job_id: str) -> JobSummary:
    job = client.job(job_id)
    if job is None:
        return JobSummary(job_id, "not registered", None, "", 0, 0, 0)
    dep = client.job_deployment(job_id).body or {}
    groups = (dep.get("TaskGroups") or {}).values()
    allocs = client.job_allocations(job_id).body or []
    running = sum(1 for a in allocs if a.get("ClientStatus") == "running")
    desired = sum(int(tg.get("Count") or 0) for tg in job.get("TaskGroups") or [])
    return JobSummary(
        job_id,
        str(job.get("Status", "?")) + (" (stopped)" if job.get("Stop") else ""),
        job.get("Version"),
        str(dep.get("Status", "none")),
        sum(int(g.get("HealthyAllocs") or 0) for g in groups),
        desired,
        running,
        main_image(job),
    )


def live_image(client: Client, job_id: str, task: str = "") -> str:
    """The image of the job's main task as registered now (prestart/sidecar tasks are skipped)."""
    return main_image(client.job(job_id) or {}, task)


def main_image(job: Mapping[str, Any], task: str = "") -> str:
    """The image of a job's main task (prestart/sidecar tasks are skipped), "" when it names none."""
    for group in job.get("TaskGroups") or []:
        for t in group.get("Tasks") or []:
            if (t.get("Lifecycle") or {}).get("Hook") or (task and t.get("Name") != task):
                continue
            img = (t.get("Config") or {}).get("image")
            if img:
                return str(img)
    return ""


# ------------------------------------------------------------------------------------------ helpers --
def _block(deadline: Deadline) -> float:
    return max(0.1, min(BLOCK_SECONDS, deadline.remaining()))


def _follow(
    fetch: Callable[..., Result],
    judge: Callable[[Any], tuple[bool, str]],
    *,
    what: str,
    deadline: Deadline,
    hint: str = "raise deploy.timeout, or look at the task events with `nomad job status`",
) -> Any:
    """Read one endpoint as blocking queries until `judge(body)` says done (or raises); returns that body.
    Each read passes the index of the last answer (none the first time), so Nomad holds it until something
    changes; `judge` returns (done, the state for the live line).

    An index lower than the last one (a server restarted on older state, a snapshot restore, a new
    cluster) starts over with a read that does not block: Nomad holds a query while the table's index is
    <= the one passed (nomad/rpc.go blockingRPC: `queryMeta.Index <= MinQueryIndex` -> ws.WatchCtx until
    MaxQueryTime; a restore only re-runs the query), so keeping the old index would make every read wait
    out its whole `wait`. The reset is what the blocking-query guidance says ("Reset the index if it goes
    backwards", the Consul/Nomad API docs' implementation details) and what infra/nomad/cluster.py does."""
    index = 0

    def probe(d: Deadline) -> Probe[Any]:
        nonlocal index
        res = fetch(index=index or None, wait=_block(deadline))
        if res.index < index:
            ui.debug(f"{what}: X-Nomad-Index went back from {index} to {res.index}; reading afresh")
            index = 0
        else:
            index = res.index
        done, state = judge(res.body)
        return Probe(done, state, res.body)

    return wait_until(
        probe, what=what, timeout=max(0.1, deadline.remaining()), interval=0, hint=hint, clock=deadline.clock
    ).value


# ------------------------------------------------------------------------------------------- logs --
def task_logs(
    client: Client, job_id: str, *, task: str | None = None, stderr: bool = False, follow: bool = False
) -> Iterator[bytes]:
    """A task's stdout (or stderr) in the job's newest allocation, as Nomad streams it (`inv logs`).
    Without `task`: the allocation's only task, or its only main task (not a lifecycle hook)."""
    job = client.job(job_id)
    if job is None:
        raise DeployError(f"job {job_id} is not registered", hint="`inv status` lists the project's jobs")
    allocs = list(client.job_allocations(job_id).body or [])
    if not allocs:
        raise DeployError(f"job {job_id} has no allocations yet", hint="`inv status` shows its deployment")
    alloc = max(allocs, key=lambda a: int(a.get("CreateIndex") or 0))
    group: dict[str, Any] = next(
        (g for g in job.get("TaskGroups") or [] if g.get("Name") == alloc.get("TaskGroup")), {}
    )
    names = [str(t.get("Name")) for t in group.get("Tasks") or []] or sorted(alloc.get("TaskStates") or {})
    if task is None:
        main = [str(t.get("Name")) for t in group.get("Tasks") or [] if not t.get("Lifecycle")]
        if len(names) == 1 or len(main) == 1:
            task = names[0] if len(names) == 1 else main[0]
        else:
            raise DeployError(
                f"job {job_id}'s allocation {str(alloc.get('ID', ''))[:8]} runs tasks {', '.join(names)}: "
                "name one with --task"
            )
    elif names and task not in names:
        raise DeployError(
            f"job {job_id} has no task {task!r} in group {alloc.get('TaskGroup')}; its tasks: {', '.join(names)}"
        )
    ui.debug(f"logs of job {job_id}, allocation {str(alloc.get('ID', ''))[:8]}, task {task}")
    try:
        yield from client.logs(str(alloc["ID"]), task, stderr=stderr, follow=follow)
    except NomadAPIError as exc:
        raise DeployError(
            f"job {job_id}, task {task} (allocation {str(alloc.get('ID', ''))[:8]}): no logs: {exc.body}",
            hint=exc.hint,
        ) from exc

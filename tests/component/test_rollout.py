"""infra/nomad/rollout.py against the STATEFUL Nomad API double: parse -> plan -> register -> evaluation ->
deployment, and the ways it fails. Each failure message must name the job, group, task and reason.

The job files here are small fixtures in the HCL subset the double reads (see its docstring); the real
specs in nomad/ go through the separate replay server (test_replay.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.doubles.nomad_api import NomadAPIDouble, Timing
from support.jobs import web_job

from infra.compose import release
from infra.core.errors import DeployError, WaitTimeout
from infra.core.waits import Deadline
from infra.nomad import rollout
from infra.nomad.client import Client, Settings


@pytest.fixture
def client(double: NomadAPIDouble) -> Client:
    return Client(Settings(addr=double.url, retries=0, read_timeout=120))  # generous: ends only a hang


@pytest.fixture
def job_file(tmp_path: Path) -> Callable[..., Path]:
    def make(canary: int = 0, auto_promote: bool = False, memory: int = 128) -> Path:
        path = tmp_path / "web.nomad.hcl"
        path.write_text(web_job(count=2, canary=canary, auto_promote=auto_promote, memory=memory, ports=True))
        return path

    return make


def test_new_job_is_parsed_with_variables_registered_and_followed(
    double: NomadAPIDouble, client: Client, job_file: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # The allocations turn healthy only when the client blocks on the deployment (a read with an index):
    # on a busy machine the double's timers could otherwise finish the deployment before the client's first
    # read, and a follower that finds it complete has no reason to block (seen: this test failed under load).
    double.health_delay["server"] = float("inf")
    double.before_next.append((r"^GET /v1/deployment/[0-9a-f-]+\?.*\bindex=", double.release_health))
    result = rollout.deploy_job(client, job_file(), variables={"image": "web:2"}, timeout=120)
    assert (result.job_id, result.outcome, result.version) == ("web", "deployed", 0)
    assert not double.before_next, "the client never blocked on the deployment"
    parse = double.parse_calls[-1]
    assert parse["Canonicalize"] is True and parse["Variables"] == 'image = "web:2"\n'
    job = double.jobs["web"]
    assert job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "web:2"
    assert job["Status"] == "running" and job["Stable"] is True
    assert double.count("/v1/job/web/plan", "POST") == 1 and double.count("^/v1/jobs$", "POST") == 1
    # following = blocking queries on the evaluation and the deployment
    blocking = [r for r in double.requests if r.path.startswith(("/v1/evaluation/", "/v1/deployment/"))]
    assert any("index" in r.query and "wait" in r.query for r in blocking)
    err = capsys.readouterr().err
    assert "deploying job web from web.nomad.hcl: new job; frontend (create 2)" in err
    assert "web: version 0 deployed and healthy" in err


def test_unchanged_redeploy_is_a_noop_that_says_so(
    double: NomadAPIDouble, client: Client, job_file: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = job_file()
    rollout.deploy_job(client, path, timeout=120)
    registers = double.count("^/v1/jobs$", "POST")
    result = rollout.deploy_job(client, path, timeout=120)
    assert result.outcome == "unchanged" and result.version == 0
    assert double.count("^/v1/jobs$", "POST") == registers  # nothing registered the second time
    assert "web: unchanged (version 0), nothing to do" in capsys.readouterr().err


def test_register_uses_check_and_set_from_the_plan(
    double: NomadAPIDouble, client: Client, job_file: Any
) -> None:
    path = job_file()
    rollout.deploy_job(client, path, timeout=120)
    job = rollout.parse(client, path, {"image": "web:3"})
    client.register_job(job)  # someone else changes the job between our plan and our register
    stale_index = 0  # what a plan made before the first registration would have said
    with pytest.raises(Exception, match="Enforcing job modify index 0"):
        client.register_job(job, modify_index=stale_index)


def test_placement_failure_missing_docker_driver_exits_2_naming_job_group_task(
    double: NomadAPIDouble, client: Client, job_file: Any
) -> None:
    double.set_docker("unhealthy")
    with pytest.raises(rollout.PlacementError) as info:
        rollout.deploy_job(client, job_file(), timeout=120)
    err = info.value
    text = str(err)
    assert err.exit_code == 2
    assert "job web: Nomad could not place 1 task group(s)" in text
    assert "job web, group frontend (task server): 2 allocation(s) not placed" in text
    assert "constraint 'missing drivers' filtered 1 node(s)" in text
    assert "inv nomad.wait" in text  # the hint says what to do


def test_placement_failure_memory_exhausted(double: NomadAPIDouble, client: Client, job_file: Any) -> None:
    with pytest.raises(rollout.PlacementError) as info:
        rollout.deploy_job(client, job_file(memory=4096), timeout=120)
    text = str(info.value)
    assert "job web, group frontend (task server)" in text
    assert "resources exhausted: memory on 1 node(s)" in text
    assert "vm.memory_mb" in text


def test_task_failing_to_start_driver_failure(double: NomadAPIDouble, client: Client, job_file: Any) -> None:
    double.behaviour["web:404"] = "driver-failure"
    with pytest.raises(DeployError) as info:
        rollout.deploy_job(client, job_file(), variables={"image": "web:404"}, timeout=120)
    text = str(info.value)
    assert info.value.exit_code == 1
    assert re.search(r"deployment \w{8} of job web failed: Failed due to unhealthy allocations", text)
    assert re.search(
        r"job web, group frontend, task server \(alloc \w{8} failed, task dead\): Driver Failure: "
        r"Failed to pull `web:404`: .*manifest unknown",
        text,
    )
    assert "Not Restarting: Error was unrecoverable" in text


def test_deployment_failed_with_auto_revert(double: NomadAPIDouble, client: Client, job_file: Any) -> None:
    path = job_file()
    rollout.deploy_job(client, path, variables={"image": "web:1"}, timeout=120)
    double.behaviour["web:broken"] = "exit-1"
    with pytest.raises(DeployError) as info:
        rollout.deploy_job(client, path, variables={"image": "web:broken"}, timeout=120)
    text = str(info.value)
    assert "rolling back to job version 0" in text
    assert "auto_revert: Nomad rolls job web back to version 0" in text
    assert re.search(
        r"job web, group frontend, task server \(alloc \w{8} failed.*\): Terminated: exit code 1", text
    )
    assert 'Not Restarting: Exceeded allowed attempts 2 in interval 30m0s and mode is "fail"' in text
    # the double re-registered version 0's spec as version 2; following it shows the revert succeeded
    res = client.job_deployment("web")
    for _ in range(10):  # the rollback's deployment appears a moment later: block until it does
        if res.body["JobVersion"] == 2:
            break
        res = client.job_deployment("web", index=res.index, wait=5)
    dep = res.body
    assert dep["JobVersion"] == 2
    rollout.follow_deployment(client, double.jobs["web"], dep["ID"], Deadline(120))
    assert double.jobs["web"]["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "web:1"


def test_canary_success_with_promotion(double: NomadAPIDouble, client: Client, job_file: Any) -> None:
    path = job_file(canary=1)
    first = rollout.deploy_job(client, path, variables={"image": "web:1"}, timeout=120)
    assert first.version == 0 and double.count("/v1/deployment/promote/") == 0  # no canaries on a new job
    second = rollout.deploy_job(client, path, variables={"image": "web:2"}, timeout=120)
    assert second.outcome == "deployed" and second.version == 1
    assert double.count("/v1/deployment/promote/", "POST") == 1
    dep = double.deployments[second.deployment_id]
    assert dep["Status"] == "successful" and dep["TaskGroups"]["frontend"]["Promoted"] is True
    running = [
        a for a in double.allocs.values() if a["ClientStatus"] == "running" and a["DesiredStatus"] == "run"
    ]
    assert {a["JobVersion"] for a in running} == {1} and len(running) == 2


def test_canary_with_auto_promote_is_not_promoted_by_us(
    double: NomadAPIDouble, client: Client, job_file: Any
) -> None:
    path = job_file(canary=1, auto_promote=True)
    rollout.deploy_job(client, path, variables={"image": "web:1"}, timeout=120)
    result = rollout.deploy_job(client, path, variables={"image": "web:2"}, timeout=120)
    assert result.outcome == "deployed"
    assert double.count("/v1/deployment/promote/") == 0


def test_detach_registers_and_returns(double: NomadAPIDouble, client: Client, job_file: Any) -> None:
    result = rollout.deploy_job(client, job_file(), detach=True, timeout=120)
    assert result.outcome == "registered" and result.eval_id
    assert "web" in double.jobs
    assert double.count("/v1/evaluation/") == 0 and double.count("/v1/deployment/") == 0


def test_deploy_timeout_carries_the_allocation_state(client: Client, job_file: Any) -> None:
    """The deadline is a clock the test turns: it runs out only once the deploy is following the deployment
    and every allocation's task has started (and none is healthy yet: 30 s to health), whatever the load."""
    with NomadAPIDouble(timing=Timing(alloc_healthy=30)).ready_now() as slow:
        c = Client(Settings(addr=slow.url, retries=0))

        def clock() -> float:
            with slow.cond:
                allocs = [a for a in slow.allocs.values() if a["JobID"] == "web"]
                started = len(allocs) == 2 and all(
                    any(e["Type"] == "Started" for ts in a["TaskStates"].values() for e in ts["Events"])
                    for a in allocs
                )  # fmt: skip
            return 1e9 if started and slow.count("^/v1/deployment/", "GET") else 0.0

        with pytest.raises(WaitTimeout) as info:
            rollout.deploy_job(c, job_file(), timeout=1, clock=clock)
    text = str(info.value)
    assert "waiting for job web: deployment" in text
    assert "last state: deployment" in text and "frontend 0/2 healthy" in text
    assert re.search(
        r"job web, group frontend, task server \(alloc \w{8} running, task running\): Started", text
    )


def test_parse_error_names_the_file(double: NomadAPIDouble, client: Client, tmp_path: Path) -> None:
    bad = tmp_path / "bad.nomad.hcl"
    bad.write_text('job "x" {\n  group "g" {\n    count = oops(1)\n  }\n}\n')
    with pytest.raises(DeployError) as info:
        rollout.deploy_job(client, bad, timeout=120)
    # command/agent/job_endpoint.go: 400 "Failed to parse job: input.hcl:..."; the path is put back
    assert f"{bad}: Nomad could not parse the job: Failed to parse job: {bad}:3," in str(info.value)
    assert 'There is no function named "oops"' in str(info.value)


def test_missing_job_file(client: Client, tmp_path: Path) -> None:
    with pytest.raises(DeployError, match=f"job file not found: {tmp_path}/none.nomad.hcl"):
        rollout.deploy_job(client, tmp_path / "none.nomad.hcl")


def test_undeclared_variable_is_warned_about_not_dropped_silently(
    double: NomadAPIDouble, client: Client, job_file: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """/v1/jobs/parse is not Strict: Nomad drops a value for an undeclared variable with a warning it never
    returns (jobspec2/types.variables.go; command/agent/job_endpoint.go) — the double does the same."""
    path = job_file()
    result = rollout.deploy_job(client, path, variables={"imgae": "web:typo"}, timeout=120)
    assert result.outcome == "deployed"
    assert double.jobs["web"]["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "web:1"  # the default
    assert double.parse_warnings[-1] and "imgae" in double.parse_warnings[-1][0]
    err = capsys.readouterr().err
    assert f"{path}: variable 'imgae' is not declared in the job file; Nomad ignores the value given" in err


def test_hcl_variables_are_quoted_and_escaped() -> None:
    text = rollout.hcl_variables({"image": 'a"b', "tpl": "${x} %{y}"})
    assert text == 'image = "a\\"b"\ntpl = "$${x} %%{y}"\n'
    with pytest.raises(DeployError, match="invalid HCL variable name"):
        rollout.hcl_variables({"bad name": "x"})


# ---------------------------------------------------------------------------------------------- purge --
def test_purge_waits_until_allocations_are_gone(
    double: NomadAPIDouble, client: Client, job_file: Any
) -> None:
    rollout.deploy_job(client, job_file(), timeout=120)
    # The allocations stop only when the purge asks again after its first look (a blocking query), however
    # fast or slow the machine: without that hold a loaded machine let them stop before the first look.
    double.timing.alloc_stop = float("inf")
    looks = double.count("^/v1/job/web/allocations$")
    double.on_request("^/v1/job/web/allocations$", looks + 2, double.release_stops)
    assert rollout.purge(client, ["web", "never-deployed"], timeout=120) == ["web"]
    assert "web" not in double.jobs
    allocs = [a for a in double.allocs.values() if a["JobID"] == "web"]
    assert allocs and all(a["ClientStatus"] == "complete" for a in allocs)
    assert double.count("^/v1/job/web$", "DELETE") == 1
    assert any(r.path == "/v1/job/web/allocations" and "index" in r.query for r in double.requests)
    # a second purge is a no-op
    assert rollout.purge(client, ["web"], timeout=120) == []
    assert double.count("^/v1/job/web$", "DELETE") == 1


def test_purge_when_allocations_are_garbage_collected(job_file: Any) -> None:
    with NomadAPIDouble(timing=Timing(gc_after=0.05)).ready_now() as d:
        c = Client(Settings(addr=d.url, retries=0))
        rollout.deploy_job(c, job_file(), timeout=120)
        assert rollout.purge(c, ["web"], timeout=120) == ["web"]
        assert not any(a["ClientStatus"] in ("pending", "running") for a in d.allocs.values())


# ------------------------------------------------------------------------------------------ variables --
def test_postgres_password_created_once_shared_with_the_app_never_printed(
    double: NomadAPIDouble, client: Client, make_cfg: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_cfg()
    release.ensure_postgres_password(cfg, client)
    data = double.vars["nomad/jobs/datastorage"]
    password = data["Items"]["postgres_password"]
    assert len(password) >= 24
    assert double.vars["nomad/jobs/app"]["Items"]["postgres_password"] == password
    index = data["ModifyIndex"]
    release.ensure_postgres_password(cfg, client)  # idempotent
    assert double.vars["nomad/jobs/datastorage"]["ModifyIndex"] == index
    out = capsys.readouterr()
    assert password not in out.err + out.out
    puts = [r for r in double.requests if r.method == "PUT"]
    assert [r.query.get("cas") for r in puts] == ["0", "0"]  # create-only


def test_secret_added_to_an_existing_variable_with_check_and_set(
    double: NomadAPIDouble, client: Client
) -> None:
    client.var_put("nomad/jobs/datastorage", {"other": "kept"})
    index = double.vars["nomad/jobs/datastorage"]["ModifyIndex"]
    calls = iter(["first-try", "second-try"])

    def generate() -> str:
        value = next(calls)
        if value == "first-try":  # a concurrent writer gets in between our read and our write
            client.var_put("nomad/jobs/datastorage", {"other": "changed"})
        return value

    value = rollout.ensure_secret(client, "nomad/jobs/datastorage", "postgres_password", generate=generate)
    assert value == "second-try"
    items = double.vars["nomad/jobs/datastorage"]["Items"]
    assert items == {"other": "changed", "postgres_password": "second-try"}
    assert double.vars["nomad/jobs/datastorage"]["ModifyIndex"] > index
    assert [r.status for r in double.requests if r.method == "PUT" and r.query.get("cas")] == [409, 200]


# ------------------------------------------------------------------------------------- tasks (inv) --
def test_inv_deploy_exit_codes_and_messages(double: NomadAPIDouble, job_file: Any, run_inv: Any) -> None:
    env = {
        "NOMAD_ADDR": double.url,
        "INVOKE_DEPLOY_INGRESS_JOB": str(job_file()),
        "NOMAD_TOKEN": "",
        "NOMAD_CACERT": "",
    }
    ok = run_inv("deploy.ingress", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "web: version 0 deployed and healthy" in ok.stderr
    again = run_inv("deploy.ingress", env=env)
    assert again.returncode == 0 and "web: unchanged (version 0), nothing to do" in again.stderr

    double.set_docker("unhealthy")
    Path(env["INVOKE_DEPLOY_INGRESS_JOB"]).write_text(
        web_job(count=2, canary=0, auto_promote=False, memory=129, ports=True)
    )
    placement = run_inv("deploy.ingress", env=env)
    assert placement.returncode == 2, placement.stderr
    assert "constraint 'missing drivers' filtered 1 node(s)" in placement.stderr

    # still unplaced: a re-run says so instead of "unchanged"
    blocked = run_inv("deploy.ingress", env=env)
    assert blocked.returncode == 2 and "constraint 'missing drivers'" in blocked.stderr, blocked.stderr

    purge = run_inv("purge", "-j", "web", env=env)
    assert purge.returncode == 0, purge.stderr
    assert "web" not in double.jobs

    # a task that exits 1 on a fresh job (no earlier version to revert to, so nothing races the deploy)
    double.set_docker("healthy")
    double.behaviour["server"] = "exit-1"
    failed = run_inv("deploy.ingress", env=env)
    assert failed.returncode == 1, failed.stderr
    assert re.search(
        r"job web, group frontend, task server \(alloc \w{8} failed.*Terminated: exit code 1", failed.stderr
    )


def test_status_lists_jobs(double: NomadAPIDouble, client: Client, job_file: Any, make_cfg: Any) -> None:
    from infra.compose import stack

    path = job_file()
    rollout.deploy_job(client, path, timeout=120)
    cfg = make_cfg(deploy={"app_job": str(path)})
    report = stack.status(cfg, client=client, vm_info={"running": False})
    assert report["nomad"]["reachable"] and report["nomad"]["ready"]
    web = next(j for j in report["jobs"] if j["job_id"] == "web")
    assert (web["status"], web["healthy"], web["desired"], web["deployment"]) == (
        "running",
        2,
        2,
        "successful",
    )
    assert json.loads(json.dumps(report))["jobs"][0]["job_id"]  # JSON-friendly for `inv status --json`


# ------------------------------------------------------------------------------------ the whole stack --
def test_up_twice_deploys_the_real_job_specs_then_changes_nothing(
    double: NomadAPIDouble, client: Client, make_cfg: Any, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """`inv up`'s sequence with the VM steps recorded (they boot a real VM in the vm tier) and the Nomad
    steps real against the double, deploying the real nomad/*.nomad.hcl (the double reads them)."""
    import contextlib

    from infra.compose import appimage, stack
    from infra.guest import seed
    from infra.vm import lifecycle, verbs

    calls: list[str] = []
    made = seed.SeedResult(Path("seed.iso"), "0" * 64, "iid-test", changed=True, baked=False)

    def fake_seed(cfg: Any, ssh_key: str | None = None, baked: bool = False) -> seed.SeedResult:
        calls.append("iso")
        return made

    def fake_run(prepared: Any, iso: seed.SeedResult) -> None:
        assert iso is made  # vm.run boots the seed `up` made: it does not make one again
        calls.append("vm.run")

    monkeypatch.setattr(seed, "write_iso", fake_seed)
    monkeypatch.setattr(lifecycle, "boots_baked", lambda cfg: False)
    monkeypatch.setattr(
        lifecycle, "preparing", lambda cfg, baked=None: contextlib.nullcontext(SimpleNamespace(baked=baked))
    )
    monkeypatch.setattr(lifecycle, "boot", fake_run)
    monkeypatch.setattr(verbs, "check_once", lambda cfg: calls.append("vm.check"))
    # The image build runs for real in tests/component/test_appimage.py; here it is recorded.
    monkeypatch.setattr(appimage, "_vm_engine", lambda cfg: contextlib.nullcontext("vm-engine"))

    def fake_build(cfg: Any, target: Any, builder: Any = None) -> appimage.BuildResult:
        calls.append(f"build in {target}")
        return appimage.BuildResult("infra-lab/app:0123456789ab", "0123456789ab", True, 0.0)

    monkeypatch.setattr(appimage, "build", fake_build)
    cfg = make_cfg()
    result = stack.up(cfg, client=client)
    assert (result.seed, result.live) == (made, "infra-lab/app:0123456789ab")  # what `inv up` prints
    # First run: nothing deployed yet, so the app is built from app/ (in the VM) and that image shipped.
    assert calls == ["iso", "vm.run", "vm.check", "build in vm-engine"]
    app_task = next(t for t in double.jobs["app"]["TaskGroups"][0]["Tasks"] if t["Name"] == "app")
    assert app_task["Config"]["image"] == "infra-lab/app:0123456789ab"
    assert set(double.jobs) == {"datastorage", "app", "ingress"}
    assert all(j["Status"] == "running" and j["Stable"] for j in double.jobs.values())
    assert double.vars["nomad/jobs/app"]["Items"] == double.vars["nomad/jobs/datastorage"]["Items"]
    registers = double.count("^/v1/jobs$", "POST")
    assert registers == 3
    capsys.readouterr()

    stack.up(cfg, client=client)  # the second run: every step satisfied, nothing registered or built
    assert double.count("^/v1/jobs$", "POST") == registers
    assert calls.count("build in vm-engine") == 1
    err = capsys.readouterr().err
    for job in ("datastorage", "app", "ingress"):
        assert f"{job}: unchanged (version 0), nothing to do" in err

    monkeypatch.setattr(lifecycle, "stop", lambda cfg: calls.append("vm.stop"))
    stack.down(cfg, client=client)
    assert double.jobs == {} and calls[-1] == "vm.stop"
    assert all(a["ClientStatus"] == "complete" for a in double.allocs.values())


def test_status_and_the_no_op_deploy_name_the_app_image_live(
    double: NomadAPIDouble, client: Client, make_cfg: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`inv deploy.app --image REF`, then what `inv up` and `inv status` say: the no-op line names REF
    (it once printed `--   is already live`), and status shows it (`--json`: app_image and each job's image)."""
    from infra.compose import stack

    cfg = make_cfg()
    release.ship(cfg, client, image="registry.example/app:1")
    capsys.readouterr()
    shipped = stack.deploy_all(cfg, client)  # `inv up`'s deploy steps
    assert shipped.outcome == "unchanged" and shipped.image == "registry.example/app:1"
    assert "-- registry.example/app:1 is already live (job app version 0)" in " ".join(
        capsys.readouterr().err.split()
    )
    report = stack.status(cfg, client=client, vm_info={"running": False})
    assert report["app_image"] == "registry.example/app:1"
    app = next(j for j in report["jobs"] if j["job_id"] == "app")
    assert app["image"] == "registry.example/app:1"
    assert json.loads(json.dumps(report, default=str))["app_image"] == "registry.example/app:1"
    assert "image registry.example/app:1" in capsys.readouterr().err


def test_deploy_app_reuses_the_last_image_so_up_does_not_roll_it_back(
    double: NomadAPIDouble, client: Client, make_cfg: Any
) -> None:
    cfg = make_cfg()
    built = release.deploy_app(cfg, client, image="infra-lab/app:abc123")
    assert built.outcome == "deployed"
    again = release.deploy_app(cfg, client)  # what `inv up` calls: no image given
    assert again.outcome == "unchanged"
    task = next(t for t in double.jobs["app"]["TaskGroups"][0]["Tasks"] if t["Name"] == "app")
    assert task["Config"]["image"] == "infra-lab/app:abc123"

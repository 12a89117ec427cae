"""What real Nomad does that the client and the deploy flow must survive, against the double
(which follows Nomad's source; each behaviour there cites its file). One test per item; each failed before
its fix.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from support.doubles.nomad_api import NomadAPIDouble, Timing, gc_from_agent_config
from support.nomad_client import DEPLOY_CAPS, client_for

from infra import ROOT
from infra.compose import release
from infra.core.errors import DeployError
from infra.nomad import cluster, rollout
from infra.nomad.client import NomadAPIError, NomadUnreachable


# ---------------------------------------------------------------------- 8: writes and lost answers --
def test_register_whose_answer_is_lost_is_not_resent_and_is_found_by_rereading(
    doubles: Any, web: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    d = doubles()
    d.drop_answer.append("^POST /v1/jobs$")  # Nomad registers the job; the answer never arrives
    c = client_for(d, retries=3)
    result = rollout.deploy_job(c, web(), timeout=120)
    assert result.outcome == "deployed" and result.version == 0
    assert d.count("^/v1/jobs$", "POST") == 1  # not resent (a resend fails: "Enforcing job modify index")
    assert "the answer to the registration was lost, but Nomad has it" in capsys.readouterr().err


def test_register_that_never_reached_nomad_is_sent_once_more_under_enforce_index(
    doubles: Any, web: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    d = doubles()
    d.drop_request.append("^POST /v1/jobs$")  # cut before Nomad applied anything
    result = rollout.deploy_job(client_for(d, retries=3), web(), timeout=120)
    assert result.outcome == "deployed" and result.version == 0
    assert d.count("^/v1/jobs$", "POST") == 2 and len(d.versions["web"]) == 1
    assert "the registration did not reach Nomad; sending it once more" in capsys.readouterr().err


def test_register_lost_before_nomad_applied_it_says_so(doubles: Any, web: Any) -> None:
    d = doubles()
    d.drop_answer.append("^POST /v1/job/web/plan$")  # a POST: not resent, whatever it does
    with pytest.raises(NomadUnreachable, match="dropped POST /v1/job/web/plan before answering"):
        rollout.deploy_job(client_for(d, retries=3), web(), timeout=120)
    assert d.count("/v1/job/web/plan", "POST") == 1 and "web" not in d.jobs


def test_reads_are_retried_after_a_lost_answer(doubles: Any) -> None:
    d = doubles()
    d.drop_answer.append("^GET /v1/status/leader$")
    assert client_for(d, retries=2).leader() == "10.0.2.15:4647"
    assert d.count("/v1/status/leader") == 2


# --------------------------------------------------------------- 9: deployment of this registration --
def test_find_deployment_matches_the_registration_by_job_spec_modify_index(doubles: Any, web: Any) -> None:
    d = doubles(timing=Timing(evaluate=0.4))
    c = client_for(d)
    job = rollout.parse(c, web())
    reg = c.register_job(job, modify_index=0)
    d.set_job_status("web", "pending")  # a status change moves ModifyIndex before the scheduler runs
    res = c.job_deployment("web")
    while res.body is None:
        res = c.job_deployment("web", index=res.index, wait=5)
    dep = res.body
    assert dep["JobSpecModifyIndex"] == reg["JobModifyIndex"] != dep["JobModifyIndex"]
    assert rollout._find_deployment(c, "web", reg) == dep["ID"]


# ----------------------------------------------------------- 10: errors that waiting does not heal --
def test_nomad_wait_fails_at_once_on_no_path_to_region(doubles: Any) -> None:
    d = doubles()
    with pytest.raises(NomadAPIError) as info:  # waiting on would end in WaitTimeout instead
        cluster.wait_ready(client_for(d, region="mars"), timeout=120)
    assert d.count("^/v1/nodes$") == 1  # asked once, not again
    assert "HTTP 500: No path to region" in str(info.value)
    assert "NOMAD_REGION" in str(info.value) and "'mars'" in str(info.value)


def test_nonexistent_namespace_fails_at_once_with_a_hint(doubles: Any, web: Any) -> None:
    d = doubles()
    with pytest.raises(NomadAPIError) as info:
        rollout.deploy_job(client_for(d, namespace="nope"), web(), timeout=120)
    text = str(info.value)
    assert 'job "web" is in nonexistent namespace "nope"' in text
    assert "NOMAD_NAMESPACE" in text and "nomad namespace apply" in text
    assert info.value.permanent and d.jobs == {}


# --------------------------------------------------------------------- 11: no agent:read on a token --
def test_agent_self_403_falls_back_to_picking_the_node(doubles: Any) -> None:
    d = doubles(acl_tokens={"deploy": DEPLOY_CAPS})
    c = client_for(d, token="deploy")
    with pytest.raises(NomadAPIError, match="Permission denied") as info:
        c.agent_self()  # command/agent/agent_endpoint.go: agent:read
    assert "GET /v1/agent/self needs agent:read" in str(info.value)
    st = cluster.wait_ready(c, timeout=120)
    assert st.ready and st.node_name == "nomad-1"
    assert cluster.is_ready(c).ready


# ------------------------------------------------------------------------- 12: promote named groups --
def test_promotion_names_the_groups_and_never_trips_on_an_auto_promote_group(doubles: Any, web: Any) -> None:
    d = doubles()
    c = client_for(d)
    path = web(canary=1)
    rollout.deploy_job(c, path, variables={"image": "web:1"}, timeout=120)
    d.health_delay["web:2-worker"] = 0.8  # the auto-promote group's canary turns healthy later
    result = rollout.deploy_job(c, path, variables={"image": "web:2"}, timeout=120)
    assert result.outcome == "deployed"
    bodies = list(d.promote_bodies)
    assert bodies and all("All" not in b and b["Groups"] for b in bodies)
    assert [g for b in bodies for g in b["Groups"]] == ["frontend", "backend"]
    dep = d.deployments[result.deployment_id]
    assert dep["Status"] == "successful" and all(g["Promoted"] for g in dep["TaskGroups"].values())


# ----------------------------------------------------------------------- 13: jitter in the timeout --
def test_a_blocking_wait_leaves_room_for_nomads_jitter(doubles: Any) -> None:
    d = doubles(jitter="max")  # nomad/rpc.go: up to wait/16 more, here always all of it
    c = client_for(d)
    index = c.nodes().index
    # A change before the query: the double answers at once, and what counts is the wait the client asked
    # for, read from the request (no clock involved): 4.8 s + 0.3 s of jitter would not fit in 4.9 s.
    d.set_node(Drain=False)
    res = c.nodes(index=index, wait=4.8, timeout=4.9)
    assert res.index > index
    asked = [r.query["wait"] for r in d.requests if r.path == "/v1/nodes" and "wait" in r.query][-1]
    assert int(asked.removesuffix("ms")) / 1000 * 17 / 16 + 0.25 <= 4.9  # wait + jitter + a moment to answer
    d.at(0.3, lambda: d.set_node(Drain=False))
    c.nodes(index=index, wait=900)  # Nomad caps a wait at 300 s (structs.MaxBlockingRPCQueryTime)
    asked = [r.query["wait"] for r in d.requests if r.path == "/v1/nodes" and "wait" in r.query][-1]
    assert asked == "300000ms"


# ---------------------------------------------------------------------- 14: keyring not ready yet --
def test_variable_write_is_retried_while_the_keyring_is_not_ready(doubles: Any) -> None:
    d = doubles(keyring_delay=float("inf"))  # not ready until the client's third request to the variable
    d.on_request(r"^/v1/var/nomad/jobs/x$", 3, d.release_keyring)
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        time.sleep(s)

    value = rollout.ensure_secret(client_for(d), "nomad/jobs/x", "k", sleep=sleep)
    assert d.vars["nomad/jobs/x"]["Items"] == {"k": value}
    statuses = [r.status for r in d.requests if r.method == "PUT"]
    assert statuses[0] == 500 and statuses[-1] == 200 and sleeps


def test_variable_write_keyring_error_gives_up_after_its_wait(doubles: Any) -> None:
    d = doubles(keyring_delay=float("inf"))  # never ready: however slow the machine, the wait must end it
    with pytest.raises(DeployError, match="keyring has not been initialized yet"):
        rollout.ensure_secret(client_for(d), "nomad/jobs/x", "k", keyring_wait=0.3, sleep=time.sleep)


# ------------------------------------------------------------------------------- 15: Nomad's warnings --
def test_plan_and_register_warnings_reach_the_user_once_each(
    doubles: Any, web: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    d = doubles()
    rollout.deploy_job(client_for(d), web(), timeout=120)
    err = capsys.readouterr().err
    line = (
        'warning: web: group "frontend" defines services, but neither the group nor any of its tasks have '
        "shutdown_delay set"
    )
    assert err.count(line) == 1, err
    assert "1 warning:" not in err


# ------------------------------------------------------------------- the double follows the source --
def test_double_parse_needs_no_leader_and_delete_of_unknown_job_is_200(web: Any) -> None:
    with NomadAPIDouble(rpc_hold=0.1) as d:  # no leader at all
        c = client_for(d)
        assert rollout.parse(c, web())["ID"] == "web"  # command/agent/job_endpoint.go: parsed in the agent
        d.elect_leader()
        answer = c.stop_job("nope")
        assert (answer["EvalID"], answer["EvalCreateIndex"], answer["JobModifyIndex"]) == ("", 0, 0)
        assert not d.evals


def test_double_job_allocations_are_the_current_jobs_only(doubles: Any, web: Any) -> None:
    d = doubles()
    c = client_for(d)
    path = web()
    rollout.deploy_job(c, path, timeout=120)
    rollout.purge(c, ["web"], timeout=120)
    rollout.deploy_job(c, path, timeout=120)  # the same ID again: a new job (new CreateIndex)
    current = c.job_allocations("web").body
    every = c.job_allocations("web", all_=True).body
    assert len(current) == 2 and len(every) == 4
    assert {a["JobCreateIndex"] for a in current} == {d.jobs["web"]["CreateIndex"]}


def test_double_keeps_prestart_tasks_and_runs_them_to_completion(doubles: Any) -> None:
    d = doubles()
    c = client_for(d)
    rollout.deploy_job(c, ROOT / "nomad" / "service.nomad.hcl", variables={"image": "app:1"}, timeout=120)
    tasks = {t["Name"]: t for t in d.jobs["app"]["TaskGroups"][0]["Tasks"]}
    prestart = [n for n, t in tasks.items() if (t["Lifecycle"] or {}).get("Hook") == "prestart"]
    assert prestart and "app" not in prestart
    alloc = c.job_allocations("app").body[0]
    states = alloc["TaskStates"]
    assert all(states[n]["State"] == "dead" and not states[n]["Failed"] for n in prestart)
    assert states["app"]["State"] == "running"


def test_double_garbage_collects_a_local_image_unless_gc_image_is_false(web: Any) -> None:
    """drivers/docker/coordinator.go: the image of the last stopped task is removed after image_delay,
    then the next start must pull it; a locally built image cannot be pulled."""
    local = "infra-lab/app:abc"
    for gc, expect_failure in (((True, 0.3), True), ((False, 0.3), False)):
        with NomadAPIDouble(
            pullable=lambda ref: not ref.startswith("infra-lab/"), docker_gc=gc
        ).ready_now() as d:
            c = client_for(d)
            d.load_image(local)
            d.load_image(f"{local}-worker")
            rollout.deploy_job(c, web(), variables={"image": local}, timeout=120)
            rollout.purge(c, ["web"], timeout=120)
            time.sleep(0.6)
            assert (local not in d.images) is expect_failure, d.image_events
            if expect_failure:
                with pytest.raises(DeployError, match="pull access denied for infra-lab/app"):
                    rollout.deploy_job(c, web(), variables={"image": local}, timeout=120)
            else:
                assert (
                    rollout.deploy_job(c, web(), variables={"image": local}, timeout=120).outcome
                    == "deployed"
                )


def test_gc_settings_are_read_from_an_agent_config() -> None:
    assert gc_from_agent_config(
        'plugin "docker" {\n  config {\n    gc {\n      image = false\n    }\n  }\n}\n'
    ) == (
        False,
        180.0,
    )
    assert gc_from_agent_config("client {\n  enabled = true\n}\n") == (True, 180.0)  # the driver's defaults


def test_the_project_agent_config_keeps_the_locally_built_app_image(make_cfg: Any) -> None:
    """Through the double: with the project's docker plugin settings, the app image built
    in the VM is still there after its tasks stopped for longer than image_delay."""
    (agent,) = sorted((ROOT / "cloud-init" / "files" / "nomad").glob("*.hcl"))
    gc_image, delay = gc_from_agent_config(agent.read_text())
    local = "infra-lab/app:0123456789ab"
    with NomadAPIDouble(
        pullable=lambda ref: not ref.startswith("infra-lab/"), docker_gc=(gc_image, 0.2)
    ) as d:
        d.ready_now()
        c = client_for(d)
        d.load_image(local)
        cfg = make_cfg()
        assert release.deploy_app(cfg, c, image=local).outcome == "deployed"
        rollout.purge(c, ["app"], timeout=120)
        time.sleep(0.5)  # longer than the (shortened) image_delay
        assert local in d.images, d.image_events
        assert release.deploy_app(cfg, c, image=local).outcome == "deployed"
    assert not gc_image or delay >= 24 * 3600


# ------------------------------------------------------------- issue 23/8: an index that goes backwards --
def test_follow_reads_afresh_when_the_index_goes_backwards(
    doubles: Any, web: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nomad restarted on an older snapshot mid-deploy: every index falls. nomad/rpc.go blockingRPC holds
    a query while the table's index <= the one passed, so a follower that keeps its old index waits out
    every `wait`; deploy._follow resets it (as cluster.py does) and reads once without blocking."""
    monkeypatch.setattr(rollout, "BLOCK_SECONDS", 1.0)  # the read in flight when the index falls waits this
    d = doubles()
    d.health_delay["server"] = float("inf")  # healthy only once the follow read afresh (below)

    def restored() -> None:  # at the first blocking read of the deployment: indexes fall; the deployment
        d.rewind(3)  # completes once a read without an index arrives (the reset), never before
        d.before_next.append((r"^GET /v1/deployment/[0-9a-f-]+$", d.release_health))

    d.before_next.append((r"^GET /v1/deployment/[0-9a-f-]+\?.*\bindex=", restored))
    result = rollout.deploy_job(client_for(d), web(), timeout=20)
    assert result.outcome == "deployed" and not d.before_next, "the index was never rewound"
    reads = [r for r in d.requests if r.path == f"/v1/deployment/{result.deployment_id}"]
    blocking = [int(r.query["index"]) for r in reads if "index" in r.query]
    fell = next(i for i, r in enumerate(reads) if "index" in r.query)  # the read that met the rewind
    before = int(reads[fell].query["index"])
    assert before > 3
    # after it: one read without an index (the reset), then only indexes of the new, lower history
    assert "index" not in reads[fell + 1].query, [r.query for r in reads]
    assert [i for i in blocking if i >= before] == [before], blocking


# ----------------------------------------------------- issue 23/15: a redeploy racing an auto-revert --
def test_register_refused_by_enforce_index_is_planned_again_saying_what_changed(
    doubles: Any, web: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """v1's deployment fails and Nomad's auto-revert registers v0 again right between our plan and our
    register: nomad/job_endpoint.go (*Job).Register -> nomad/structs/job.go (*Job).EnforceIndex refuses
    it ("Enforcing job modify index N: job exists with conflicting job modify index: M"). The deploy reads
    the job again, says what changed, plans again and registers on the new index."""
    d = doubles()
    c = client_for(d)
    path = web()
    rollout.deploy_job(c, path, variables={"image": "web:1"}, timeout=10)  # v0, stable
    d.health_delay["web:2"] = 60.0  # v1's deployment is still running when it is failed below
    rollout.deploy_job(c, path, variables={"image": "web:2"}, detach=True)
    deadline = time.monotonic() + 60
    while not (running := [x for x in d.deployments.values() if x["JobVersion"] == 1]):
        assert time.monotonic() < deadline, "v1's deployment never started"
        time.sleep(0.05)
    (dep,) = running
    d.before_next.append(("^POST /v1/jobs$", lambda: d._fail_deployment(dep, auto_revert=True)))

    def revert_placed() -> None:  # the revert's own deployment exists by the time the deploy reads back
        for ev in [e for e in d.evals.values() if e["JobID"] == "web" and e["Status"] == "pending"]:
            d._evaluate(ev["ID"])
        assert any(x["JobVersion"] == 2 for x in d.deployments.values())

    d.before_next.append(("^GET /v1/job/web/deployments$", revert_placed))
    plans, registers = d.count("/v1/job/web/plan", "POST"), d.count("^/v1/jobs$", "POST")
    result = rollout.deploy_job(c, path, variables={"image": "web:3"}, timeout=20)
    assert not d.before_next  # both changes happened where they were meant to
    assert result.outcome == "deployed" and result.version == 3  # v2 is the revert, ours v3
    assert d.jobs["web"]["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "web:3"
    assert d.count("/v1/job/web/plan", "POST") - plans == 2  # planned again once
    assert d.count("^/v1/jobs$", "POST") - registers == 2  # refused once, then registered
    err = capsys.readouterr().err
    assert "web: changed in Nomad after our plan (JobModifyIndex" in err
    assert "now version 2, image web:1" in err and "rolling back to job version 0" in err


def test_register_gives_up_when_the_job_keeps_changing(
    doubles: Any, web: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    d = doubles()
    c = client_for(d)
    path = web()
    rollout.deploy_job(c, path, variables={"image": "web:1"}, timeout=10)
    for _ in range(rollout.REGISTER_ATTEMPTS + 1):  # before every register, someone else reverts it
        d.before_next.append(("^POST /v1/jobs$", lambda: d.revert("web", 0)))
    registers = d.count("^/v1/jobs$", "POST")
    with pytest.raises(rollout.NotRegistered, match="it changed in Nomad after each of our 3 plans") as err:
        rollout.deploy_job(c, path, variables={"image": "web:2"}, timeout=20)
    assert d.count("^/v1/jobs$", "POST") - registers == rollout.REGISTER_ATTEMPTS
    assert "Enforcing job modify index" in str(err.value) and "nomad job history web" in str(err.value)
    assert all(v["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "web:1" for v in d.versions["web"])
    assert capsys.readouterr().err.count("planning again") == rollout.REGISTER_ATTEMPTS - 1


def test_deploy_app_refused_registration_claims_no_rollback(doubles: Any, make_cfg: Any) -> None:
    """What `inv deploy.app` says when the job keeps changing: not registered, and no "no automatic
    rollback happened" line (nothing of this deploy reached the job)."""
    d = doubles()
    c = client_for(d)
    cfg = make_cfg()
    release.ship(cfg, c, image="registry.example/app:1")
    for _ in range(rollout.REGISTER_ATTEMPTS):
        d.before_next.append(("^POST /v1/jobs$", lambda: d.revert("app", 0)))
    with pytest.raises(rollout.NotRegistered) as err:
        release.ship(cfg, c, image="registry.example/app:2")
    assert "was not registered" in str(err.value) and "rollback" not in str(err.value)

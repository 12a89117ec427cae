"""After `inv up` from nothing (the `stack` fixture): Nomad, the jobs, the app, its data path."""

from __future__ import annotations

from e2e.harness import Stack


def test_nomad_answers(stack: Stack) -> None:
    """Nomad API and UI answer"""
    stack.smoke.nomad_answers()


def test_jobs_healthy(stack: Stack) -> None:
    """every job running and healthy"""
    stack.smoke.jobs_healthy()


def test_first_deploy_clean(stack: Stack) -> None:
    """first app deployment without retries"""
    stack.smoke.first_deploy_clean()


def test_app_healthz(stack: Stack) -> None:
    """app /healthz on 127.0.0.1:app"""
    stack.smoke.app_healthz()


def test_ingress_healthz(stack: Stack) -> None:
    """app through Traefik (Host: app.localhost)"""
    stack.smoke.ingress_healthz()


def test_ingress_https_with_the_project_ca(stack: Stack) -> None:
    """app through Traefik over HTTPS, verified with the project CA"""
    stack.smoke.ingress_https_healthz()


def test_post_event(stack: Stack) -> None:
    """POST /events stored"""
    stack.smoke.post_event()


def test_event_readable(stack: Stack) -> None:
    """GET /events reads it back"""
    stack.smoke.event_readable()


def test_event_on_kafka(stack: Stack) -> None:
    """event on the Kafka topic"""
    stack.smoke.event_on_kafka()


def test_inv_up_booted_the_bake(stack: Stack) -> None:
    """inv up booted the baked image (the bring-up baked first; vm.baked: auto picks it by its key)"""
    from infra.core.state import StatePaths
    from infra.vm import instance

    record = instance.load_record(StatePaths.of(stack.cfg))
    assert record.get("baked"), f"`inv up` booted {record.get('image')}, not a baked image"
    assert record["image"].endswith(f"/bakes/{record['baked']}.qcow2")

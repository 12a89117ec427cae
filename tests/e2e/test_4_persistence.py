"""Data on Nomad host volumes survives a purge of the data job and its redeploy."""

from __future__ import annotations

from e2e import harness
from e2e.harness import Stack


def test_purge_data_job(stack: Stack) -> None:
    """inv purge -j datastorage"""
    stack.inv(["purge", "-j", harness.job_ids(stack.cfg)[0]], timeout=600)


def test_redeploy_data(stack: Stack) -> None:
    """inv deploy.data"""
    stack.inv(["deploy.data"], timeout=stack.cfg.deploy.timeout + 60)


def test_jobs_healthy_after_redeploy(stack: Stack) -> None:
    """jobs healthy after redeploying data"""
    stack.smoke.jobs_healthy()


def test_event_survives_in_postgres(stack: Stack) -> None:
    """event survives purge + deploy.data (Postgres)"""
    stack.smoke.event_readable()


def test_event_survives_in_kafka(stack: Stack) -> None:
    """event survives purge + deploy.data (Kafka)"""
    stack.smoke.event_on_kafka()

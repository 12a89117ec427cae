"""A VM reboot (`inv vm.stop` + `inv vm.run` + `inv nomad.wait`) keeps the jobs and the data."""

from __future__ import annotations

from e2e.harness import Stack


def test_vm_stop(stack: Stack) -> None:
    """inv vm.stop"""
    stack.inv(["vm.stop"], timeout=stack.cfg.vm.stop_timeout + 120)


def test_vm_run(stack: Stack) -> None:
    """reboot: boot"""
    stack.inv(["vm.run"], timeout=stack.cfg.vm.ssh_timeout + 120)


def test_nomad_wait(stack: Stack) -> None:
    """reboot: Nomad ready"""
    stack.inv(["nomad.wait"], timeout=stack.cfg.nomad.wait_timeout + 60)


def test_jobs_healthy_after_reboot(stack: Stack) -> None:
    """jobs healthy after reboot"""
    stack.smoke.jobs_healthy()


def test_event_survives_reboot_in_postgres(stack: Stack) -> None:
    """event survives reboot (Postgres)"""
    stack.smoke.event_readable()


def test_event_survives_reboot_in_kafka(stack: Stack) -> None:
    """event survives reboot (Kafka)"""
    stack.smoke.event_on_kafka()

"""Tasks: the thin invoke layer. Each task parses arguments, reads config, calls one function in infra/,
and turns a domain error into `invoke.Exit(message, code)`.

`inv --list` shows them; `inv --help TASK` shows a task's options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from invoke import Collection, Context, Exit, task

from infra import config as config_mod
from infra.config import Config
from infra.errors import InfraError

F = TypeVar("F", bound=Callable[..., Any])


def cfg(c: Context) -> Config:
    return config_mod.from_invoke(c.config)


def domain_errors(fn: F) -> F:
    """Turn InfraError into invoke.Exit: a message and a non-zero code, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InfraError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from exc
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper  # type: ignore[return-value]


def _not_yet(what: str) -> None:
    raise Exit(f"error: {what} is not implemented yet", code=3)


# ---------------------------------------------------------------------------------------------------- iso --
@task(
    name="build",
    default=True,
    help={"ssh_key": "public key file (or key text) to authorize; overrides ssh.public_key"},
)
@domain_errors
def iso_build(c: Context, ssh_key: str = "") -> None:
    """Render cloud-init user-data and write the NoCloud seed ISO (label cidata) into the state dir."""
    from infra import seed

    seed.build(cfg(c), ssh_key=ssh_key or None)


# ----------------------------------------------------------------------------------------------------- vm --
@task(name="run")
@domain_errors
def vm_run(c: Context) -> None:
    """Boot the VM (qcow2 overlay on the cached base image + seed ISO); a no-op when it already runs."""
    _not_yet("vm.run")


@task(name="stop")
@domain_errors
def vm_stop(c: Context) -> None:
    """Power the VM off (ACPI over QMP, then kill after vm.stop_timeout)."""
    _not_yet("vm.stop")


@task(name="status")
@domain_errors
def vm_status(c: Context) -> None:
    """Is the VM running? pid, forwarded ports, acceleration, uptime, cloud-init state."""
    _not_yet("vm.status")


@task(name="ssh")
@domain_errors
def vm_ssh(c: Context) -> None:
    """Open an interactive SSH session in the VM with the project key."""
    _not_yet("vm.ssh")


@task(name="logs")
@domain_errors
def vm_logs(c: Context) -> None:
    """Show the tail of the VM's serial console log."""
    _not_yet("vm.logs")


@task(name="check")
@domain_errors
def vm_check(c: Context) -> None:
    """Over SSH (fabric): cloud-init finished, enabled services active; shows log lines on failure."""
    _not_yet("vm.check")


@task(name="destroy")
@domain_errors
def vm_destroy(c: Context) -> None:
    """Stop the VM and delete its disk, seed ISO and state (the image cache is kept)."""
    _not_yet("vm.destroy")


# -------------------------------------------------------------------------------------------------- nomad --
@task(name="wait")
@domain_errors
def nomad_wait(c: Context) -> None:
    """Wait for a leader, this node ready and eligible, and a healthy docker driver."""
    _not_yet("nomad.wait")


# ------------------------------------------------------------------------------------------------- deploy --
@task(name="data")
@domain_errors
def deploy_data(c: Context) -> None:
    """Deploy Kafka + Postgres (nomad/datastorage.nomad.hcl) and follow the deployment."""
    _not_yet("deploy.data")


@task(name="app")
@domain_errors
def deploy_app(c: Context) -> None:
    """Deploy the app (nomad/service.nomad.hcl) and follow the deployment."""
    _not_yet("deploy.app")


@task(name="ingress")
@domain_errors
def deploy_ingress(c: Context) -> None:
    """Deploy Traefik (nomad/ingress.nomad.hcl) and follow the deployment."""
    _not_yet("deploy.ingress")


# --------------------------------------------------------------------------------------------------- root --
@task
@domain_errors
def purge(c: Context) -> None:
    """Stop and purge the project's jobs (data on host volumes survives)."""
    _not_yet("purge")


@task
@domain_errors
def up(c: Context) -> None:
    """Everything, idempotently: iso -> vm.run -> vm.check -> nomad.wait -> deploy data, app, ingress."""
    _not_yet("up")


@task
@domain_errors
def down(c: Context) -> None:
    """Purge the jobs and stop the VM."""
    _not_yet("down")


@task
@domain_errors
def status(c: Context) -> None:
    """One screen: VM, Nomad leader and node, each job's health, URLs."""
    _not_yet("status")


ns = Collection(purge, up, down, status)
ns.add_collection(Collection("iso", iso_build))
ns.add_collection(Collection("vm", vm_run, vm_stop, vm_status, vm_ssh, vm_logs, vm_check, vm_destroy))
ns.add_collection(Collection("nomad", nomad_wait))
ns.add_collection(Collection("deploy", deploy_data, deploy_app, deploy_ingress))

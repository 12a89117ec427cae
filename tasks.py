"""Tasks: the thin invoke layer. Each task parses arguments, reads config, calls one function in infra/,
and turns a domain error into `invoke.Exit(message, code)`.

`inv --list` shows them; `inv --help TASK` shows a task's options.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from infra import cli
from infra.core import config as config_mod
from infra.core.config import Config
from infra.core.errors import InfraError, printable

cli.adopt()  # one `error:` line for invoke's own errors too, whichever `inv` script runs (infra/cli.py)

F = TypeVar("F", bound=Callable[..., Any])


def cfg(c: Context) -> Config:
    return config_mod.from_invoke(c.config)


def reach_cfg(c: Context) -> Config:
    """The configuration with the forwards the running VM was launched with (vm.json), for tasks that talk
    to it: a port moved for one `vm.run` stays where the VM answers."""
    from infra.vm import instance

    return instance.reach(cfg(c))


def domain_errors(fn: F) -> F:
    """Turn InfraError into invoke.Exit: a message and a non-zero code, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InfraError as exc:  # printable(): server text may hold NULs or escape sequences
            raise Exit(f"error: {printable(str(exc))}", code=exc.exit_code) from exc
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper  # type: ignore[return-value]


def option(ok: bool, message: str) -> None:
    """A bad command-line value: one `error:` line and exit 2, before anything is touched."""
    if not ok:
        raise Exit(f"error: {message}", code=2)


# ---------------------------------------------------------------------------------------------------- iso --
@task(
    name="build",
    default=True,
    help={"ssh_key": "public key file (or key text) to authorize; overrides ssh.public_key"},
)
@domain_errors
def iso_build(c: Context, ssh_key: str = "") -> None:
    """Render cloud-init user-data and write the NoCloud seed ISO (label cidata) into the state dir."""
    from infra.core import ui
    from infra.guest import seed

    ui.out(seed.write_iso(cfg(c), ssh_key=ssh_key or None).line)


# ----------------------------------------------------------------------------------------------------- vm --
NODE_HELP = "only this node (vm.nodes >= 3: nomad-1 .. nomad-N); default: every node"


@task(name="run", help={"node": NODE_HELP})
@domain_errors
def vm_run(c: Context, node: str = "") -> None:
    """Boot the VM (qcow2 overlay on the cached base image + seed ISO); a no-op when it already runs."""
    from infra.core import ui
    from infra.vm import verbs

    for booted in verbs.run_nodes(cfg(c), node):
        if booted.seed is not None:
            ui.out(booted.seed.line)


@task(
    name="stop",
    help={
        "timeout": "seconds to wait for the ACPI power-off before killing (default vm.stop_timeout)",
        "node": NODE_HELP,
    },
)
@domain_errors
def vm_stop(c: Context, timeout: int = -1, node: str = "") -> None:
    """Power the VM off (ACPI over QMP, then kill after vm.stop_timeout)."""
    from infra.vm import verbs

    option(timeout >= -1, f"--timeout must be 0 (kill at once) or more seconds, not {timeout}")
    verbs.stop_nodes(cfg(c), node, timeout=None if timeout == -1 else timeout)


@task(name="status", help={"json": 'print the status as JSON on stdout: {"nodes": [...]}', "node": NODE_HELP})
@domain_errors
def vm_status(c: Context, json_: bool = False, node: str = "") -> None:
    """Is each node running? pid, cluster address, forwarded ports, acceleration, uptime, cloud-init state."""
    from infra.core import ui
    from infra.vm import verbs

    info = verbs.status_nodes(cfg(c), node)
    if json_:
        ui.out(json.dumps(info, sort_keys=True))
    else:
        verbs.describe_nodes(info)


@task(
    name="ssh",
    help={
        "command": "run this command instead of an interactive shell",
        "node": "this node (default: the first)",
    },
)
@domain_errors
def vm_ssh(c: Context, command: str = "", node: str = "") -> None:
    """Open an interactive SSH session in the VM with the project key."""
    from infra.vm import verbs

    code = verbs.ssh_node(cfg(c), command, node)
    if code:
        raise Exit(code=code)


@task(
    name="logs",
    help={
        "lines": "how many lines to show (default 50)",
        "follow": "keep printing new lines",
        "node": NODE_HELP,
    },
)
@domain_errors
def vm_logs(c: Context, lines: int = 50, follow: bool = False, node: str = "") -> None:
    """Show the tail of the VM's serial console log (several nodes: each line prefixed with its node)."""
    option(lines >= 0, f"--lines must be 0 or more, not {lines}")
    from infra.core import ui
    from infra.guest import console
    from infra.vm import verbs

    paths = verbs.logs_paths(cfg(c), node)
    option(not (follow and len(paths) > 1), "--follow follows one node's log: add --node NAME")
    for name, path in paths:
        prefix = f"{name}| " if len(paths) > 1 else ""
        for line in console.follow(path, lines) if follow else console.tail(path, lines):
            ui.out(prefix + line)


@task(name="check", help={"node": NODE_HELP})
@domain_errors
def vm_check(c: Context, node: str = "") -> None:
    """Over SSH (fabric): cloud-init finished, enabled services active; shows log lines on failure."""
    from infra.core import nodes, ui
    from infra.vm import verbs

    config = cfg(c)
    reports = verbs.check_nodes(config, node)
    if not nodes.is_cluster(config):
        ui.out(json.dumps(reports[0][1].as_dict(), sort_keys=True))
    else:
        found = [{"name": name, **report.as_dict()} for name, report in reports]
        ui.out(json.dumps({"nodes": found}, sort_keys=True))


@task(name="destroy", help={"node": NODE_HELP})
@domain_errors
def vm_destroy(c: Context, node: str = "") -> None:
    """Stop the VM and delete its disk, seed ISO and state (the image cache is kept)."""
    from infra.vm import verbs

    verbs.destroy_nodes(cfg(c), node)


# -------------------------------------------------------------------------------------------------- image --
@task(
    name="bake",
    help={
        "force": "bake again even when a bake for the current key exists",
        "from_vm": "bake the project's running VM (provisioned from the base image) instead of a throwaway VM; "
        "its disk is generalized and removed, the next vm.run boots the bake",
        "keep": "leave the throwaway VM (state dir <state>/bake) in place after the bake, to look around",
    },
)
@domain_errors
def image_bake(c: Context, force: bool = False, from_vm: bool = False, keep: bool = False) -> None:
    """Bake the provisioned VM into a compressed qcow2 in the image cache, keyed by its inputs."""
    from infra.compose import bake
    from infra.core import ui

    baked = bake.bake(cfg(c), force=force, from_vm=from_vm, keep=keep)
    if baked.seed is not None:
        ui.out(baked.seed.line)
    if baked.made:
        ui.out(str(baked.bake.path))


@task(name="list", help={"json": "print the list as JSON on stdout"})
@domain_errors
def image_list(c: Context, json_: bool = False) -> None:
    """Baked images in the cache: key, size, age, and which one matches the configuration."""
    from infra.compose import bake
    from infra.core import ui

    config = cfg(c)
    found = bake.entries(config)
    if json_:
        ui.out(json.dumps(found, indent=2))
    else:
        bake.show(config, found)


@task(name="prune", help={"all": "delete the current bake too"})
@domain_errors
def image_prune(c: Context, all: bool = False) -> None:
    """Delete baked images that no longer match the configuration (and leftovers of interrupted bakes)."""
    from infra.compose import bake

    bake.prune(cfg(c), everything=all)


# -------------------------------------------------------------------------------------------------- nomad --
@task(name="wait", help={"timeout": "seconds to wait (default: nomad.wait_timeout)"})
@domain_errors
def nomad_wait(c: Context, timeout: int = 0) -> None:
    """Wait for a leader, this node ready and eligible, and a healthy docker driver (vm.nodes >= 3: three
    servers in the Raft configuration and every node ready)."""
    from infra.core import nodes
    from infra.nomad import cluster
    from infra.nomad.client import Client

    option(timeout >= 0, f"--timeout must be a positive number of seconds, not {timeout}")
    config = reach_cfg(c)
    client = Client.from_config(config)
    if nodes.is_cluster(config):
        servers = min(nodes.SERVERS, config.vm.nodes)
        cluster.wait_nodes(
            client, servers=servers, nodes=config.vm.nodes, timeout=timeout or config.nomad.wait_timeout
        )
    else:
        cluster.wait_ready(client, timeout=timeout or config.nomad.wait_timeout)


# ------------------------------------------------------------------------------------------------- deploy --
@task(name="data", help={"detach": "register the job and return without following the deployment"})
@domain_errors
def deploy_data(c: Context, detach: bool = False) -> None:
    """Deploy Kafka + Postgres (nomad/datastorage.nomad.hcl) and follow the deployment."""
    from infra.compose import release
    from infra.nomad.client import Client

    config = reach_cfg(c)
    release.deploy_data(config, Client.from_config(config), detach=detach)


@task(
    name="app",
    help={
        "build": "build the image from app/ in the VM's Docker (tag: git commit of app/, +-dirty-<hash>) and "
        "deploy it; a tag already live is a no-op",
        "local": "with --build: build with the host's Docker (DOCKER_HOST) and load the image into the VM",
        "image": "deploy this image reference instead (e.g. ghcr.io/me/app:1.2.3)",
        "detach": "register the job and return without following the deployment",
    },
)
@domain_errors
def deploy_app(
    c: Context, build: bool = False, local: bool = False, image: str | None = None, detach: bool = False
) -> None:
    """Deploy the app (nomad/service.nomad.hcl): canary -> promote, auto-revert; prints the image now live."""
    from infra.compose import release
    from infra.core import ui
    from infra.nomad.client import Client

    config = reach_cfg(c)
    shipped = release.ship(
        config, Client.from_config(config), build_image=build, image=image, local=local, detach=detach
    )
    ui.out(shipped.image)


@task(name="ingress", help={"detach": "register the job and return without following the deployment"})
@domain_errors
def deploy_ingress(c: Context, detach: bool = False) -> None:
    """Deploy Traefik (nomad/ingress.nomad.hcl) and follow the deployment."""
    from infra.compose import release
    from infra.nomad.client import Client

    config = reach_cfg(c)
    release.deploy_ingress(config, Client.from_config(config), detach=detach)


# ---------------------------------------------------------------------------------------------------- tls --
@task(name="ca")
@domain_errors
def tls_ca(c: Context) -> None:
    """The project CA (made on first use): its path, then how to trust it (curl, Debian/Ubuntu, macOS,
    Firefox)."""
    from infra.compose import ingress, tls
    from infra.core import ui

    config = cfg(c)
    bundle = ingress.certificate(config)
    ui.out(str(bundle.ca_path))
    for line in tls.trust_instructions(bundle.ca_path):
        ui.out(line)


# --------------------------------------------------------------------------------------------------- root --
@task(
    iterable=["job"],
    help={"job": "a job to purge (repeatable: -j app -j ingress); default: the project's jobs"},
)
@domain_errors
def purge(c: Context, job: list[str] | None = None) -> None:
    """Stop and purge the project's jobs (data on host volumes survives); waits until allocations stop."""
    from infra.compose import release
    from infra.nomad.client import Client

    option(all(j.strip() for j in job or []), "-j/--job needs a job name (an empty one was given)")
    config = reach_cfg(c)
    release.purge(config, Client.from_config(config), list(job or []))


@task
@domain_errors
def up(c: Context) -> None:
    """Everything, idempotently: iso -> vm.run -> vm.check -> nomad.wait -> deploy data, app, ingress."""
    from infra.compose import stack
    from infra.core import ui

    result = stack.up(cfg(c))
    ui.out(result.seed.line)
    ui.out(result.live)


@task
@domain_errors
def down(c: Context) -> None:
    """Purge the jobs and stop the VM."""
    from infra.compose import stack

    stack.down(reach_cfg(c))


@task(help={"json": "print the status as JSON on stdout"})
@domain_errors
def status(c: Context, json_: bool = False) -> None:
    """One screen: VM, Nomad leader and node, each job's health, URLs."""
    from infra.compose import stack
    from infra.core import ui

    try:
        report = stack.status(reach_cfg(c))
    except InfraError as exc:  # --json prints JSON whatever happens
        if json_:
            ui.out(json.dumps({"error": printable(exc.message), "hint": exc.hint or ""}, indent=2))
        raise
    if json_:
        ui.out(json.dumps(report, indent=2, default=str))
    if report.get("error"):
        hint = report["nomad"].get("hint")
        raise Exit(f"error: {printable(report['error'])}" + (f"\nhint: {hint}" if hint else ""), code=1)


@task(
    help={
        "task": "the task (default: the allocation's only task, or its only main task)",
        "stderr": "show stderr instead of stdout",
        "follow": "keep streaming new output (Ctrl-C to stop)",
    }
)
@domain_errors
def logs(c: Context, job: str, task: str = "", stderr: bool = False, follow: bool = False) -> None:
    """A job's task logs (newest allocation) through Nomad's API, like `nomad alloc logs`."""
    import os
    import sys

    from infra.nomad import rollout
    from infra.nomad.client import Client

    config = reach_cfg(c)
    client = Client.from_config(config)
    try:
        for chunk in rollout.task_logs(client, job, task=task or None, stderr=stderr, follow=follow):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    except BrokenPipeError:  # `inv logs app | head`: the reader is gone, which is fine
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit-time flush quiet


ns = Collection(purge, up, down, status, logs)
ns.add_collection(Collection("iso", iso_build))
ns.add_collection(Collection("vm", vm_run, vm_stop, vm_status, vm_ssh, vm_logs, vm_check, vm_destroy))
ns.add_collection(Collection("image", image_bake, image_list, image_prune))
ns.add_collection(Collection("nomad", nomad_wait))
ns.add_collection(Collection("deploy", deploy_data, deploy_app, deploy_ingress))
ns.add_collection(Collection("tls", tls_ca))

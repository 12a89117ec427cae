"""The whole stack, composed by calling: `inv up`, `inv down`, `inv status`.

`up` is an explicit sequence of named steps — iso, vm.run, vm.check, nomad.wait, deploy data, app,
ingress — each of which checks first and acts only where needed (the seed ISO is rewritten only when its
bytes change, a running VM is left alone, a ready cluster answers the first query, an unchanged job is
not re-registered), so a second `inv up` finishes in seconds and changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from infra.compose import ingress, release
from infra.core import nodes, ui
from infra.core.config import Config
from infra.core.errors import ConfigError, DeployError, NomadError
from infra.nomad import cluster, rollout
from infra.nomad.client import Client, NomadUnreachable, settings

if TYPE_CHECKING:
    from infra.guest.seed import SeedResult


@dataclass(frozen=True)
class UpResult:
    """What `up` made that `tasks.py` prints on stdout: the seed ISO (path + digest) and the app image live."""

    seed: SeedResult
    live: str


def up(cfg: Config, *, client: Client | None = None) -> UpResult:
    from infra.guest import seed
    from infra.vm import instance, lifecycle, verbs

    started = time.monotonic()
    if client is None:
        _check_provisioned(cfg)
    if nodes.is_cluster(cfg):
        return _up_cluster(cfg, client, started)
    ui.step("iso: seed ISO")
    # first, so that a bad input fails before any download; made once, for the image the VM boots, chosen
    # here once (a running VM's, an existing disk's, a matching bake, or the base) and passed down; unchanged
    # on a second `up`
    made = seed.write_iso(cfg, baked=lifecycle.boots_baked(cfg))
    ui.step("vm.run: boot the VM")
    verbs.run(cfg, made)  # the `inv vm.run` verb, on that seed: the lock, the host checks, the boot
    cfg = instance.reach(cfg)  # an already running VM keeps the forwards it was launched with
    ui.step("vm.check: cloud-init finished, services active")
    verbs.check_once(cfg)  # SSH only when this boot of the VM has not been checked yet
    client = client or Client.from_config(cfg)
    ui.step("nomad.wait: leader, node ready, docker driver healthy")
    cluster.wait_ready(client, timeout=cfg.nomad.wait_timeout)
    shipped = deploy_all(cfg, client)
    ui.ok(f"up: everything is running ({time.monotonic() - started:.1f}s)")
    for line in url_lines(cfg):
        ui.info(line)
    return UpResult(made, shipped.image)


def _up_cluster(cfg: Config, client: Client | None, started: float) -> UpResult:
    """`up` with vm.nodes >= 3: every node booted (side by side) and checked, then Nomad waited for with
    three servers and every node ready, then the same deploys as on one VM (through node 1's forwards)."""
    from infra.vm import verbs

    ui.step(f"vm.run: boot {cfg.vm.nodes} nodes on the cluster network")
    booted = verbs.run_nodes(cfg)
    ui.step("vm.check: cloud-init finished, services active, on every node")
    verbs.check_nodes(cfg)
    client = client or Client.from_config(cfg)
    servers = min(nodes.SERVERS, cfg.vm.nodes)
    ui.step(f"nomad.wait: leader, {servers} servers, {cfg.vm.nodes} nodes ready with docker")
    cluster.wait_nodes(client, servers=servers, nodes=cfg.vm.nodes, timeout=cfg.nomad.wait_timeout)
    shipped = deploy_all(cfg, client)
    ui.ok(f"up: everything is running on {cfg.vm.nodes} nodes ({time.monotonic() - started:.1f}s)")
    for line in url_lines(cfg):
        ui.info(line)
    first = booted[0].seed
    if first is None:  # node 1 ran already: its seed as it is
        from infra.guest import seed

        first = seed.refresh(
            nodes.node_config(cfg, 1), baked=booted[0].launch.record.get("baked") is not None
        )
    return UpResult(first, shipped.image)


def _check_provisioned(cfg: Config) -> None:
    """`up` deploys onto the VM's own Nomad: refuse at once when the configuration leaves it out, instead of
    booting and then waiting nomad.wait_timeout for a Nomad (or docker driver) that will never come."""
    if settings(cfg).source != "default":
        return  # NOMAD_ADDR / nomad.addr: the jobs go to that cluster
    reasons = []
    if not cfg.provision.nomad:
        reasons.append("provision.nomad is off, so Nomad is not installed in the VM")
    if not cfg.provision.docker:
        reasons.append("provision.docker is off, so the VM's Nomad would have no Docker to run the jobs")
    if reasons:
        raise ConfigError(
            f"`inv up` deploys onto the VM's own Nomad, but {'; and '.join(reasons)}; nothing was started",
            hint="turn it on (INVOKE_PROVISION_NOMAD=1 INVOKE_PROVISION_DOCKER=1), point NOMAD_ADDR at a "
            "cluster, or boot the VM alone with `inv vm.run vm.check`",
        )


def deploy_all(cfg: Config, client: Client) -> release.ShipResult:
    """deploy.data, deploy.app, deploy.ingress in that order; the app's ShipResult (its image is live)."""
    ui.step("deploy.data: Postgres + Kafka")
    release.deploy_data(cfg, client)
    ui.step("deploy.app: the app")
    # The image chosen before (app.default_image, or the last deploy.app) is kept: unchanged -> no-op. On the
    # first run nothing is chosen yet but the source in app/: it is built in the VM and that image shipped.
    shipped = release.ship(cfg, client, build_image=not release.image_chosen(cfg))
    ui.step("deploy.ingress: Traefik")
    release.deploy_ingress(cfg, client)
    return shipped


def down(cfg: Config, *, client: Client | None = None) -> None:
    """Purge the project's jobs (when Nomad answers), then stop the VM — whatever the purge said.

    Whether Nomad answers is asked of /v1/status/leader, which needs no ACL capability
    (nomad/status_endpoint.go); /v1/agent/self would need agent:read, which a deploy token lacks."""
    from infra.vm import lifecycle

    client = client or Client.from_config(cfg)
    failed: NomadError | None = None
    try:
        client.leader(retries=0)
    except NomadUnreachable:
        ui.skip(f"Nomad at {client.addr} is not answering: no jobs to purge")
    except NomadError as exc:
        failed = exc
    else:
        try:
            release.purge(cfg, client)
        except NomadError as exc:
            failed = exc
    if failed is not None:
        ui.warn(f"purge failed ({failed.message}); stopping the VM anyway")
    if nodes.is_cluster(cfg):
        from infra.vm import verbs

        verbs.stop_nodes(cfg)
    else:
        lifecycle.stop(cfg)
    if failed is not None:
        raise DeployError(
            f"the VM is stopped, but the jobs were not purged: {failed.message}",
            hint=(failed.hint + "; " if failed.hint else "")
            + "they start again with the VM: `inv purge` then",
        ) from failed


def _cluster_lines(client: Client, report: dict[str, Any]) -> None:
    """A cluster's Raft servers and client nodes, in the report and on screen."""
    try:
        peers = client.peers(retries=0)
        stubs = list(client.nodes(retries=0).body or [])
    except NomadError as exc:
        ui.info(f"       servers/nodes: {exc.message}")
        return
    states = [cluster.node_state(stub, cluster.ClusterState(leader=True)) for stub in stubs]
    report["nomad"]["peers"] = peers
    report["nomad"]["nodes"] = [
        {"name": n.node_name, "status": n.node_status, "eligibility": n.eligibility, "ready": n.ready}
        for n in states
    ]
    ui.info(f"       servers (Raft): {', '.join(peers) or 'none'}")
    for n in states:
        ui.info(
            f"       node {n.node_name:<10} {n.node_status:<12} {n.eligibility}{', ready' if n.ready else ''}"
        )


def url_lines(cfg: Config) -> list[str]:
    ports = cfg.vm.ports
    urls = []
    for name, fmt in (
        ("ingress", "app via Traefik   http://127.0.0.1:{}/"),
        ("app", "app (direct)      http://127.0.0.1:{}/"),
        ("traefik_dashboard", "Traefik dashboard http://127.0.0.1:{}/dashboard/"),
        ("nomad", "Nomad UI          http://127.0.0.1:{}/ui/"),
        ("postgres", "Postgres          127.0.0.1:{}"),
        ("kafka", "Kafka             localhost:{}"),
    ):
        if name == "postgres" and nodes.is_cluster(cfg):
            continue  # a cluster's Postgres port is on the cluster network only (README, local cluster)
        if name in ports:
            urls.append("  " + fmt.format(ports[name].host))
    https = ingress.https_url(cfg)
    if https:  # the project CA signs it: `inv tls.ca` says how to trust it
        urls.insert(1, f"  app via HTTPS     {https}  (CA: {ingress.ca_path(cfg)})")
    return urls


def status(
    cfg: Config, *, client: Client | None = None, vm_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One screen: VM, Nomad leader and node, each job's status and healthy allocations, the URLs."""
    if vm_info is None and nodes.is_cluster(cfg):
        from infra.vm import lifecycle

        each = [lifecycle.facts(node) for node in nodes.all_nodes(cfg)]
        vm_info = {"running": any(n["running"] for n in each), "nodes": each}
        for n in each:
            ui.info(
                f"node   {n['name']} ({n['cluster_address']}): "
                + (f"running (pid {n['pid']})" if n["running"] else "not running")
            )
    if vm_info is None:
        from infra.vm import lifecycle

        vm_info = lifecycle.facts(cfg)
    report: dict[str, Any] = {"vm": vm_info, "nomad": {"addr": cfg.nomad.addr or None}, "jobs": []}
    try:
        client = client or Client.from_config(cfg)
    except NomadError as exc:  # a malformed NOMAD_ADDR or token: in the report too
        report["nomad"].update(reachable=False, ready=False, error=exc.message, hint=exc.hint or "")
        report["error"] = exc.message
        return report
    report["nomad"]["addr"] = client.addr

    if "nodes" in vm_info:
        pass  # a cluster: one line per node above
    elif vm_info.get("running"):
        uptime = vm_info.get("uptime_s")
        up_text = f", up {uptime // 60}m{uptime % 60:02d}s" if isinstance(uptime, int) else ""
        ui.info(f"VM     running (pid {vm_info.get('pid')}, accel {vm_info.get('accel', '?')}{up_text})")
        if vm_info.get("problem"):  # qemu runs, the guest does not (paused, io-error: a full host disk)
            ui.warn(vm_info["problem"])
    else:
        ui.info("VM     not running")

    try:
        st = cluster.is_ready(client)
    except NomadError as exc:  # a refused token, an answer that is not Nomad's: in the report, not lost
        report["nomad"].update(reachable=True, ready=False, error=exc.message, hint=exc.hint or "")
        report["error"] = exc.message
        ui.info(f"Nomad  {client.addr}: {exc.message}")
        return report
    leader = cluster.leader_address(client) if st.reachable else ""
    report["nomad"].update(reachable=st.reachable, leader=leader, node=st.node_name, ready=st.ready)
    if not st.reachable:
        ui.info(f"Nomad  {client.addr}: {st.problem}")
    else:
        ui.info(f"Nomad  {client.addr}: leader {leader or 'none'}; {st.describe()}")
        if nodes.is_cluster(cfg):
            _cluster_lines(client, report)
        ui.info("Jobs")
        app_job = rollout.job_id_of(cfg.deploy.app_job)
        for job_id in release.project_jobs(cfg):
            try:
                s = rollout.job_summary(client, job_id)
            except NomadError as exc:
                ui.info(f"  {job_id:<12} ? ({exc.message})")
                report["jobs"].append({"job_id": job_id, "error": exc.message})
                if getattr(exc, "permanent", False):  # e.g. 403: the token may not read jobs
                    report.setdefault("error", exc.message)
                    report["nomad"].setdefault("hint", exc.hint or "")
                continue
            report["jobs"].append(s.__dict__)
            if job_id == app_job:
                report["app_image"] = s.image  # the app image live, as Nomad has it registered
            if s.version is None:
                ui.info(f"  {job_id:<12} {s.status}")
            else:
                ui.info(
                    f"  {job_id:<12} {s.status:<8} v{s.version:<3} deployment {s.deployment:<10} "
                    f"{s.healthy}/{s.desired} healthy, {s.running} running"
                    + (f", image {s.image}" if job_id == app_job and s.image else "")
                )
    report["https"] = {"url": ingress.https_url(cfg), "ca": str(ingress.ca_path(cfg))}
    ui.info("URLs")
    for line in url_lines(cfg):
        ui.info(line)
    return report

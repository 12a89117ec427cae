"""The whole stack, composed by calling: `inv up`, `inv down`, `inv status`.

`up` is an explicit sequence of named steps — iso, vm.run, vm.check, nomad.wait, deploy data, app,
ingress — each of which checks first and acts only where needed (the seed ISO is rewritten only when its
bytes change, a running VM is left alone, a ready cluster answers the first query, an unchanged job is
not re-registered), so a second `inv up` finishes in seconds and changes nothing.
"""

from __future__ import annotations

import time
from typing import Any

from infra import cluster, deploy, ui
from infra.config import Config
from infra.nomad import Client, NomadAPIError, NomadUnreachable
from infra.state import StatePaths


def up(cfg: Config, *, client: Client | None = None) -> None:
    from infra import remote, seed, vm

    started = time.monotonic()
    ui.step("iso: seed ISO")
    seed.build(cfg, baked=vm.disk_is_baked(cfg))  # the seed vm.run boots with: a second `up` leaves it alone
    ui.step("vm.run: boot the VM")
    vm.run(cfg)
    ui.step("vm.check: cloud-init finished, services active")
    p = vm.paths(cfg)
    remote.check(cfg, alive=lambda: vm.running_pid(p) is not None)
    client = client or Client.from_config(cfg)
    ui.step("nomad.wait: leader, node ready, docker driver healthy")
    cluster.wait_ready(client, timeout=cfg.nomad.wait_timeout)
    deploy_all(cfg, client)
    ui.ok(f"up: everything is running ({time.monotonic() - started:.1f}s)")
    for line in url_lines(cfg):
        ui.info(line)


def deploy_all(cfg: Config, client: Client) -> list[deploy.DeployResult]:
    results = []
    ui.step("deploy.data: Postgres + Kafka")
    results.append(deploy.deploy_data(cfg, client))
    ui.step("deploy.app: the app")
    if cfg.app.default_image or StatePaths(cfg.project.state_dir).deployed.exists():
        # An image was chosen before (app.default_image, or the last deploy.app): keep it; unchanged -> no-op.
        results.append(deploy.deploy_app(cfg, client))
    else:
        # First run: nothing to deploy yet but the source in app/. Build it in the VM and ship that.
        from infra import build

        shipped = build.ship(cfg, client, build_image=True)
        results.append(
            deploy.DeployResult(deploy.job_id_of(cfg.deploy.app_job), shipped.outcome, shipped.job_version)
        )
    ui.step("deploy.ingress: Traefik")
    results.append(deploy.deploy_ingress(cfg, client))
    return results


def down(cfg: Config, *, client: Client | None = None) -> None:
    """Purge the project's jobs (when Nomad answers), then stop the VM."""
    from infra import vm

    client = client or Client.from_config(cfg)
    try:
        client.agent_self(retries=0)
    except NomadUnreachable:
        ui.skip(f"Nomad at {client.addr} is not answering: no jobs to purge")
    else:
        deploy.purge(client, list(reversed(deploy.project_jobs(cfg))), timeout=cfg.deploy.timeout)
    vm.stop(cfg)


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
        if name in ports:
            urls.append("  " + fmt.format(ports[name].host))
    return urls


def status(
    cfg: Config, *, client: Client | None = None, vm_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One screen: VM, Nomad leader and node, each job's status and healthy allocations, the URLs."""
    if vm_info is None:
        from infra import vm

        vm_info = vm.status(cfg, probe_guest=False)
    client = client or Client.from_config(cfg)
    report: dict[str, Any] = {"vm": vm_info, "nomad": {"addr": client.addr}, "jobs": []}

    if vm_info.get("running"):
        uptime = vm_info.get("uptime_s")
        up_text = f", up {uptime // 60}m{uptime % 60:02d}s" if isinstance(uptime, int) else ""
        ui.info(f"VM     running (pid {vm_info.get('pid')}, accel {vm_info.get('accel', '?')}{up_text})")
    else:
        ui.info("VM     not running")

    st = cluster.is_ready(client)
    leader = cluster.leader_address(client) if st.reachable else ""
    report["nomad"].update(reachable=st.reachable, leader=leader, node=st.node_name, ready=st.ready)
    if not st.reachable:
        ui.info(f"Nomad  {client.addr}: {st.problem}")
    else:
        ui.info(f"Nomad  {client.addr}: leader {leader or 'none'}; {st.describe()}")
        ui.info("Jobs")
        for job_id in deploy.project_jobs(cfg):
            try:
                s = deploy.job_summary(client, job_id)
            except (NomadAPIError, NomadUnreachable) as exc:
                ui.info(f"  {job_id:<12} ? ({exc.message})")
                continue
            report["jobs"].append(s.__dict__)
            if s.version is None:
                ui.info(f"  {job_id:<12} {s.status}")
            else:
                ui.info(
                    f"  {job_id:<12} {s.status:<8} v{s.version:<3} deployment {s.deployment:<10} "
                    f"{s.healthy}/{s.desired} healthy, {s.running} running"
                )
    ui.info("URLs")
    for line in url_lines(cfg):
        ui.info(line)
    return report

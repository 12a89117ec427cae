"""This project's release policy: which job gets which image, variables and secrets (`inv deploy.*`,
`inv purge`, the deploy steps of `inv up`).

- The jobs: deploy.data_job, deploy.app_job, deploy.ingress_job, deployed in that order, purged the other way.
- Secrets: the Postgres password in Nomad Variables (deploy.secrets_path), with a copy under the app job's
  own path, created before the data job is deployed.
- The app: `ship` is the one entry point for `inv deploy.app`, `inv up` and the CD workflow (which runs
  `inv deploy.app --image REF`): build (infra/compose/appimage.py) or take the image, deploy it with the HCL variables
  `image` and `version`, record them in <state>/deployed.json, and name the image live (after a failed
  deployment: what Nomad's auto-revert put back).

The mechanism (parse -> plan -> register -> follow, promote, purge) is infra/nomad/rollout.py, which knows nothing
of this module; this module calls it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.compose import appimage, ingress
from infra.compose.appimage import BuildResult, LocalDocker
from infra.core import files, nodes, ui
from infra.core.config import Config
from infra.core.errors import BuildError, DeployError, InfraError
from infra.core.state import StatePaths
from infra.core.waits import Probe, wait_until
from infra.nomad import rollout
from infra.nomad.client import Client
from infra.nomad.rollout import DeployResult

#: Key in the Nomad Variable (deploy.secrets_path) holding the generated Postgres password.
POSTGRES_PASSWORD_KEY = "postgres_password"  # noqa: S105 - a key name, not a secret
#: HCL variable that carries the app image in nomad/service.nomad.hcl.
IMAGE_VARIABLE = "image"


# ---------------------------------------------------------------------------------------------- jobs --
def project_job_files(cfg: Config) -> list[Path]:
    """In deploy order; purge goes the other way."""
    return [cfg.deploy.data_job, cfg.deploy.app_job, cfg.deploy.ingress_job]


def project_jobs(cfg: Config) -> list[str]:
    return [rollout.job_id_of(p) for p in project_job_files(cfg)]


def purge(cfg: Config, client: Client, jobs: list[str] | None = None) -> list[str]:
    """Purge `jobs`, by default the project's in reverse deploy order (`inv purge`, `inv down`)."""
    return rollout.purge(client, jobs or list(reversed(project_jobs(cfg))), timeout=cfg.deploy.timeout)


# ------------------------------------------------------------------------------------------- secrets --
def ensure_postgres_password(cfg: Config, client: Client) -> None:
    """The password in deploy.secrets_path, and a copy in nomad/jobs/<app job> (a task reads only its own
    job's variables without an extra ACL policy; see nomad/service.nomad.hcl)."""
    password = rollout.ensure_secret(client, cfg.deploy.secrets_path, POSTGRES_PASSWORD_KEY)
    app_path = f"nomad/jobs/{rollout.job_id_of(cfg.deploy.app_job)}"
    if app_path != cfg.deploy.secrets_path:
        rollout.ensure_secret(client, app_path, POSTGRES_PASSWORD_KEY, value=password)


# ------------------------------------------------------------------------------------------- deploys --
def deploy_data(cfg: Config, client: Client, *, detach: bool = False) -> DeployResult:
    rollout.read_job_file(cfg.deploy.data_job)  # a bad job file stops here, before the secret is created
    ensure_postgres_password(cfg, client)
    # a local cluster: Kafka's listener for host clients on the user-mode NIC (see deploy_ingress)
    variables = {"host_network": nodes.PUBLIC_HOST_NETWORK[0]} if nodes.is_cluster(cfg) else None
    return rollout.deploy_job(
        client, cfg.deploy.data_job, variables=variables, detach=detach, timeout=cfg.deploy.timeout
    )


def deploy_ingress(cfg: Config, client: Client, *, detach: bool = False) -> DeployResult:
    """Traefik: first its TLS (the project CA's certificate, renewed when < 30 days remain, and the
    redirect/ACME routers) in its Nomad Variable, then the job with the ACME resolvers' HCL variables.
    A local cluster (vm.nodes >= 3): the entrypoints on host network "public", the user-mode NIC where the
    forwards arrive (each node's agent declares it, infra/guest/seed.py); one VM: the job's default."""
    rollout.read_job_file(cfg.deploy.ingress_job)  # a bad job file stops here, before anything is written
    ingress.publish(cfg, client)
    variables = ingress.acme_variables(cfg)
    if nodes.is_cluster(cfg):
        variables["host_network"] = nodes.PUBLIC_HOST_NETWORK[0]
    return rollout.deploy_job(
        client,
        cfg.deploy.ingress_job,
        variables=variables,
        detach=detach,
        timeout=cfg.deploy.timeout,
    )


def deploy_app(
    cfg: Config,
    client: Client,
    *,
    image: str | None = None,
    variables: Mapping[str, str] | None = None,
    detach: bool = False,
) -> DeployResult:
    """Deploy nomad/service.nomad.hcl with HCL variable `image` (and any other `variables`).

    Image: `image`, else app.default_image, else the variables of the last successful deploy.app
    (<state>/deployed.json), else the job file's default. Reusing the last variables keeps `inv up`
    from rolling a `--build` image back to the default.
    """
    record_path = StatePaths.of(cfg).deployed
    merged: dict[str, str] = {}
    chosen = image or cfg.app.default_image
    if not chosen and not variables:
        merged.update(_read_record(record_path).get("variables") or {})
    merged.update(variables or {})
    if chosen:
        merged[IMAGE_VARIABLE] = chosen
    _check_writable(record_path)  # before registering: a record that cannot be written must not half-deploy
    result = rollout.deploy_job(
        client, cfg.deploy.app_job, variables=merged, detach=detach, timeout=cfg.deploy.timeout
    )
    if result.outcome == "deployed" or (result.outcome == "unchanged" and merged):
        _write_record(record_path, {"job": result.job_id, "version": result.version, "variables": merged})
    return result


def recorded_image(cfg: Config) -> str:
    """The image the last deploy.app deployed (<state>/deployed.json), "" when none is recorded."""
    variables = _read_record(StatePaths.of(cfg).deployed).get("variables")
    return str(variables.get(IMAGE_VARIABLE) or "") if isinstance(variables, dict) else ""


def image_chosen(cfg: Config) -> bool:
    """Has an app image been chosen: app.default_image, or a record of the last deploy.app? (`inv up` builds
    app/ when not.)"""
    return bool(cfg.app.default_image) or StatePaths.of(cfg).deployed.exists()


def _read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(files.read_text(path, "record of the last deploy.app", error=DeployError))
    except (DeployError, ValueError, RecursionError):  # absent or unreadable: as if never deployed
        return {}
    variables = data.get("variables", {}) if isinstance(data, dict) else None
    if not isinstance(variables, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in variables.items()
    ):  # valid JSON of another shape (`null`, "variables": 123): never guess what was deployed
        got = json.dumps(variables if isinstance(data, dict) else data)[:40]
        raise DeployError(
            f"the record of the last deploy.app {path} is not valid: "
            + (
                f"'variables' is {got}, expected an object of strings"
                if isinstance(data, dict)
                else f"expected a JSON object, got {got}"
            ),
            hint="delete it (`inv deploy.app --image REF` then names the image), or `inv vm.destroy`",
        )
    return dict(data)


class RecordError(DeployError):
    """deployed.json cannot be written: found before registering (nothing was deployed), or after a
    deployment that succeeded. Either way no rollback happened, and none is reported."""


def _check_writable(path: Path) -> None:
    """The record can be written after the deployment: its directory takes a file, and it is not a
    directory itself (checked before registering, so a bad state dir never half-deploys)."""
    try:
        if path.exists() and not path.is_file():
            raise IsADirectoryError(errno.EISDIR, "it is not a file")
        files.probe_dir(path.parent)
        files.no_links(path.parent, [path.name], "record of the deployed image", error=DeployError)
        free = shutil.disk_usage(path.parent).free
        if free < MIN_FREE:
            raise OSError(errno.ENOSPC, f"{free // 1024} KiB free, {MIN_FREE // 1024} KiB needed")
    except OSError as exc:
        raise RecordError(
            files.failed(f"cannot write {path} (the record of the deployed image)", exc),
            hint="project.state_dir must be a writable directory; nothing was deployed",
        ) from None
    StatePaths(path.parent).check()  # the tool's own dir (infra/core/state.py), or refused before registering


#: Free space the state dir must have before a deploy registers: the record is small, but a disk that has
#: less is full for every practical purpose (a probe file of 0 bytes still fits on a full disk).
MIN_FREE = 1024 * 1024


def _write_record(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        StatePaths(path.parent).claim()
        files.write_atomic(path, text.encode(), "record of the deployed image", error=DeployError)
    except DeployError as exc:
        raise RecordError(
            f"the job is deployed, but {exc.message}",
            hint="a later `inv up` redeploys the job file's default image; fix project.state_dir",
        ) from None


# ----------------------------------------------------------------------------------- build + deploy --
@dataclass(frozen=True)
class ShipResult:
    image: str  # the image now live
    version: str
    deployed: DeployResult
    build: BuildResult | None = None

    @property
    def outcome(self) -> str:  # "deployed" | "unchanged" | "registered"
        return self.deployed.outcome

    @property
    def job_version(self) -> int | None:
        return self.deployed.version


def ship(
    cfg: Config,
    client: Client,
    *,
    build_image: bool = False,
    image: str | None = None,
    local: bool = False,
    detach: bool = False,
    engine: Callable[[Config], contextlib.AbstractContextManager[Any]] | None = None,
    builder: LocalDocker | None = None,
) -> ShipResult:
    """`inv deploy.app [--build [--local] | --image REF]`, the app step of `inv up` and the CD workflow:
    build (or take) the image, deploy it, report the image live (`.image`, which tasks.py prints on stdout).
    Neither: the image chosen before."""
    if build_image and image is not None:
        raise BuildError("--build and --image exclude each other", hint="--build makes the image from app/")
    if local and not build_image:
        raise BuildError("--local only applies with --build")
    built: BuildResult | None = None
    if build_image:
        built = appimage.for_vm(cfg, local=local, engine=engine, builder=builder)
        ref = built.ref
    elif image is not None:  # `--image ''` is a mistake, not "the default image"
        ref = appimage.check_ref(image)
    else:
        ref = ""
    variables = {"version": appimage.version_of(ref)} if ref else None
    job_id = rollout.job_id_of(cfg.deploy.app_job)
    try:
        result = deploy_app(cfg, client, image=ref or None, variables=variables, detach=detach)
    except (RecordError, rollout.NotRegistered):
        raise  # nothing of ours reached the job, or the deployment succeeded: no rollback to report
    except DeployError as exc:
        exc.details.extend(rollback_report(client, job_id, ref, failed=exc.deployment))
        raise
    # Nomad's word first; else the image this deploy asked for (after a no-op: the one recorded last time)
    live = rollout.live_image(client, job_id) or ref or recorded_image(cfg)
    live_version = appimage.version_of(live) if live else "?"
    if result.outcome == "unchanged":
        ui.skip(f"{live} is already live (job {job_id} version {result.version}): nothing to deploy")
    elif result.outcome == "registered":
        ui.ok(f"{ref or live} registered as job {job_id} version {result.version} (--detach: not followed)")
    else:
        ui.ok(f"{live} is live: version {live_version} (job {job_id} version {result.version})")
    return ShipResult(live, live_version, result, built)


def rollback_report(
    client: Client,
    job_id: str,
    attempted: str,
    timeout: float = 30.0,
    failed: Mapping[str, Any] | None = None,
) -> list[str]:
    """After a failed deployment (`failed`, as the deploy flow saw it): which version is live now. With
    auto_revert Nomad registers the last stable version again (a new job version); wait for that a little,
    then name its image. Not /v1/job/<id>/deployment when the failed one is known: that is the job's latest
    deployment (command/agent/job_endpoint.go jobLatestDeployment -> nomad/job_endpoint.go
    Job.LatestDeployment: state.DeploymentsByJobID, the highest CreateIndex), and the revert's own
    deployment may already have replaced the failed one there."""
    if failed is None:
        try:
            failed = client.job_deployment(job_id).body or {}
        except InfraError:
            return []
    failed_version = failed.get("JobVersion")
    reverting = "rolling back to job version" in str(failed.get("StatusDescription") or "")

    def probe(_d: object) -> Probe[dict[str, Any]]:
        job = client.job(job_id) or {}
        moved = failed_version is not None and int(job.get("Version", -1)) > int(failed_version)
        return Probe(moved or not reverting, f"job version {job.get('Version')}", job)

    try:
        job = wait_until(probe, what=f"job {job_id}: auto-revert registered", timeout=timeout,
                         interval=0.5).value or {}  # fmt: skip
    except InfraError:
        job = client.job(job_id) or {}
    image = rollout.live_image(client, job_id)
    if reverting and image and image != attempted:
        return [f"rolled back: {image} (version {appimage.version_of(image)}) is live again as job version "
                f"{job.get('Version')}; {attempted or 'the new version'} was not kept"]  # fmt: skip
    return [f"no automatic rollback happened: job {job_id} version {job.get('Version')} with {image or '?'} "
            "is registered; earlier allocations keep running where Nomad did not replace them"]  # fmt: skip

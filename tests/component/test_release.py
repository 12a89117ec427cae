"""infra/compose/release.py: `ship` (build -> deploy -> report) from a REAL temporary git repository against
the STATEFUL NOMAD API DOUBLE (tests/support/doubles/nomad_api.py: registrations, canary deployments,
promotion, failing tasks, auto-revert).

The Docker engine here is `RecordingEngine`, a TEST DOUBLE that only remembers which tags it holds: real
builds with a real dockerd, and the image's tag and context, are tests/component/test_appimage.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.doubles.nomad_api import NomadAPIDouble, Timing
from support.gitrepo import app_commit, commit_all, make_repo
from support.jobs import APP_JOB

from infra.compose import release
from infra.core import config
from infra.core.errors import BuildError, DeployError
from infra.core.state import StatePaths
from infra.nomad.client import Client

pytestmark = pytest.mark.tools("git", "ssh-keygen")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


# ------------------------------------------------------------------------------------ build + deploy --
@dataclass
class RecordingEngine:
    """TEST DOUBLE of a Docker engine: holds tags, records builds and loads (no Docker involved)."""

    where: str = "the recording engine"
    images: set[str] = field(default_factory=set)
    builds: list[tuple[str, dict[str, str], list[str]]] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)

    def has_image(self, ref: str) -> bool:
        return ref in self.images

    def build(self, context: Path, ref: str, build_args: Mapping[str, str], log: Path) -> None:
        with tarfile.open(context) as tar:
            names = sorted(tar.getnames())
        log.write_text(f"built {ref}\n")
        self.builds.append((ref, dict(build_args), names))
        self.images.add(ref)

    def save(self, ref: str, dest: Path) -> None:
        dest.write_text(ref)

    def load(self, tarball: Path, ref: str = "") -> None:
        self.loads.append(tarball.read_text())
        self.images.add(tarball.read_text())


@pytest.fixture
def double() -> Iterator[NomadAPIDouble]:
    with NomadAPIDouble(timing=Timing(alloc_healthy=0.05)) as api:
        api.ready_now()
        yield api


@dataclass
class World:
    cfg: config.Config
    client: Client
    vm: RecordingEngine
    api: NomadAPIDouble
    repo: Path

    def ship(self, **kw: Any) -> release.ShipResult:
        @contextlib.contextmanager
        def engine(_cfg: config.Config) -> Iterator[RecordingEngine]:
            yield self.vm

        return release.ship(self.cfg, self.client, engine=engine, **kw)

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(StatePaths.of(self.cfg).deployed.read_text())
        return data

    def registrations(self) -> int:
        return self.api.count(r"^/v1/jobs$", "POST")


@pytest.fixture
def world(repo: Path, tmp_path: Path, double: NomadAPIDouble, monkeypatch: pytest.MonkeyPatch) -> World:
    job = repo / "nomad" / "service.nomad.hcl"
    job.parent.mkdir()
    job.write_text(APP_JOB)
    commit_all(repo, "job")
    cfg = config.load(
        {
            "project": {"state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache")},
            "nomad": {"addr": double.url},
            "deploy": {"app_job": str(job), "timeout": 60},
        },
        root=repo,
    )
    client = Client.from_config(cfg, env={})
    return World(cfg, client, RecordingEngine(), double, repo)


# ------------------------------------------------------------------------------------------ tagging --


def test_build_deploys_the_commit_tag_and_records_it(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = app_commit(world.repo)[:12]

    result = world.ship(build_image=True)

    ref = f"infra-lab/app:{tag}"
    assert result.image == ref and result.version == tag and result.outcome == "deployed"
    assert [b[0] for b in world.vm.builds] == [ref]
    assert world.vm.builds[0][1] == {"APP_VERSION": tag}  # base_image empty: the Dockerfile's pinned default
    assert world.vm.builds[0][2] == ["Dockerfile", "events_service.py", "run.sh"]
    job = world.client.job("app")
    assert job is not None
    assert job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == ref
    assert job["Meta"] == {"version": tag}
    assert world.record()["variables"] == {"image": ref, "version": tag}
    assert capsys.readouterr().out == ""  # the live image is returned; tasks.py prints it


def test_build_twice_on_an_unchanged_tree_deploys_once(world: World) -> None:
    first = world.ship(build_image=True)
    registrations = world.registrations()
    versions = len(world.api.versions["app"])

    second = world.ship(build_image=True)

    assert second.outcome == "unchanged" and second.image == first.image
    assert len(world.vm.builds) == 1  # not rebuilt: the VM has the tag
    assert second.build is not None and second.build.built is False
    assert world.registrations() == registrations  # not registered again
    assert len(world.api.versions["app"]) == versions


def test_a_new_commit_in_app_rolls_out_through_a_promoted_canary(world: World) -> None:
    first = world.ship(build_image=True)
    (world.repo / "app" / "events_service.py").write_text("print('v2')\n")
    commit_all(world.repo, "app v2")

    second = world.ship(build_image=True)

    assert second.image != first.image and second.image.endswith(app_commit(world.repo)[:12])
    assert second.outcome == "deployed" and second.job_version == 1
    dep = world.client.job_deployment("app").body
    assert dep["Status"] == "successful"
    assert dep["TaskGroups"]["app"]["DesiredCanaries"] == 1 and dep["TaskGroups"]["app"]["Promoted"]
    assert (
        world.api.count(r"^/v1/deployment/promote/", "PUT")
        + world.api.count(r"^/v1/deployment/promote/", "POST")
        == 1
    )
    assert world.record()["variables"]["image"] == second.image


def test_a_dirty_tree_deploys_a_dirty_tag(world: World) -> None:
    (world.repo / "app" / "events_service.py").write_text("print('wip')\n")

    result = world.ship(build_image=True)

    assert "-dirty-" in result.version
    assert world.client.job("app") is not None


def ship_a_failing_canary(world: World) -> tuple[Any, str, DeployError]:
    """A good version shipped, then one whose task exits 1: (the good ship, the bad image, the error)."""
    good = world.ship(build_image=True)
    (world.repo / "app" / "events_service.py").write_text("raise SystemExit(1)\n")
    commit_all(world.repo, "broken")
    bad_ref = f"infra-lab/app:{app_commit(world.repo)[:12]}"
    world.api.behaviour[bad_ref] = "exit-1"
    with pytest.raises(DeployError) as info:
        world.ship(build_image=True)
    return good, bad_ref, info.value


def test_a_failing_canary_is_rolled_back_and_reported(world: World) -> None:
    good, _bad, error = ship_a_failing_canary(world)

    text = str(error)
    assert "rolling back to job version 0" in text
    assert "Terminated: exit code 1" in text  # the failing task's events (deploy flow)
    assert f"rolled back: {good.image}" in text and "live again" in text
    assert error.exit_code != 0
    job = world.client.job("app")
    assert job is not None and job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == good.image
    assert world.record()["variables"]["image"] == good.image  # the record keeps the last good image


def test_the_rollback_report_reads_the_failed_deployment_not_the_latest(world: World) -> None:
    """Nomad's /v1/job/<id>/deployment is the job's latest deployment; after an auto-revert that is soon the
    revert's own. Read then (as once under load), it made the report say "no automatic rollback happened"."""
    good, bad_ref, error = ship_a_failing_canary(world)
    failed = error.deployment
    assert failed is not None and "rolling back to job version 0" in failed["StatusDescription"]
    deadline = time.monotonic() + 120  # a wait for an event, generous: it only ends a hang
    while (world.client.job_deployment("app").body or {}).get("ID") == failed["ID"]:
        assert time.monotonic() < deadline, "the revert never got a deployment of its own"
        time.sleep(0.05)
    lines = release.rollback_report(world.client, "app", bad_ref, failed=failed)
    assert lines and lines[0].startswith(f"rolled back: {good.image} "), lines


def test_image_option_deploys_that_image_without_building(world: World) -> None:
    result = world.ship(image="ghcr.io/me/app:1.2.3")

    assert result.image == "ghcr.io/me/app:1.2.3" and result.version == "1.2.3"
    assert world.vm.builds == []
    again = world.ship(image="ghcr.io/me/app:1.2.3")
    assert again.outcome == "unchanged"


def test_local_build_loads_the_image_into_the_vm(world: World) -> None:
    host = RecordingEngine(where="the host")

    result = world.ship(build_image=True, local=True, builder=host)

    assert [b[0] for b in host.builds] == [result.image]
    assert world.vm.builds == [] and world.vm.loads == [result.image]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"build_image": True, "image": "a/b:1"}, "exclude each other"),
        ({"local": True}, "--local only applies with --build"),
        ({"image": "Not A Ref"}, "invalid image reference"),
    ],
)
def test_bad_option_combinations_fail_before_touching_nomad(
    world: World, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(BuildError, match=message):
        world.ship(**kwargs)

    assert world.registrations() == 0 and world.vm.builds == []


def test_inv_deploy_app_rejects_a_bad_image_reference(run_inv: Callable[..., Any]) -> None:
    result = run_inv("deploy.app", "--image", "Not A Ref")

    assert result.returncode == 1
    assert "invalid image reference 'Not A Ref'" in result.stderr


def test_inv_deploy_app_help_lists_the_options(run_inv: Callable[..., Any]) -> None:
    result = run_inv("--help", "deploy.app")

    assert result.returncode == 0
    for option in ("--build", "--local", "--image", "--detach"):
        assert option in result.stdout


def test_build_without_a_reachable_vm_says_so(world: World, tmp_path: Path) -> None:
    from support.servers.common import free_port

    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    cfg = config.load(
        {
            "project": {"state_dir": str(tmp_path / "state2")},
            "ssh": {"private_key": str(key)},
            "vm": {"ports": {"ssh": {"host": free_port(), "guest": 22}}},
            "nomad": {"addr": world.api.url},
        },
        root=world.repo,
    )

    with pytest.raises(BuildError) as info:
        release.ship(cfg, world.client, build_image=True)

    assert "cannot reach the VM over SSH" in str(info.value) and "inv vm.run" in str(info.value)
    assert world.registrations() == 0

"""Build-and-deploy (infra/compose/appimage.py, infra/compose/release.py): tags from a REAL temporary git repository, dirty
detection, the build context, and `ship` (build -> deploy -> report) against the STATEFUL NOMAD API DOUBLE
(tests/support/doubles/nomad_api.py: registrations, canary deployments, promotion, failing tasks, auto-revert).

The Docker engine here is `RecordingEngine`, a TEST DOUBLE that only remembers which tags it holds: real
builds with a real dockerd are tests/component/test_app_image.py.
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
from support.jobs import APP_JOB

from infra.compose import appimage, release
from infra.core import config
from infra.core.errors import BuildError, DeployError
from infra.core.state import StatePaths
from infra.nomad.client import Client

pytestmark = pytest.mark.tools("git", "ssh-keygen")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A real git repository shaped like ours: app/ (Dockerfile, code) and something outside it."""
    root = tmp_path / "repo"
    (root / "app").mkdir(parents=True)
    (root / "infra").mkdir()
    (root / "app" / "Dockerfile").write_text("FROM scratch\nCOPY events_service.py /\n")
    (root / "app" / "events_service.py").write_text("print('v1')\n")
    (root / "app" / "run.sh").write_text("#!/bin/sh\nexec python3 events_service.py\n")
    (root / "app" / "run.sh").chmod(0o755)
    (root / "infra" / "other.py").write_text("x = 1\n")
    (root / ".gitignore").write_text("*.log\n__pycache__/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.invalid")
    git(root, "config", "user.name", "test")
    commit_all(root, "first")
    return root


def app_commit(repo: Path) -> str:
    return git(repo, "log", "-1", "--format=%H", "--", "app").strip()


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
def test_clean_tree_is_tagged_with_the_commit_that_last_changed_app(repo: Path) -> None:
    src = appimage.source(repo)

    assert not src.dirty
    assert src.commit == git(repo, "rev-parse", "HEAD").strip()
    assert src.tag == src.commit[:12]
    assert src.files == ("Dockerfile", "events_service.py", "run.sh")


def test_a_commit_outside_app_keeps_the_tag(repo: Path) -> None:
    before = appimage.source(repo).tag
    (repo / "infra" / "other.py").write_text("x = 2\n")
    commit_all(repo, "infra only")

    after = appimage.source(repo)

    assert after.tag == before
    assert after.commit != git(repo, "rev-parse", "HEAD").strip()  # HEAD moved, app/ did not


def test_an_uncommitted_change_outside_app_is_not_dirty(repo: Path) -> None:
    (repo / "infra" / "other.py").write_text("x = 3\n")

    assert not appimage.source(repo).dirty


def test_a_tracked_change_in_app_is_dirty_and_the_tag_follows_the_content(repo: Path) -> None:
    clean = appimage.source(repo).tag
    (repo / "app" / "events_service.py").write_text("print('v2')\n")
    first = appimage.source(repo)
    second = appimage.source(repo)
    (repo / "app" / "events_service.py").write_text("print('v3')\n")
    third = appimage.source(repo)
    (repo / "app" / "events_service.py").write_text("print('v1')\n")  # back to the committed content
    reverted = appimage.source(repo)

    assert first.dirty and first.tag.startswith(clean + "-dirty-")
    assert second.tag == first.tag  # same dirty tree, same tag
    assert third.tag != first.tag and third.tag.startswith(clean + "-dirty-")
    assert not reverted.dirty and reverted.tag == clean


def test_untracked_files_count_but_ignored_ones_do_not(repo: Path) -> None:
    (repo / "app" / "debug.log").write_text("ignored\n")
    (repo / "app" / "__pycache__").mkdir()
    (repo / "app" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    ignored_only = appimage.source(repo)
    (repo / "app" / "helper.py").write_text("y = 1\n")
    untracked = appimage.source(repo)

    assert not ignored_only.dirty and "debug.log" not in ignored_only.files
    assert untracked.dirty and "helper.py" in untracked.files


def test_staged_changes_and_mode_changes_are_dirty(repo: Path) -> None:
    clean = appimage.source(repo)
    (repo / "app" / "events_service.py").chmod(0o755)
    mode_changed = appimage.source(repo)

    assert mode_changed.dirty
    assert mode_changed.content_hash != clean.content_hash


def test_not_a_git_repository_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Dockerfile").write_text("FROM scratch\n")

    with pytest.raises(BuildError) as info:
        appimage.source(tmp_path)

    assert "git" in str(info.value) and "--image" in str(info.value)


def test_missing_dockerfile_is_a_clear_error(repo: Path) -> None:
    (repo / "app" / "Dockerfile").unlink()

    with pytest.raises(BuildError, match=r"app/Dockerfile not found"):
        appimage.source(repo)


def test_context_tarball_holds_exactly_the_files_reproducibly(repo: Path, tmp_path: Path) -> None:
    (repo / "app" / "debug.log").write_text("not shipped\n")
    src = appimage.source(repo)

    a = appimage.context_tarball(src, tmp_path / "a.tar")
    b = appimage.context_tarball(src, tmp_path / "b.tar")

    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["Dockerfile", "events_service.py", "run.sh"]
        assert members["run.sh"].mode == 0o755 and members["Dockerfile"].mode == 0o644
        assert {m.mtime for m in members.values()} == {0}
        extracted = tar.extractfile("events_service.py")
        assert extracted is not None and extracted.read() == b"print('v1')\n"


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

"""infra/compose/appimage.py: the app image built for real (a private dockerd (fixture), a python base made here
from Debian's packages (no Docker Hub), app/Dockerfile built through appimage's code, the container run against
the real PostgreSQL and Tansu fixtures, /healthz answered from inside the container); and its tag and build
context from a REAL temporary git repository (tests/support/gitrepo.py): dirty detection, the context tarball."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support.doubles.nomad_api import NomadAPIDouble
from support.gitrepo import commit_all, git, make_repo
from support.jobs import APP_JOB
from support.servers import dockerd, sshd
from support.servers.common import free_port
from support.servers.postgres import PostgresServer
from support.servers.tansu import TansuBroker

from infra import ROOT
from infra.compose import appimage
from infra.core import config
from infra.core.errors import BuildError

#: The tests that build for real: a Docker engine, a base image made with mmdebstrap, PostgreSQL, sshd.
docker = pytest.mark.docker
docker_tools = pytest.mark.tools("dockerd", "docker", "mmdebstrap", "initdb", "sshd", "ssh-keygen")


@pytest.fixture(scope="module")
def base_image(docker_engine: dockerd.DockerEngine) -> str:
    tag, timings = dockerd.python_base(docker_engine)
    print(f"\nbase image {tag}: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return tag


@pytest.fixture(scope="module")
def built(docker_engine: dockerd.DockerEngine, base_image: str, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[appimage.BuildResult, appimage.LocalDocker, config.Config]:  # fmt: skip
    state = tmp_path_factory.mktemp("state")
    cfg = config.load({"project": {"state_dir": str(state)}, "app": {"base_image": base_image}})
    engine = appimage.LocalDocker(host=docker_engine.host, network="host", docker=dockerd.docker_cli(),
                               where="the test dockerd")  # fmt: skip
    result = appimage.build(cfg, engine, root=ROOT)
    print(f"\napp image {result.ref}: built={result.built} in {result.seconds:.1f}s")
    return result, engine, cfg


def wait_healthy(url: str, container: str, engine: dockerd.DockerEngine, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = requests.get(url + "/healthz", timeout=10)
            if last.status_code == 200:
                return last
        except requests.ConnectionError as exc:
            last = exc
        state = engine.docker(
            "inspect", "--format", "{{.State.Status}}", container, check=False
        ).stdout.strip()
        if state == "exited":
            break
        time.sleep(0.5)
    logs = engine.docker("logs", container, check=False)
    raise AssertionError(f"container never healthy: {last!r}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")


@docker
@docker_tools
def test_image_builds_from_a_local_base_and_answers_healthz(
    built: tuple[appimage.BuildResult, appimage.LocalDocker, config.Config],
    docker_engine: dockerd.DockerEngine,
    pg: PostgresServer,
    kafka: TansuBroker,
) -> None:
    result, _engine, _cfg = built
    inspect = json.loads(docker_engine.docker("image", "inspect", result.ref).stdout)[0]
    assert inspect["Config"]["User"] == "10001:10001"  # non-root
    assert f"APP_VERSION={result.tag}" in inspect["Config"]["Env"]

    port = free_port()
    env = {**pg.env(), "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap, "KAFKA_TOPIC": "image-test",
           "PORT": str(port), "HOST": "127.0.0.1"}  # fmt: skip
    run = ["run", "--detach", "--network", "host", "--name", "app-under-test"]
    for key, value in env.items():
        run += ["--env", f"{key}={value}"]
    container = docker_engine.docker(*run, result.ref).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        health = wait_healthy(url, container, docker_engine)
        posted = requests.post(url + "/events", json={"from": "container"}, timeout=30)
        listed = requests.get(url + "/events", timeout=10).json()["events"]
        whoami = docker_engine.docker("exec", container, "/opt/venv/bin/python", "-c",
                                      "import os; print(os.getuid())").stdout.strip()  # fmt: skip
        pg.stop()
        try:
            down = requests.get(url + "/healthz", timeout=15)
        finally:
            pg.start()
    finally:
        stopped = docker_engine.docker("stop", "--time", "20", container, check=False)
        exit_code = docker_engine.docker(
            "inspect", "--format", "{{.State.ExitCode}}", container
        ).stdout.strip()
        logs = docker_engine.docker("logs", container).stdout
        docker_engine.docker("rm", "--force", container, check=False)

    assert health.json()["version"] == result.tag
    assert health.json()["down"] == []
    assert posted.status_code == 201, posted.text
    assert listed[0]["payload"] == {"from": "container"}
    assert whoami == "10001"
    assert down.status_code == 503 and down.json()["down"] == ["postgres"]
    assert stopped.returncode == 0
    assert exit_code == "0"  # SIGTERM -> clean exit
    lines = [json.loads(line) for line in logs.splitlines() if line.strip()]  # JSON logs from the container
    assert lines[-1]["msg"] == "stopped"


@docker
@docker_tools
def test_second_build_of_the_same_tree_is_a_noop(
    built: tuple[appimage.BuildResult, appimage.LocalDocker, config.Config],
) -> None:
    first, engine, cfg = built
    again = appimage.build(cfg, engine, root=ROOT)

    assert again.ref == first.ref
    assert again.built is False


@docker
@docker_tools
def test_save_and_load_round_trip(
    built: tuple[appimage.BuildResult, appimage.LocalDocker, config.Config], tmp_path: Path,
    docker_engine: dockerd.DockerEngine,
) -> None:  # fmt: skip
    """The commands of the --local path (docker save here, docker load in the target)."""
    result, engine, _cfg = built
    tarball = tmp_path / "image.tar"
    engine.save(result.ref, tarball)
    docker_engine.docker("image", "rm", result.ref)
    assert not engine.has_image(result.ref)

    engine.load(tarball)

    assert engine.has_image(result.ref)
    assert tarball.stat().st_size > 50_000_000


@docker
@docker_tools
def test_a_broken_build_names_the_failing_step(
    docker_engine: dockerd.DockerEngine, base_image: str, tmp_path: Path
) -> None:
    engine = appimage.LocalDocker(host=docker_engine.host, network="host", docker=dockerd.docker_cli())
    context = tmp_path / "ctx.tar"
    subprocess.run(["tar", "-C", str(tmp_path), "-cf", str(context), "--files-from", "/dev/null"], check=True)
    (tmp_path / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo about to fail && exit 7\n")
    subprocess.run(["tar", "-C", str(tmp_path), "-cf", str(context), "Dockerfile"], check=True)

    with pytest.raises(BuildError) as info:
        engine.build(context, "infra-lab/broken:1", {}, tmp_path / "build.log")

    text = str(info.value)
    assert "docker build of infra-lab/broken:1" in text
    assert "exit 7" in text or "non-zero code: 7" in text
    assert str(tmp_path / "build.log") in text


# ------------------------------------------------------------------------- the VM path, over real SSH --
@pytest.fixture(scope="module")
def vm_like(docker_engine: dockerd.DockerEngine, base_image: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[config.Config]:  # fmt: skip
    """A real sshd on loopback whose sessions reach the test dockerd (DOCKER_HOST), and a Config whose
    ssh settings point at it: infra/guest/ssh.py's connection and infra/compose/appimage.py's RemoteDocker run for real."""
    server = sshd.started({"DOCKER_HOST": docker_engine.host})
    state = tmp_path_factory.mktemp("vm-state")
    cfg = config.load(
        {
            "project": {"state_dir": str(state)},
            "app": {"base_image": base_image, "image": "infra-lab/app-remote"},
            "ssh": {"user": server.user, "private_key": str(server.client_key)},
            "vm": {"ports": {"ssh": {"host": server.port, "guest": 22}}},
        }
    )
    yield cfg
    server.cleanup()


@contextlib.contextmanager
def host_network_vm_engine(cfg: config.Config) -> Iterator[appimage.RemoteDocker]:
    # the production connection (infra/guest/ssh.py); only the build network differs: the test dockerd
    # runs without a bridge
    with appimage._vm_engine(cfg) as engine:
        engine.network = "host"
        yield engine


@docker
@docker_tools
def test_build_inside_the_vm_over_ssh(vm_like: config.Config, docker_engine: dockerd.DockerEngine) -> None:
    # The uploaded context is `mktemp --tmpdir infra-lab-XXXXXXXX<suffix>` in the "VM" (here: this host's
    # /tmp, which other tests share): compare what exists before and after.
    listing = "ls /tmp | grep -E '^infra-lab-[A-Za-z0-9]{8}' || true"
    with host_network_vm_engine(vm_like) as engine:
        before = set(engine._sh(listing).stdout.split())
        result = appimage.build(vm_like, engine, root=ROOT)
        again = appimage.build(vm_like, engine, root=ROOT)
        leftovers = set(engine._sh(listing).stdout.split()) - before

    assert result.built and not again.built
    assert docker_engine.docker("image", "inspect", result.ref, check=False).returncode == 0
    assert leftovers == set()  # the uploaded context was removed
    docker_engine.docker("image", "rm", result.ref)


@docker
@docker_tools
def test_local_build_is_loaded_into_the_vm_over_ssh(
    vm_like: config.Config, docker_engine: dockerd.DockerEngine
) -> None:
    host = appimage.LocalDocker(
        host=docker_engine.host, network="host", docker=dockerd.docker_cli(), where="host"
    )
    ref = f"{vm_like.app.image}:{appimage.source(ROOT).tag}"
    docker_engine.docker("image", "rm", "--force", ref, check=False)

    with host_network_vm_engine(vm_like) as engine:
        result = appimage.build(vm_like, engine, builder=host, root=ROOT)

    assert result.ref == ref and result.built
    assert docker_engine.docker("image", "inspect", ref, check=False).returncode == 0


@docker
@docker_tools
def test_inv_deploy_app_build_twice_on_an_unchanged_tree_deploys_once(
    vm_like: config.Config,
    docker_engine: dockerd.DockerEngine,
    run_inv: Callable[..., subprocess.CompletedProcess[str]],
    tmp_path: Path,
) -> None:
    """The real CLI: `inv deploy.app --build` builds over real SSH in the test dockerd and deploys through
    the STATEFUL NOMAD API DOUBLE; the second run neither builds nor registers anything."""
    job = tmp_path / "service.nomad.hcl"
    job.write_text(APP_JOB)
    settings = tmp_path / "settings.yaml"
    with NomadAPIDouble() as api:
        api.ready_now()
        settings.write_text(
            yaml.safe_dump(
                {
                    "app": {"image": "infra-lab/app-cli", "base_image": vm_like.app.base_image,
                            "build_network": "host"},
                    "ssh": {"user": vm_like.ssh.user, "private_key": vm_like.ssh.private_key},
                    "vm": {"ports": {"ssh": {"host": vm_like.vm.ports["ssh"].host, "guest": 22}}},
                    "nomad": {"addr": api.url},
                    "deploy": {"app_job": str(job), "timeout": 120},
                }
            )
        )  # fmt: skip
        ref = f"infra-lab/app-cli:{appimage.source(ROOT).tag}"
        docker_engine.docker("image", "rm", "--force", ref, check=False)

        first = run_inv("-f", str(settings), "deploy.app", "--build", timeout=600)
        second = run_inv("-f", str(settings), "deploy.app", "--build", timeout=300)
        versions = len(api.versions.get("app", []))
        registrations = api.count(r"^/v1/jobs$", "POST")

    assert first.returncode == 0, first.stderr[-3000:]
    assert f"built {ref}" in first.stderr and f"{ref} is live" in first.stderr
    assert first.stdout.strip().splitlines()[-1] == ref
    assert second.returncode == 0, second.stderr[-3000:]
    assert "not rebuilding" in second.stderr and "nothing to deploy" in second.stderr
    assert second.stdout.strip().splitlines()[-1] == ref
    assert versions == 1 and registrations == 1
    assert docker_engine.docker("image", "inspect", ref, check=False).returncode == 0


# ---------------------------------------------------------- the tag and the build context (git, no Docker) --
@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@pytest.mark.tools("git")
def test_clean_tree_is_tagged_with_the_commit_that_last_changed_app(repo: Path) -> None:
    src = appimage.source(repo)

    assert not src.dirty
    assert src.commit == git(repo, "rev-parse", "HEAD").strip()
    assert src.tag == src.commit[:12]
    assert src.files == ("Dockerfile", "events_service.py", "run.sh")


@pytest.mark.tools("git")
def test_a_commit_outside_app_keeps_the_tag(repo: Path) -> None:
    before = appimage.source(repo).tag
    (repo / "infra" / "other.py").write_text("x = 2\n")
    commit_all(repo, "infra only")

    after = appimage.source(repo)

    assert after.tag == before
    assert after.commit != git(repo, "rev-parse", "HEAD").strip()  # HEAD moved, app/ did not


@pytest.mark.tools("git")
def test_an_uncommitted_change_outside_app_is_not_dirty(repo: Path) -> None:
    (repo / "infra" / "other.py").write_text("x = 3\n")

    assert not appimage.source(repo).dirty


@pytest.mark.tools("git")
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


@pytest.mark.tools("git")
def test_untracked_files_count_but_ignored_ones_do_not(repo: Path) -> None:
    (repo / "app" / "debug.log").write_text("ignored\n")
    (repo / "app" / "__pycache__").mkdir()
    (repo / "app" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    ignored_only = appimage.source(repo)
    (repo / "app" / "helper.py").write_text("y = 1\n")
    untracked = appimage.source(repo)

    assert not ignored_only.dirty and "debug.log" not in ignored_only.files
    assert untracked.dirty and "helper.py" in untracked.files


@pytest.mark.tools("git")
def test_staged_changes_and_mode_changes_are_dirty(repo: Path) -> None:
    clean = appimage.source(repo)
    (repo / "app" / "events_service.py").chmod(0o755)
    mode_changed = appimage.source(repo)

    assert mode_changed.dirty
    assert mode_changed.content_hash != clean.content_hash


@pytest.mark.tools("git")
def test_not_a_git_repository_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Dockerfile").write_text("FROM scratch\n")

    with pytest.raises(BuildError) as info:
        appimage.source(tmp_path)

    assert "git" in str(info.value) and "--image" in str(info.value)


@pytest.mark.tools("git")
def test_missing_dockerfile_is_a_clear_error(repo: Path) -> None:
    (repo / "app" / "Dockerfile").unlink()

    with pytest.raises(BuildError, match=r"app/Dockerfile not found"):
        appimage.source(repo)


@pytest.mark.tools("git")
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

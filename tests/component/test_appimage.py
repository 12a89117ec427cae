"""The app image, built for real: a private dockerd (fixture), a python base made here from Debian's
packages (no Docker Hub), app/Dockerfile built through infra/compose/appimage.py's code, the container run against the
real PostgreSQL and Tansu fixtures, /healthz answered from inside the container."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support.doubles.nomad_api import NomadAPIDouble
from support.jobs import APP_JOB
from support.servers import dockerd, sshd
from support.servers.common import free_port
from support.servers.postgres import PostgresServer
from support.servers.tansu import TansuBroker

from infra import ROOT
from infra.compose import appimage
from infra.core import config
from infra.core.errors import BuildError

pytestmark = [
    pytest.mark.docker,
    pytest.mark.tools("dockerd", "docker", "mmdebstrap", "initdb", "sshd", "ssh-keygen"),
]


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


def test_second_build_of_the_same_tree_is_a_noop(
    built: tuple[appimage.BuildResult, appimage.LocalDocker, config.Config],
) -> None:
    first, engine, cfg = built
    again = appimage.build(cfg, engine, root=ROOT)

    assert again.ref == first.ref
    assert again.built is False


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

"""The docker part of the user-data, for real: a Debian 12 guest installs docker.io from Debian's mirror
through cloud-init, 10-docker.sh enables it and adds the login user to the docker group, and `inv vm.check`
verifies the service. The host-volume script of the nomad part runs in the same guest (Nomad itself cannot be
installed here: HashiCorp's repository is unreachable)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from infra import ROOT, pgp, seed

pytestmark = [
    pytest.mark.vm,
    pytest.mark.tools("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "ssh"),
]


@pytest.fixture(scope="module")
def docker_booted(docker_vm_env: Any) -> dict[str, Any]:
    run = docker_vm_env.inv("vm.run")
    assert run.returncode == 0, run.stderr
    check = docker_vm_env.inv("vm.check")
    assert check.returncode == 0, f"vm.check failed:\n{check.stderr[-6000:]}"
    timings = json.loads(check.stdout.strip().splitlines()[-1])
    print(f"\ndocker-enabled guest: {timings}")
    return {"check": check, "timings": timings}


def ssh(env: Any, command: str) -> str:
    result = env.inv("vm.ssh", "--command", command, timeout=180)
    assert result.returncode == 0, (
        f"{command!r} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return str(result.stdout)


def test_vm_check_verifies_docker(docker_booted: dict[str, Any]) -> None:
    assert docker_booted["timings"]["services"] == {"docker": "active"}
    assert "services active: docker" in docker_booted["check"].stderr


def test_login_user_runs_docker_without_sudo(docker_vm_env: Any, docker_booted: dict[str, Any]) -> None:
    out = ssh(docker_vm_env, "id -nG; docker info --format '{{.ServerVersion}} {{.Driver}}'").splitlines()
    assert "docker" in out[0].split()
    version, driver = out[1].split()
    assert version[0].isdigit() and driver == "overlay2"


def test_host_volume_script_creates_owned_dirs_and_is_idempotent(
    docker_vm_env: Any, docker_booted: dict[str, Any]
) -> None:
    listing = (seed.FILES_DIR / "nomad" / "host-volumes").read_bytes()
    script = (seed.FILES_DIR / "scripts" / "30-nomad-volumes.sh").read_bytes()
    install = (
        f"echo {base64.b64encode(listing).decode()} | base64 -d | sudo tee /etc/infra-lab/host-volumes >/dev/null"
        f" && echo {base64.b64encode(script).decode()} | base64 -d > /tmp/30-nomad-volumes.sh"
    )
    ssh(docker_vm_env, install)
    first = ssh(docker_vm_env, "sudo sh /tmp/30-nomad-volumes.sh")
    assert "created host volume directory /opt/nomad/volumes/kafka" in first
    assert "created host volume directory /opt/nomad/volumes/postgres" in first
    ssh(
        docker_vm_env,
        "sudo touch /opt/nomad/volumes/kafka/data-survives && sudo chown 1000 /opt/nomad/volumes/kafka/data-survives",
    )
    second = ssh(
        docker_vm_env,
        "sudo sh /tmp/30-nomad-volumes.sh; sudo stat -c '%n %u:%g %a' /opt/nomad/volumes/* /opt/nomad/volumes/kafka/data-survives",
    )
    assert "created" not in second  # existing directories are left alone
    assert "/opt/nomad/volumes/kafka 1000:1000 750" in second
    assert "/opt/nomad/volumes/postgres 0:0 700" in second
    assert "/opt/nomad/volumes/kafka/data-survives 1000:0 644" in second


def test_nomad_installer_refuses_a_key_with_the_wrong_fingerprint(
    docker_vm_env: Any, docker_booted: dict[str, Any]
) -> None:
    """20-nomad-install.sh, in the guest, given the superseded 2023 HashiCorp key as the embedded key: gpg
    reports its fingerprint, the script refuses (lib.sh pin_key), and no repository or keyring is configured."""
    old_key = (ROOT / "tests" / "fixtures" / "hashicorp-2023-superseded.asc").read_bytes()
    script = (seed.FILES_DIR / "scripts" / "20-nomad-install.sh").read_bytes()
    env = f"NOMAD_VERSION=2.0.7\nHASHICORP_KEY_FPR={pgp.HASHICORP_KEY_FPR}\nHASHICORP_KEY_URL=https://invalid.invalid/gpg\n"
    ssh(
        docker_vm_env,
        f"printf '{env}' | sudo tee -a /etc/infra-lab/provision.env >/dev/null"
        f" && echo {base64.b64encode(old_key).decode()} | base64 -d | sudo tee /etc/infra-lab/hashicorp.asc >/dev/null"
        f" && echo {base64.b64encode(script).decode()} | base64 -d > /tmp/20-nomad-install.sh",
    )
    result = docker_vm_env.inv("vm.ssh", "--command", "sudo sh /tmp/20-nomad-install.sh", timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "/etc/infra-lab/hashicorp.asc holds key(s) [798AEC654E5C15428C8E42EEAA16FCBCA621E701], "
        f"expected exactly [{pgp.HASHICORP_KEY_FPR}]; refusing it"
    ) in result.stderr
    assert (
        f"HashiCorp's key is not exactly the pinned {pgp.HASHICORP_KEY_FPR}; refusing to install"
        in result.stderr
    )
    left = ssh(
        docker_vm_env,
        "ls /etc/apt/sources.list.d/ /usr/share/keyrings/; dpkg-query -W nomad 2>&1 || true",
    )
    assert "hashicorp" not in left
    assert "no packages found matching nomad" in left


def test_destroy(docker_vm_env: Any, docker_booted: dict[str, Any]) -> None:
    result = docker_vm_env.inv("vm.destroy", timeout=120)
    assert result.returncode == 0, result.stderr
    assert not docker_vm_env.state_dir.exists() or not any(docker_vm_env.state_dir.iterdir())

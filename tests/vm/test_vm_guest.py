"""One guest, its whole life, through the real `inv` CLI: iso -> vm.run -> vm.check -> the checks of the
base user-data -> the docker part -> `inv image.bake --from-vm` -> a boot of the bake with no route out of
the guest (`vm.offline`) -> vm.stop -> vm.destroy.

The image is Debian 12 built here by scripts/build-test-image (Debian's packages only), booted under TCG with
direct kernel boot, 1 vCPU / 2 GiB (tests/vm/conftest.py says why), on free ports. The user-data is the
base part, the docker part (docker.io comes in the test image, disabled; 10-docker.sh enables and starts it
and adds the login user to the docker group; cloud-init installs one small package, `tree`, from Debian's
mirror) and the final marker. The nomad part's scripts run in the same guest by hand (Nomad itself cannot be
installed here: HashiCorp's repository is unreachable). One guest instead of one per part: under TCG every
boot costs a minute of CPU, and the tier's time is the README test command's.

The tests run in file order (module-scoped fixtures `booted`, then `baked`); the conftest stops the VM by pid
if a test fails half-way.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from support.servers.common import listening, processes_of

from infra import ROOT
from infra.guest import pgp, seed
from infra.guest import ssh as guest_ssh
from vm.conftest import TREE

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(
        3600
    ),  # a safety net, not a bound: the first test's fixture boots the guest (waits above)
    pytest.mark.tools("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "ssh"),
]


def ssh(env: Any, command: str) -> str:
    result = env.inv("vm.ssh", "--command", command, timeout=180)
    assert result.returncode == 0, (
        f"{command!r} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return str(result.stdout)


@pytest.fixture(scope="module")
def booted(guest_env: Any, record_time: Callable[[str, float], None]) -> dict[str, Any]:
    """iso -> vm.run -> vm.check through the CLI; timings and outputs for the tests below."""
    iso = guest_env.inv("iso")
    assert iso.returncode == 0, iso.stderr
    t0 = time.time()
    run = guest_env.inv("vm.run")
    assert run.returncode == 0, run.stderr
    check = guest_env.check()
    elapsed = time.time() - t0
    assert check.returncode == 0, f"vm.check failed:\n{check.stderr[-6000:]}"
    record = json.loads((guest_env.state_dir / "vm.json").read_text())
    timings = json.loads(check.stdout.strip().splitlines()[-1])
    print(f"\nvm.run + vm.check: {elapsed:.1f}s; {timings}")
    record_time("docker part, unbaked", timings["cloud_init_done_s"])
    return {"run": run, "check": check, "record": record, "timings": timings}


# ------------------------------------------------------------------------------------ the base user-data --
def test_run_and_check_pass(booted: dict[str, Any]) -> None:
    assert "VM started" in booted["run"].stderr
    assert booted["record"]["accel"] == "tcg" and booted["record"]["direct_kernel_boot"] is True
    assert "cloud-init: finished" in booted["check"].stderr
    assert booted["timings"]["cloud_init"] == "done"
    assert booted["timings"]["ssh_ready_s"] > 0


def test_cloud_init_applied_our_user_data(guest_env: Any, booted: dict[str, Any]) -> None:
    """Key login as our user (OpenSSH via vm.ssh), our hostname, our marker file with our instance-id."""
    script = (
        "id -un; hostname; cat /etc/infra-lab/provisioned; sudo -n true && echo sudo-ok; cat /etc/infra-lab/README;"
        " echo; cat /sys/devices/system/clocksource/clocksource0/current_clocksource;"
        " cat /proc/sys/kernel/randomize_va_space"
    )
    result = guest_env.inv("vm.ssh", "--command", script, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ops"
    assert lines[1] == "vmtest-guest"
    instance_id = booted["record"]["instance_id"]
    assert instance_id.startswith("iid-") and lines[2] == instance_id
    assert lines[3] == "sudo-ok"
    assert "provisioned by infra-lab" in result.stdout
    # the test image's kernel command line has tsc=reliable (scripts/build-test-image): the clock is the TSC, not HPET
    assert lines[-2] == "tsc", lines[-3:]
    # and norandmaps: no address-space randomization (TCG reuses its translations across processes)
    assert lines[-1] == "0", lines[-3:]
    # the rendered user-data that went into the ISO names the same user and key
    user_data = (guest_env.state_dir / "user-data").read_text()
    pub = (guest_env.state_dir / "ssh" / "id_ed25519.pub").read_text().split()[1]
    assert "name: ops" in user_data and pub in user_data


def test_password_login_is_refused(guest_env: Any, booted: dict[str, Any]) -> None:
    port = guest_env.settings["vm"]["ports"]["ssh"]["host"]
    proc = subprocess.run(
        ["ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "ops@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 255 and "Permission denied" in proc.stderr


def test_forwards_answer_on_loopback_only(guest_env: Any, booted: dict[str, Any]) -> None:
    pid = booted["record"]["pid"]
    ports = {p["host"] for p in guest_env.settings["vm"]["ports"].values()}
    assert listening(pid) == {("127.0.0.1", p) for p in ports}  # nothing on 0.0.0.0 or ::
    ssh_port = guest_env.settings["vm"]["ports"]["ssh"]["host"]
    with socket.create_connection(("127.0.0.1", ssh_port), timeout=10) as s:
        s.settimeout(30)
        assert s.recv(64).startswith(b"SSH-2.0-")  # the guest's sshd answers through the forward
    # "Not bound elsewhere" is proven by the socket table above (the qemu pid's listening sockets are
    # exactly 127.0.0.1:<forwards>); no connection is attempted to a non-loopback address.


def test_status_reports_the_running_vm(guest_env: Any, booted: dict[str, Any]) -> None:
    result = guest_env.inv("vm.status", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    (info,) = json.loads(result.stdout)[
        "nodes"
    ]  # one VM: one node, named by its host name, no cluster address
    assert info["name"] == "vmtest-guest" and info["cluster_address"] is None
    assert info["running"] is True and info["pid"] == booted["record"]["pid"]
    assert info["accel"] == "tcg" and info["uptime_s"] > 0
    assert info["cloud_init"] == "done"
    logs = guest_env.inv("vm.logs", "--lines", "300")
    assert logs.returncode == 0, logs.stderr
    assert "infra-lab: cloud-init finished" in logs.stdout  # our user-data's final_message, on the console


def test_run_again_is_a_no_op(guest_env: Any, booted: dict[str, Any]) -> None:
    before = (guest_env.state_dir / "vm.json").read_bytes()
    disk_mtime = (guest_env.state_dir / "disk.qcow2").stat().st_mtime_ns
    again = guest_env.inv("vm.run")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr and "nothing changed" in again.stderr
    assert (guest_env.state_dir / "vm.json").read_bytes() == before
    assert guest_env.pid() == booted["record"]["pid"]
    assert (guest_env.state_dir / "disk.qcow2").stat().st_mtime_ns >= disk_mtime  # not recreated


# ---------------------------------------------------------------------------------- the docker part --
def test_vm_check_verifies_docker(booted: dict[str, Any]) -> None:
    assert booted["timings"]["services"] == {"docker": "active"}
    assert "services active: docker" in booted["check"].stderr


def test_login_user_runs_docker_without_sudo(guest_env: Any, booted: dict[str, Any]) -> None:
    out = ssh(guest_env, "id -nG; docker info --format '{{.ServerVersion}} {{.Driver}}'").splitlines()
    assert "docker" in out[0].split()
    version, driver = out[1].split()
    assert version[0].isdigit() and driver == "overlay2"


def test_host_volume_script_creates_owned_dirs_and_is_idempotent(
    guest_env: Any, booted: dict[str, Any]
) -> None:
    listing = (seed.FILES_DIR / "nomad" / "host-volumes").read_bytes()
    script = (seed.FILES_DIR / "scripts" / "30-nomad-volumes.sh").read_bytes()
    install = (
        f"echo {base64.b64encode(listing).decode()} | base64 -d | sudo tee /etc/infra-lab/host-volumes >/dev/null"
        f" && echo {base64.b64encode(script).decode()} | base64 -d > /tmp/30-nomad-volumes.sh"
    )
    # two logins, not four: each login costs the TCG guest CPU (sshd, PAM, a shell); the install runs in the
    # first run's session and the planted file in the second's, each ahead of the script (`&&`)
    first = ssh(guest_env, f"{install} && sudo sh /tmp/30-nomad-volumes.sh")
    assert "created host volume directory /opt/nomad/volumes/kafka" in first
    assert "created host volume directory /opt/nomad/volumes/postgres" in first
    second = ssh(
        guest_env,
        "sudo touch /opt/nomad/volumes/kafka/data-survives && sudo chown 1000 /opt/nomad/volumes/kafka/data-survives"
        " && sudo sh /tmp/30-nomad-volumes.sh;"
        " sudo stat -c '%n %u:%g %a' /opt/nomad/volumes/* /opt/nomad/volumes/kafka/data-survives",
    )
    assert "created" not in second  # existing directories are left alone
    assert "/opt/nomad/volumes/kafka 1000:1000 750" in second
    assert "/opt/nomad/volumes/postgres 0:0 700" in second
    assert "/opt/nomad/volumes/kafka/data-survives 1000:0 644" in second


LEFT_MARK = "==what the installer left=="


def test_nomad_installer_refuses_a_key_with_the_wrong_fingerprint(
    guest_env: Any, booted: dict[str, Any]
) -> None:
    """20-nomad-install.sh, in the guest, given the superseded 2023 HashiCorp key as the embedded key: gpg
    reports its fingerprint, the script refuses (lib.sh pin_key), and no repository or keyring is configured."""
    old_key = (ROOT / "tests" / "fixtures" / "hashicorp-2023-superseded.asc").read_bytes()
    script = (seed.FILES_DIR / "scripts" / "20-nomad-install.sh").read_bytes()
    env = f"NOMAD_VERSION=2.0.7\nHASHICORP_KEY_FPR={pgp.HASHICORP_KEY_FPR}\nHASHICORP_KEY_URL=https://invalid.invalid/gpg\n"
    # one login, not three (each costs the TCG guest CPU): the install (exit 99 if it fails), the script,
    # then what it left, after a marker line; the session exits with the script's own exit code
    install = (
        f"printf '{env}' | sudo tee -a /etc/infra-lab/provision.env >/dev/null"
        f" && echo {base64.b64encode(old_key).decode()} | base64 -d | sudo tee /etc/infra-lab/hashicorp.asc >/dev/null"
        f" && echo {base64.b64encode(script).decode()} | base64 -d > /tmp/20-nomad-install.sh"
    )
    result = guest_env.inv(
        "vm.ssh", "--command",
        f"{install} || exit 99; sudo sh /tmp/20-nomad-install.sh; rc=$?; echo '{LEFT_MARK}';"
        " ls /etc/apt/sources.list.d/ /usr/share/keyrings/; dpkg-query -W nomad 2>&1; exit $rc",
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "/etc/infra-lab/hashicorp.asc holds key(s) [798AEC654E5C15428C8E42EEAA16FCBCA621E701], "
        f"expected exactly [{pgp.HASHICORP_KEY_FPR}]; refusing it"
    ) in result.stderr
    assert (
        f"HashiCorp's key is not exactly the pinned {pgp.HASHICORP_KEY_FPR}; refusing to install"
        in result.stderr
    )
    assert result.stdout.count(LEFT_MARK) == 1, result.stdout
    left = result.stdout.split(LEFT_MARK, 1)[1]
    assert "hashicorp" not in left
    assert "no packages found matching nomad" in left


# ------------------------------------------------------------------------------------- baked image (bake) --
#: What apt prints while installing; the unbaked guest's cloud-init log has it, the baked guest's must not.
INSTALL_LINES = re.compile(r"^(Setting up |Unpacking |Get:[0-9]+ |Reading package lists)", re.M)
PROBE_IMAGE = "infra-lab/bake-probe:1"


#: machine-id, SSH host keys, and the container image made before the bake (Docker Hub is unreachable here:
#: a one-file image, `docker import`ed in the guest).
IDENTITY = f"cat /etc/machine-id /etc/ssh/ssh_host_*_key.pub; docker image inspect --format 'image {{{{.Id}}}}' {PROBE_IMAGE}"


@pytest.fixture(scope="module")
def baked(
    guest_env: Any, booted: dict[str, Any], record_time: Callable[[str, float], None]
) -> dict[str, Any]:
    """Bake THIS guest (`inv image.bake --from-vm`), then boot the bake: no second provisioning."""
    before = ssh(
        guest_env,
        f"sudo grep -cE '{INSTALL_LINES.pattern}' {guest_ssh.CLOUD_INIT_LOG}; mkdir -p /tmp/probe && "
        f"echo baked > /tmp/probe/hello && tar -C /tmp/probe -c . | docker import - {PROBE_IMAGE} >/dev/null; "
        + IDENTITY,
    ).splitlines()
    pid_before = guest_env.pid()
    t0 = time.monotonic()
    made = guest_env.inv("image.bake", "--from-vm", timeout=900)
    bake_s = time.monotonic() - t0
    assert made.returncode == 0, f"image.bake failed:\n{made.stderr[-6000:]}"
    # The bake boots with no route out of the guest (vm.offline): nothing it needs may come from the network.
    guest_env.settings["vm"]["offline"] = True
    guest_env.config_file.write_text(yaml.safe_dump(guest_env.settings))
    run = guest_env.inv("vm.run")
    assert run.returncode == 0, run.stderr
    check = guest_env.check()
    assert check.returncode == 0, f"vm.check of the baked guest failed:\n{check.stderr[-6000:]}"
    timings = json.loads(check.stdout.strip().splitlines()[-1])
    record_time("image.bake --from-vm", bake_s)
    record_time("docker part, baked", timings["cloud_init_done_s"])
    after = ssh(guest_env, f"sudo cat {guest_ssh.CLOUD_INIT_LOG}; echo '---'; " + IDENTITY)
    log, _, identity = after.rpartition("---\n")
    path = Path(made.stdout.strip().splitlines()[-1])
    return {"install_lines_before": int(before[0]), "identity_before": before[1:], "identity": identity.splitlines(),
            "log": log, "path": path, "run": run, "pid_before": pid_before, "check": check, "timings": timings,
            "manifest": json.loads(path.with_suffix(".json").read_text())}  # fmt: skip


def test_the_bake_is_a_compressed_standalone_qcow2_with_its_manifest(baked: dict[str, Any]) -> None:
    path, manifest = baked["path"], baked["manifest"]
    assert path.parent.name == "bakes" and path.stem == manifest["key"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2" and "backing-filename" not in info  # flattened: boots without the base
    assert manifest["size_bytes"] == path.stat().st_size
    assert manifest["packages"]["docker.io"]  # dpkg-query's version of the user-data's packages
    assert manifest["packages"][TREE]
    assert any(line.startswith(f"{PROBE_IMAGE}@") for line in manifest["docker_images"])
    assert manifest["inputs"]["base_image"].startswith("sha256:")


def test_the_baked_guest_boots_from_the_bake_and_installs_nothing(
    guest_env: Any, baked: dict[str, Any]
) -> None:
    key = baked["manifest"]["key"]
    assert f"image: baked image {key}" in baked["run"].stderr
    assert baked["install_lines_before"] > 0  # the unbaked boot installed `tree` through apt
    assert "infra-lab: docker ready" in baked["log"]  # the per-instance runcmd ran (offline)
    assert INSTALL_LINES.findall(baked["log"]) == [], baked["log"]
    status = guest_env.inv("vm.status", timeout=120)
    assert status.returncode == 0 and f"image: baked {key} ({baked['path']})" in status.stderr


def test_the_baked_guest_came_up_with_no_route_out(guest_env: Any, baked: dict[str, Any]) -> None:
    """vm.offline: the mirror the unbaked guest installed from answers the host, not the guest."""
    assert "offline: no route out of the guest" in baked["run"].stderr
    mirror = str(socket.getaddrinfo("deb.debian.org", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    with socket.create_connection((mirror, 80), timeout=10):
        pass  # the host reaches it
    probe = (
        f"timeout 10 bash -c 'echo > /dev/tcp/{mirror}/80' 2>/dev/null && echo reached || echo unreachable"
    )
    assert ssh(guest_env, probe).strip() == "unreachable"


def test_the_baked_guest_has_docker_and_the_image_loaded_before_the_bake(baked: dict[str, Any]) -> None:
    assert baked["timings"]["services"] == {"docker": "active"}
    probe = [line for line in baked["identity"] if line.startswith("image sha256:")]
    assert probe and probe == [line for line in baked["identity_before"] if line.startswith("image ")]


def test_the_baked_guest_has_its_own_identity(baked: dict[str, Any]) -> None:
    machine_id, before_id = baked["identity"][0], baked["identity_before"][0]
    host_keys = {line for line in baked["identity"] if line.startswith("ssh-")}
    before_keys = {line for line in baked["identity_before"] if line.startswith("ssh-")}
    assert len(machine_id) == 32 and len(before_id) == 32 and machine_id != before_id
    assert host_keys and before_keys and not host_keys & before_keys


# ------------------------------------------------------------------------------------ the end of its life --
def test_stop_leaves_no_qemu_process(guest_env: Any, baked: dict[str, Any]) -> None:
    pid = guest_env.pid()  # the guest booted from the bake
    assert pid is not None and pid != baked["pid_before"]
    result = guest_env.inv("vm.stop", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "VM stopped (ACPI power-off" in result.stderr  # the guest shut itself down
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert processes_of(guest_env.state_dir) == []
    assert not (guest_env.state_dir / "qemu.pid").exists()
    assert not (guest_env.state_dir / "qmp.sock").exists()
    again = guest_env.inv("vm.stop")
    assert again.returncode == 0 and "not running" in again.stderr


def test_destroy_leaves_no_state(guest_env: Any, test_image: dict[str, str], baked: dict[str, Any]) -> None:
    result = guest_env.inv("vm.destroy", timeout=120)
    assert result.returncode == 0, result.stderr
    assert not guest_env.state_dir.exists(), sorted(p.name for p in guest_env.state_dir.iterdir())
    assert Path(test_image["image"]).is_file()  # the image cache is kept, and the bake with it
    assert baked["path"].is_file()

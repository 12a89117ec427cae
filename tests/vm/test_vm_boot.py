"""Boot a real VM through the real `inv` CLI: iso -> vm.run -> vm.check -> vm.stop -> vm.destroy.

The image is Debian 12 built here by scripts/build-test-image (Debian's packages only), booted under TCG
with direct kernel boot, 2 vCPU / 2 GiB, on free ports; Nomad and Docker provisioning are off (HashiCorp's
repository is unreachable here), so the user-data is the base part + the final marker. The tests run in
file order on one VM (module-scoped `booted`); the conftest stops it by pid if a test fails half-way.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(900),
    pytest.mark.tools("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "ssh"),
]


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket `pid` listens on, IPv4 and IPv6 (via /proc fd inodes)."""
    inodes = {
        os.readlink(fd)[8:-1]
        for fd in Path(f"/proc/{pid}/fd").iterdir()
        if os.readlink(fd).startswith("socket:[")
    }
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            if family == socket.AF_INET:
                ip = socket.inet_ntop(family, raw[::-1])
            else:  # four little-endian 32-bit words
                ip = socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
            found.add((ip, int(port, 16)))
    return found


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def booted(vm_env: Any, boot_times: dict[str, float]) -> dict[str, Any]:
    """iso -> vm.run -> vm.check through the CLI; timings and outputs for the tests below."""
    iso = vm_env.inv("iso")
    assert iso.returncode == 0, iso.stderr
    t0 = time.time()
    run = vm_env.inv("vm.run")
    assert run.returncode == 0, run.stderr
    check = vm_env.inv("vm.check")
    elapsed = time.time() - t0
    assert check.returncode == 0, f"vm.check failed:\n{check.stderr[-6000:]}"
    record = json.loads((vm_env.state_dir / "vm.json").read_text())
    timings = json.loads(check.stdout.strip().splitlines()[-1])
    print(f"\nvm.run + vm.check: {elapsed:.1f}s; {timings}")
    boot_times["base user-data"] = timings["cloud_init_done_s"]
    return {"run": run, "check": check, "record": record, "timings": timings}


def test_run_and_check_pass(booted: dict[str, Any]) -> None:
    assert "VM started" in booted["run"].stderr
    assert booted["record"]["accel"] == "tcg" and booted["record"]["direct_kernel_boot"] is True
    assert "cloud-init: finished" in booted["check"].stderr
    assert booted["timings"]["cloud_init"] == "done"
    assert booted["timings"]["ssh_ready_s"] > 0


def test_cloud_init_applied_our_user_data(vm_env: Any, booted: dict[str, Any]) -> None:
    """Key login as our user (OpenSSH via vm.ssh), our hostname, our marker file with our instance-id."""
    script = "id -un; hostname; cat /etc/infra-lab/provisioned; sudo -n true && echo sudo-ok; cat /etc/infra-lab/README"
    result = vm_env.inv("vm.ssh", "--command", script, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ops"
    assert lines[1] == "vmtest-1"
    instance_id = booted["record"]["instance_id"]
    assert instance_id.startswith("iid-") and lines[2] == instance_id
    assert lines[3] == "sudo-ok"
    assert "provisioned by infra-lab" in result.stdout
    # the rendered user-data that went into the ISO names the same user and key
    user_data = (vm_env.state_dir / "user-data").read_text()
    pub = (vm_env.state_dir / "ssh" / "id_ed25519.pub").read_text().split()[1]
    assert "name: ops" in user_data and pub in user_data


def test_password_login_is_refused(vm_env: Any, booted: dict[str, Any]) -> None:
    port = vm_env.settings["vm"]["ports"]["ssh"]["host"]
    proc = subprocess.run(
        ["ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "ops@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 255 and "Permission denied" in proc.stderr


def test_forwards_answer_on_loopback_only(vm_env: Any, booted: dict[str, Any]) -> None:
    pid = booted["record"]["pid"]
    ports = {p["host"] for p in vm_env.settings["vm"]["ports"].values()}
    assert listening(pid) == {("127.0.0.1", p) for p in ports}  # nothing on 0.0.0.0 or ::
    ssh_port = vm_env.settings["vm"]["ports"]["ssh"]["host"]
    with socket.create_connection(("127.0.0.1", ssh_port), timeout=10) as s:
        s.settimeout(30)
        assert s.recv(64).startswith(b"SSH-2.0-")  # the guest's sshd answers through the forward
    # "Not bound elsewhere" is proven by the socket table above (the qemu pid's listening sockets are
    # exactly 127.0.0.1:<forwards>); no connection is attempted to a non-loopback address.


def test_status_reports_the_running_vm(vm_env: Any, booted: dict[str, Any]) -> None:
    result = vm_env.inv("vm.status", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["running"] is True and info["pid"] == booted["record"]["pid"]
    assert info["accel"] == "tcg" and info["uptime_s"] > 0
    assert info["cloud_init"] == "done"
    logs = vm_env.inv("vm.logs", "--lines", "300")
    assert logs.returncode == 0, logs.stderr
    assert "infra-lab: cloud-init finished" in logs.stdout  # our user-data's final_message, on the console


def test_run_again_is_a_no_op(vm_env: Any, booted: dict[str, Any]) -> None:
    before = (vm_env.state_dir / "vm.json").read_bytes()
    disk_mtime = (vm_env.state_dir / "disk.qcow2").stat().st_mtime_ns
    again = vm_env.inv("vm.run")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr and "nothing changed" in again.stderr
    assert (vm_env.state_dir / "vm.json").read_bytes() == before
    assert vm_env.pid() == booted["record"]["pid"]
    assert (vm_env.state_dir / "disk.qcow2").stat().st_mtime_ns >= disk_mtime  # not recreated


def test_stop_leaves_no_qemu_process(vm_env: Any, booted: dict[str, Any]) -> None:
    pid = booted["record"]["pid"]
    result = vm_env.inv("vm.stop", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "VM stopped (ACPI power-off" in result.stderr  # the guest shut itself down
    state = process_state(pid)
    assert state in ("gone", "Z"), f"qemu pid {pid} still running (state {state})"  # Z: exited, not reaped
    assert not any(
        b"qemu-system" in cmdline(p) and str(vm_env.state_dir).encode() in cmdline(p) for p in pids()
    )
    assert not (vm_env.state_dir / "qemu.pid").exists()
    assert not (vm_env.state_dir / "qmp.sock").exists()
    again = vm_env.inv("vm.stop")
    assert again.returncode == 0 and "not running" in again.stderr


def test_destroy_leaves_no_state(vm_env: Any, test_image: dict[str, str]) -> None:
    result = vm_env.inv("vm.destroy", timeout=120)
    assert result.returncode == 0, result.stderr
    assert not vm_env.state_dir.exists(), sorted(p.name for p in vm_env.state_dir.iterdir())
    assert Path(test_image["image"]).is_file()  # the image cache is kept

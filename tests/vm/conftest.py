"""Fixtures of the VM tier: a Debian test image built here, booted under TCG through the real `inv` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers.common import vm_ports

from infra import ROOT

# ------------------------------------------------------------------------------------- VM tier (marker vm) --
# A Debian 12 image built here from Debian's packages (scripts/build-test-image, cached by content key),
# booted under TCG with direct kernel boot through the real `inv` CLI; Nomad and Docker provisioning off
# (HashiCorp's repository is unreachable here). Everything the VM writes lives in a tmp state dir; the
# qemu process is stopped by its pid at the end even when a test failed half-way.

INV = str(Path(sys.executable).with_name("inv"))


@pytest.fixture(scope="session")
def test_image() -> dict[str, str]:
    """Build (or reuse from the cache) the Debian test image; its image/kernel/initrd paths and append."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build-test-image"), "--json"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"scripts/build-test-image failed:\n{proc.stderr[-4000:]}"
    image: dict[str, str] = json.loads(proc.stdout)
    return image


@dataclass
class VMEnv:
    root: Path  # the tmp dir holding the config file and the state dir
    config_file: Path
    state_dir: Path
    settings: dict[str, Any]

    def inv(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """The real `inv` CLI with our -f config file, as a user runs it."""
        return subprocess.run(
            [INV, "-f", str(self.config_file), *args],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def pid(self) -> int | None:
        try:
            return int((self.state_dir / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def make_vm_env(test_image: dict[str, str], root: Path, provision: dict[str, Any]) -> VMEnv:
    """A -f config file: the test image with direct kernel boot, TCG, 2 vCPU / 2 GiB, free ports, tmp state."""
    ports = vm_ports()
    settings: dict[str, Any] = {
        # cache_dir: bakes (infra/bake.py) land in this test's own cache, never in the user's
        "project": {"state_dir": str(root / "state"), "cache_dir": str(root / "cache")},
        "provision": provision,
        "vm": {
            "image": test_image["image"], "kernel": test_image["kernel"], "initrd": test_image["initrd"],
            "append": test_image["append"], "accel": "tcg", "cpus": 2, "memory_mb": 2048, "disk_gb": 4,
            "ssh_timeout": 300, "cloud_init_timeout": 600, "stop_timeout": 60,
            "ports": ports,
        },
    }  # fmt: skip
    config_file = root / "vm-test.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    return VMEnv(root, config_file, root / "state", settings)


def stop_by_pid(env: VMEnv) -> None:
    """After the module: a VM that a failed test left running is stopped, by its pid."""
    pid = env.pid()
    if pid is not None and Path(f"/proc/{pid}").exists():
        env.inv("vm.stop", "--timeout", "10", timeout=60)
        if Path(f"/proc/{pid}/cmdline").exists() and b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def vm_env(test_image: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMEnv]:
    """Docker and Nomad provisioning off: the base user-data only (boots in about a minute)."""
    provision = {"nomad": False, "docker": False, "hostname": "vmtest-1"}
    env = make_vm_env(test_image, tmp_path_factory.mktemp("vm"), provision)
    yield env
    stop_by_pid(env)


@pytest.fixture(scope="module")
def docker_vm_env(test_image: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMEnv]:
    """The docker part of the user-data on: the guest installs docker.io (and gnupg, through
    provision.packages) from Debian's mirror (~2 min)."""
    provision = {"nomad": False, "docker": True, "hostname": "vmtest-2", "packages": ["gnupg"]}
    env = make_vm_env(test_image, tmp_path_factory.mktemp("vmdocker"), provision)
    yield env
    stop_by_pid(env)


#: Seconds from launch to cloud-init done, per guest booted in this run; printed at the end of the run.
BOOT_TIMES: dict[str, float] = {}


@pytest.fixture(scope="session")
def boot_times() -> dict[str, float]:
    """Launch -> cloud-init done per guest of this run (the bake compares its boot with the others)."""
    return BOOT_TIMES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The boots of this run side by side, with the baked guest's ratio to the others (not a timed test)."""
    if not BOOT_TIMES:
        return
    terminalreporter.section("VM boots: launch -> cloud-init done")
    baked = BOOT_TIMES.get("docker part, baked")
    for name, seconds in BOOT_TIMES.items():
        ratio = f"   (baked / this: {baked / seconds:.2f}x)" if baked and name != "docker part, baked" else ""
        terminalreporter.write_line(f"{name:<24} {seconds:7.1f} s{ratio}")


@pytest.fixture
def fresh_vm_env(test_image: dict[str, str], tmp_path: Path) -> Iterator[VMEnv]:
    """A VM env of its own for one test (provisioning off), stopped by pid afterwards."""
    env = make_vm_env(test_image, tmp_path, {"nomad": False, "docker": False})
    yield env
    stop_by_pid(env)

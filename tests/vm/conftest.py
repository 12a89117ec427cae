"""Fixtures of the VM tier: a Debian test image built here, booted under TCG through the real `inv` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.servers.common import vm_ports

from infra import ROOT

# ------------------------------------------------------------------------------------- VM tier (marker vm) --
# A Debian 12 image built here from Debian's packages (scripts/build-test-image, cached by content key),
# booted under TCG with direct kernel boot through the real `inv` CLI; the nomad part of the user-data off
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

    def check(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`inv vm.check`, guarded by more than its own two waits together (SSH, then cloud-init: a guard of
        900 s killed the docker guest's vm.check at a load of ~30 while its cloud-init wait still had time)."""
        vm = self.settings["vm"]
        return self.inv("vm.check", *args, timeout=vm["ssh_timeout"] + vm["cloud_init_timeout"] + 300)

    def pid(self) -> int | None:
        try:
            return int((self.state_dir / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def make_vm_env(test_image: dict[str, str], root: Path, provision: dict[str, Any]) -> VMEnv:
    """A -f config file: the test image with direct kernel boot, TCG, 1 vCPU / 2 GiB, free ports, tmp state.

    One vCPU: the tier's guests share two cores with each other and with the other tiers, and a 2-vCPU guest
    under TCG spends more CPU on the same boot without finishing sooner. Measured: two docker guests booted
    side by side beside two busy loops took 251 qemu CPU-s with 2 vCPUs, 205 with 1, cloud-init done at about
    the same time (apt-get install 188 s and 181 s). Most likely, not measured: the vCPUs spin waiting on each
    other, on IPIs and on locks held by a vCPU the host has descheduled.

    The waits are hang guards for real events, not verdicts: beside other work a TCG guest runs several
    times slower (a fresh-clone run under a load of ~12 saw the docker guest need 141 s for SSH and more
    than 600 s for cloud-init's docker.io install, which took ~110 s on a quiet machine, when the guest
    still installed it)."""
    ports = vm_ports()
    settings: dict[str, Any] = {
        # cache_dir: bakes (infra/compose/bake.py) land in this test's own cache, never in the user's
        "project": {"state_dir": str(root / "state"), "cache_dir": str(root / "cache")},
        "provision": provision,
        "vm": {
            "image": test_image["image"], "kernel": test_image["kernel"], "initrd": test_image["initrd"],
            "append": test_image["append"], "accel": "tcg", "cpus": 1, "memory_mb": 2048, "disk_gb": 4,
            "ssh_timeout": 900, "cloud_init_timeout": 1800, "stop_timeout": 60,
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


#: The package the docker guest installs through cloud-init from Debian's mirror: small, one dependency (libc6),
#: not in the test image.
TREE = "tree"


@pytest.fixture(scope="module")
def guest_env(test_image: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMEnv]:
    """The tier's one provisioned guest: the base user-data and the docker part. The test image carries the
    docker part's package (docker.io, disabled: scripts/build-test-image says why) and gnupg (the nomad part's
    installer needs it); `tree`, through provision.packages, is one that cloud-init really installs from
    Debian's mirror (apt-get update, download, dpkg), as it would docker.io on a cloud image."""
    provision = {"nomad": False, "docker": True, "hostname": "vmtest-guest", "packages": ["gnupg", TREE]}
    env = make_vm_env(test_image, tmp_path_factory.mktemp("guest"), provision)
    yield env
    stop_by_pid(env)


#: Seconds per step of this run, printed at the end: launch -> cloud-init done per guest boot, and the bake.
BOOT_TIMES: dict[str, float] = {}
UNBAKED, BAKED, BAKE = "docker part, unbaked", "docker part, baked", "image.bake --from-vm"


@pytest.fixture(scope="session")
def record_time() -> Callable[[str, float], None]:
    """Record a step's seconds (one of UNBAKED, BAKED, BAKE) for the summary at the end of the run."""

    def record(step: str, seconds: float) -> None:
        assert step in (UNBAKED, BAKED, BAKE), f"unknown step {step!r}"
        BOOT_TIMES[step] = seconds

    return record


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker: hand this worker's times to the controller, which prints the summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["boot_times"] = json.dumps(BOOT_TIMES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """In the xdist controller: collect a worker's times."""
    BOOT_TIMES.update(json.loads(getattr(node, "workeroutput", {}).get("boot_times", "{}")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The steps of this run side by side, with the baked boot's ratio to the unbaked one (printed, not
    asserted: a timing is a measurement, not a test)."""
    if not BOOT_TIMES:
        return
    terminalreporter.section("VM tier: launch -> cloud-init done, and the bake")
    notes = {BAKE: "generalize, power off, compress; not a boot"}
    if UNBAKED in BOOT_TIMES and BAKED in BOOT_TIMES:
        notes[BAKED] = f"baked / unbaked: {BOOT_TIMES[BAKED] / BOOT_TIMES[UNBAKED]:.2f}x"
    for name, seconds in BOOT_TIMES.items():
        note = f"   ({notes[name]})" if name in notes else ""
        terminalreporter.write_line(f"{name:<24} {seconds:7.1f} s{note}")


@pytest.fixture
def fresh_vm_env(test_image: dict[str, str], tmp_path: Path) -> Iterator[VMEnv]:
    """A VM env of its own for one test (provisioning off), stopped by pid afterwards."""
    env = make_vm_env(test_image, tmp_path, {"nomad": False, "docker": False})
    yield env
    stop_by_pid(env)

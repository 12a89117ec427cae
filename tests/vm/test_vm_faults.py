"""A guest that cannot boot, for real: `inv vm.check` stops at the fatal console line instead of waiting out
vm.ssh_timeout.

The test image's own kernel boots under TCG on a blank disk: with an empty initrd the kernel panics at once
(no root device); with the image's real initramfs it gives up waiting for `LABEL=rootfs` and drops to the
`(initramfs)` shell. Either way SSH never comes, and the wait must say why, with the console excerpt.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(600),
    pytest.mark.tools("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs"),
]

CASES = [
    ("empty-initrd", True, r"Kernel panic - not syncing: VFS: Unable to mount root fs"),
    ("initramfs-without-root", False, r"ALERT!\s+LABEL=rootfs does not exist\.\s+Dropping to a shell!"),
]


@pytest.mark.parametrize(("empty_initrd", "line"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_disk_that_cannot_boot_ends_the_wait_at_once(
    fresh_vm_env: Any, tmp_path: Path, empty_initrd: bool, line: str
) -> None:
    env = fresh_vm_env
    blank = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "1G"], check=True)
    env.settings["vm"]["image"] = str(blank)
    if empty_initrd:
        (tmp_path / "empty.initrd").write_bytes(b"")
        env.settings["vm"]["initrd"] = str(tmp_path / "empty.initrd")
    # else: initramfs-tools waits max(30, rootdelay) seconds for the root device before it gives up
    # (scripts/local, local_device_setup): half a minute of an idle guest, little CPU.
    env.config_file.write_text(yaml.safe_dump(env.settings))
    run = env.inv("vm.run")
    assert run.returncode == 0, run.stderr
    # vm.ssh_timeout is 900 s (conftest): a wait that missed the console line would run into it (exit 2,
    # "timed out ... waiting for SSH") or into this test's own 600 s guard, so the exit code and the message
    # show it ended at the console line (no stopwatch)
    check = env.check()
    assert check.returncode == 1, check.stderr
    assert "timed out" not in check.stderr, check.stderr
    first = check.stderr.split("error: ", 1)[1].splitlines()[0]
    assert first.startswith("the guest cannot boot; its serial console says: "), check.stderr
    assert re.search(line, first), check.stderr
    assert f"log: {env.state_dir / 'serial.log'}" in check.stderr
    assert "serial: " in check.stderr  # the console excerpt
    assert env.settings["vm"]["ssh_timeout"] >= 300  # the premise above
    stopped = env.inv("vm.stop", "--timeout", "0")
    assert stopped.returncode == 0, stopped.stderr

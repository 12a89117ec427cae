"""infra.vm: port checks, pidfile handling, and the lifecycle against the real qemu.

The lifecycle tests start the real qemu-system-x86_64 on a blank disk (no OS: the VM sits in its
firmware), which is enough to exercise launch, the pidfile, QMP, idempotent `run`, `stop` falling back to
a kill when the guest ignores ACPI, and `destroy`. Booting a real guest is tests/vm.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from infra import config, vm
from infra.state import StatePaths


def test_recycled_pid_is_not_our_qemu(tmp_path: Path) -> None:
    """A pidfile naming a live process that is not our qemu (pid reuse) does not count as running."""
    state = StatePaths(tmp_path)
    state.pidfile.write_text(str(os.getpid()))
    assert vm.running_pid(state) is None


def test_garbage_pidfile(tmp_path: Path) -> None:
    state = StatePaths(tmp_path)
    state.pidfile.write_text("not a pid")
    assert vm.running_pid(state) is None
    assert vm.clear_stale(state) and not state.pidfile.exists()


def test_stop_without_vm_removes_stale_files(make_cfg: Callable[..., config.Config]) -> None:
    cfg = make_cfg()
    state = vm.paths(cfg)
    state.root.mkdir(parents=True)
    state.pidfile.write_text("999999999")
    assert vm.stop(cfg) is False
    assert not state.pidfile.exists()


def test_fatal_console_lines_are_recognised(tmp_path: Path) -> None:
    """Lines after which a guest never reaches SSH end the waits early; an ordinary boot log does not."""
    log = tmp_path / "serial.log"
    log.write_text(
        "[    0.000000] Linux version 6.1.0-28-cloud-amd64\n"
        "[    2.1] EXT4-fs (vda1): mounted filesystem with ordered data mode\n"
        "[  OK  ] Reached target Emergency Shell preparation skipped.\n"
        "Begin: Mounting root file system ... done.\n"
    )
    assert vm.fatal_console_line(log) is None
    assert vm.fatal_console_line(tmp_path / "absent.log") is None
    for line, expected in (
        ("\x1b[0;31mKernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\x1b[0m",
         "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"),
        ("ALERT!  /dev/vda1 does not exist.  Dropping to a shell!", "ALERT!  /dev/vda1 does not exist.  Dropping to a shell!"),
        ("(initramfs) ", "(initramfs)"),
        ("Failed to mount /dev/vda1 on /root: Invalid argument", "Failed to mount /dev/vda1 on /root: Invalid argument"),
        ("You are in emergency mode. After logging in, type \"journalctl -xb\"", "You are in emergency mode. After logging in, type \"journalctl -xb\""),
    ):  # fmt: skip
        with log.open("a") as f:
            f.write(line + "\r\n")
        found = vm.fatal_console_line(log)
        assert found is not None and found.startswith(expected.split(":")[0]), (line, found)
        log.write_text("")

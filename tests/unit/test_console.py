"""infra.guest.console: the serial log's fatal lines."""

from __future__ import annotations

from pathlib import Path

from infra.guest import console


def test_fatal_console_lines_are_recognised(tmp_path: Path) -> None:
    """Lines after which a guest never reaches SSH end the waits early; an ordinary boot log does not."""
    log = tmp_path / "serial.log"
    log.write_text(
        "[    0.000000] Linux version 6.1.0-28-cloud-amd64\n"
        "[    2.1] EXT4-fs (vda1): mounted filesystem with ordered data mode\n"
        "[  OK  ] Reached target Emergency Shell preparation skipped.\n"
        "Begin: Mounting root file system ... done.\n"
    )
    assert console.fatal_console_line(log) is None
    assert console.fatal_console_line(tmp_path / "absent.log") is None
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
        found = console.fatal_console_line(log)
        assert found is not None and found.startswith(expected.split(":")[0]), (line, found)
        log.write_text("")

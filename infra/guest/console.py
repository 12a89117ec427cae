"""The VM's serial console log: its tail, following it, and the lines after which a guest never boots."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

#: ANSI colour codes of systemd's console output.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

#: Serial-console lines after which a guest never reaches SSH: waits stop at once instead of timing out.
FATAL_CONSOLE = re.compile(
    r"Kernel panic - not syncing.*|VFS: Unable to mount root fs.*|Failed to mount /dev/\S+.*"
    r"|ALERT!.*does not exist.*|Dropping to a shell.*|^\(initramfs\).*|You are in emergency mode.*",
    re.M,
)


def _clean(text: str) -> str:
    return _ANSI.sub("", text).replace("\r", "")


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of the log ([] when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return _clean(text).splitlines()[-lines:] if lines > 0 else []


def fatal_console_line(path: Path) -> str | None:
    """The first line of the serial log that says the guest cannot boot, if any."""
    match = FATAL_CONSOLE.search("\n".join(tail(path, 2000)))
    return match.group(0).strip() if match else None


#: What a Linux guest writes on its console when it restarts in the same qemu (`reboot` in the guest): the
#: kernel's shutdown line, and a new kernel's banner.
REBOOT = re.compile(rb"reboot: (?:Restarting system|machine restart)|Linux version \d")


def size(path: Path) -> int:
    """How long the log is now (0 when absent)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def rebooted_since(path: Path, offset: int) -> bool:
    """Has the guest restarted since the log was `offset` bytes long? True when the console shows a restart
    or a kernel starting after that point, or when the log is shorter than that (another log)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < offset:
                return True
            f.seek(offset)
            return REBOOT.search(f.read()) is not None
    except OSError:
        return True


def follow(path: Path, lines: int) -> Iterator[str]:
    """tail -f: the last `lines`, then new lines as they come (until the caller stops iterating)."""
    yield from tail(path, lines)
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        buf = b""
        while True:
            chunk = f.read()
            if not chunk:
                time.sleep(0.5)
                continue
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for line in complete:
                yield _clean(line.decode(errors="replace"))


__all__ = ["FATAL_CONSOLE", "REBOOT", "fatal_console_line", "follow", "rebooted_since", "size", "tail"]

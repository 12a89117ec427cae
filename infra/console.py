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


__all__ = ["FATAL_CONSOLE", "fatal_console_line", "follow", "tail"]

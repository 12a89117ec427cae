"""Shared checks of the bad-input battery (tests/component/test_bad_input_*.py): one `error:` line and
nothing left behind.

A failure must print `error: <message>` (plus optional `hint:`/detail lines), never a traceback, exit
non-zero, and leave no temporary file, partial download, probe file or process behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

#: The two ways `inv` can run: the installed script (infra/cli.py's Program, when pip installed it last)
#: and invoke's own Program (`python -m invoke`; what runs when an installer such as uv left invoke's `inv`
#: script in place), which tasks.py adopts. CLI cases of the battery run through both.
PROGRAMS = {
    "inv": (str(Path(sys.executable).with_name("inv")),),
    "invoke-module": (sys.executable, "-m", "invoke"),
}

#: In a case's files: make a named pipe (FIFO) there, with no writer.
FIFO = b"<fifo>"

#: Names a failed write or download may leave behind: none may survive a failure.
TEMP_MARKERS = (".tmp", ".part", ".write-probe-")


def assert_one_error(stderr: str, phrase: str) -> str:
    """stderr holds exactly one `error:` line, containing `phrase`, and no traceback; returns the line."""
    assert "Traceback (most recent call last)" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line, got: {stderr!r}"
    assert phrase in errors[0], f"{phrase!r} not in {errors[0]!r}"
    return errors[0]


def make_files(root: Path, files: dict[str, bytes]) -> None:
    """A case's input files under `root` (relative name -> content; FIFO makes a named pipe)."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data == FIFO:
            os.mkfifo(path)
        else:
            path.write_bytes(data)


def temp_leftovers(root: Path) -> list[str]:
    """Temporary files (see TEMP_MARKERS) anywhere under `root`."""
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if any(m in p.name for m in TEMP_MARKERS))


def files_under(root: Path) -> list[str]:
    """Every file under `root` (relative), for "nothing was created" checks."""
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


@contextlib.contextmanager
def unwritable_dir(path: Path) -> Iterator[Path]:
    """A directory nobody may create files in, for the duration: mode 0555, and for root (whom modes do
    not stop) the immutable attribute as well (chattr +i; fails the test if the filesystem refuses it)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    try:
        probe = path / "probe"
        with contextlib.suppress(OSError):
            probe.touch()
        assert not probe.exists(), f"{path} is still writable: the test cannot model an unwritable directory"
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)
        path.chmod(0o755)


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "1m", *, full: bool = False) -> Iterator[Path]:
    """A real filesystem of `size` mounted at `path` (tmpfs; the suite runs as root here and in CI), for
    "disk full" cases: `full` fills it first. Unmounted afterwards, whatever the test left in it."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)  # fmt: skip
    try:
        if full:
            fill_up(path)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True)


def fill_up(root: Path) -> None:
    """Fill the filesystem of `root` with `root/filler` until it is full (ENOSPC)."""
    with contextlib.suppress(OSError), (root / "filler").open("wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()

"""One VM lifecycle command at a time per state dir: an exclusive `flock` on <state>/vm.lock.

`vm.run`, `vm.stop` and `vm.destroy` (and `up`/`down` through them) hold it while they launch, kill or delete.
A second command waits for it on one live line, up to `vm.lock_timeout`, then names the holder (pid and
command, written into the lock file by whoever holds it). The kernel releases a flock when its holder exits,
however it exits, so a crashed command never leaves the state dir locked.

The file is removed only by its holder (vm.destroy, or a command that found no state dir and leaves none):
a waiter that then gets the lock on the unlinked file notices (the path no longer names its inode) and locks
the new file instead, so two holders never coexist.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from infra.core import files
from infra.core.errors import VMError, WaitTimeout
from infra.core.state import StatePaths
from infra.core.waits import Probe, wait_until
from infra.vm import host


class StateLocked(VMError):
    """Another lifecycle command held the state dir's lock for longer than vm.lock_timeout."""

    exit_code = 2


def holder(path: Path) -> str:
    """'pid 1234 (vm.run, for 12s)' from the lock file, or why it is unknown."""
    try:
        info = json.loads(path.read_text())
        pid, what, since = int(info["pid"]), str(info["what"]), float(info["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another command (holder not recorded yet)"
    alive = host.alive(pid)
    return f"pid {pid} ({what}, for {time.time() - since:.0f}s)" + ("" if alive else ", exiting")


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on the file now at `path`, or None when another process holds it."""
    fd = files.open_nofollow(path, "VM lock file", os.O_RDWR | os.O_CREAT, mode=0o600, error=VMError)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # the previous holder removed the file after we opened it: lock the current one instead
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def state_lock(state: StatePaths, what: str, timeout: float) -> Iterator[None]:
    """Hold the state dir's lifecycle lock for `what` (e.g. "vm.run"); wait up to `timeout` for it."""
    created = [not state.root.exists()]
    path = state.lock
    if state.root.exists() and not state.root.is_dir():
        raise VMError(
            f"project.state_dir {state.root} is not a directory",
            hint="point project.state_dir at a directory (it is created when missing)",
        )
    state.claim()  # the tool's own dir (marker), before the lock file is made in it
    try:
        fd = _try_lock(path)
    except OSError as exc:
        raise VMError(
            f"cannot lock the state dir {state.root} ({path.name}): {exc.strerror or exc}",
            hint="project.state_dir must be a directory this user can write",
        ) from exc
    if fd is None:
        got: list[int] = []

        def probe(_deadline: object) -> Probe[None]:
            try:
                lock_fd = _try_lock(path) if state.root.is_dir() else None
            except FileNotFoundError:  # the state dir went away between the check and the open
                lock_fd = None
            if lock_fd is not None:
                got.append(lock_fd)
                return Probe(True, "acquired")
            if not state.root.is_dir():  # removed by a vm.destroy that held the lock: recreate and retry
                state.claim()
                created[0] = True
            return Probe(False, f"held by {holder(path)}")

        try:
            wait_until(
                probe, what=f"the VM lock {path} (another lifecycle command)", timeout=timeout, interval=0.2
            )
        except WaitTimeout as exc:
            raise StateLocked(
                f"{what}: the state dir {state.root} is locked by {holder(path)}; waited {timeout:.0f}s",
                hint="wait for that command to finish (or stop it); the lock is released when it exits. "
                "vm.lock_timeout sets how long to wait",
            ) from exc
        fd = got[0]
    try:
        os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):  # who holds it is for messages only: a full disk still locks
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "what": what, "since": time.time()}).encode(), 0)
        yield
    finally:
        _release(state, fd, created[0])


def _release(state: StatePaths, fd: int, created_root: bool) -> None:
    """Unlock; a state dir this command created and that holds nothing but the lock is removed again."""
    try:
        if state.root.is_dir():
            if created_root and {p.name for p in state.root.iterdir()} <= {
                state.lock.name,
                state.marker.name,
            }:
                state.lock.unlink()
                state.marker.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    state.root.rmdir()
            else:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the last fd releases the flock

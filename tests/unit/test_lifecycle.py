"""infra.vm.lifecycle without qemu: pidfile handling (the lifecycle against the real qemu is tests/component/test_lifecycle.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from infra.core import config
from infra.core.state import StatePaths
from infra.vm import instance, lifecycle


def test_recycled_pid_is_not_our_qemu(tmp_path: Path) -> None:
    """A pidfile naming a live process that is not our qemu (pid reuse) does not count as running."""
    state = StatePaths(tmp_path)
    state.pidfile.write_text(str(os.getpid()))
    assert instance.running_pid(state) is None


def test_garbage_pidfile(tmp_path: Path) -> None:
    state = StatePaths(tmp_path)
    state.pidfile.write_text("not a pid")
    assert instance.running_pid(state) is None
    assert instance.clear_stale(state) and not state.pidfile.exists()


def test_stop_without_vm_removes_stale_files(make_cfg: Callable[..., config.Config]) -> None:
    cfg = make_cfg()
    state = StatePaths.of(cfg)
    state.root.mkdir(parents=True)
    state.pidfile.write_text("999999999")
    assert lifecycle.stop(cfg) is False
    assert not state.pidfile.exists()

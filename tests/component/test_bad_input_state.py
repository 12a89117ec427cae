"""Bad-input battery, the state dir (issue 23, items 1, 10, 11): links planted in it, a directory that is not
the tool's own, records of the wrong shape. Each case runs the real `inv` and asserts the exit code, the one
`error:` line naming the path (and a link's owner), and that nothing outside was touched: a link's target
keeps its content and mode, a foreign directory keeps its files, no temporary file or process is left.

The policy (README, Security): links are never followed where the tool writes. The state dir itself may be a
link of yours or root's (resolved once); one owned by anyone else is refused, and so is every link inside it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.badinput import (
    assert_one_error,
    fill_up,
    small_filesystem,
    temp_leftovers,
)
from support.doubles.nomad_api import NomadAPIDouble
from support.jobs import web_job
from support.servers.common import processes_of

from infra.core import state
from infra.guest import keys

PRECIOUS = b"precious: must not change\n"
NOBODY = 65534


@dataclass
class World:
    tmp: Path

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def outside(self) -> Path:
        """Files a planted link points at: their content and modes are checked after every case."""
        return self.tmp / "outside"

    def snapshot(self) -> dict[str, tuple[int, bytes]]:
        out = {}
        for path in sorted(self.outside.rglob("*")):
            st = path.lstat()
            out[str(path)] = (stat.S_IMODE(st.st_mode), path.read_bytes() if path.is_file() else b"")
        return out

    def link(self, name: str, target: Path) -> None:
        path = self.state / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.outside.mkdir()
    (w.outside / "v").write_bytes(PRECIOUS)
    (w.outside / "v").chmod(0o640)
    (w.outside / "pub").mkdir()
    (w.outside / "pub").chmod(0o1777)  # like /tmp
    return w


def _lock_link(w: World) -> None:
    w.link(state.LOCK, w.outside / "v")


def _ssh_dir_link(w: World) -> None:
    w.state.mkdir()
    w.link(state.SSH_DIR, w.outside / "pub")


def _private_key_link(w: World) -> None:
    pair = keys.ensure_generated(state.StatePaths(w.tmp / "keysrc"))  # a valid public half beside the link
    (w.state / state.SSH_DIR).mkdir(parents=True, mode=0o700)
    (w.state / state.SSH_DIR / (state.SSH_KEY + ".pub")).write_text(pair.public + "\n")
    w.link(f"{state.SSH_DIR}/{state.SSH_KEY}", w.outside / "v")


def _user_data_link(w: World) -> None:
    w.link(state.USER_DATA, w.outside / "v")


def _serial_log_link(w: World) -> None:
    w.link(state.SERIAL_LOG, w.outside / "v")


def _state_dir_link_of_another_user(w: World) -> None:
    w.state.symlink_to(w.outside / "pub")
    os.lchown(w.state, NOBODY, NOBODY)


def _foreign_dir(w: World) -> None:
    w.state.mkdir()
    (w.state / "notes.txt").write_text("mine\n")
    (w.state / state.USER_DATA).write_text("#cloud-config\n")
    (w.state / state.SSH_DIR).mkdir()
    (w.state / state.SSH_DIR / "id_ed25519").write_text("a key of someone's\n")


def _record_null(w: World) -> None:
    w.state.mkdir()
    (w.state / state.VM_RECORD).write_text("null\n")


def _record_wrong_shape(w: World) -> None:
    w.state.mkdir()
    (w.state / state.VM_RECORD).write_text(json.dumps({"pid": "12", "ports": {"ssh": 22}}))


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[World], None]
    args: tuple[str, ...]
    phrase: str  # in the one `error:` line; "{tmp}" is the test's directory
    code: int = 1
    env: tuple[tuple[str, str], ...] = ()


LINK = "is a symbolic link (to {tmp}/outside/v, owned by root (uid 0)); refusing to write through it"
CASES = [
    # item 1: `ln -s /tmp/v .state/vm.lock; inv vm.stop` truncated /tmp/v
    Case("lock-link-vm-stop", _lock_link, ("vm.stop",), "VM lock file {tmp}/state/vm.lock " + LINK),
    Case("lock-link-vm-destroy", _lock_link, ("vm.destroy",), "VM lock file {tmp}/state/vm.lock " + LINK),
    # .state/ssh linked to a 1777 dir: chmod'ed 0700 and the private key written into it
    Case("ssh-dir-link-iso", _ssh_dir_link, ("iso",),
         "SSH key directory {tmp}/state/ssh is a symbolic link (to {tmp}/outside/pub"),
    # ssh/id_ed25519 -> a file: chmod'ed
    Case("private-key-link-iso", _private_key_link, ("iso",), "generated SSH private key {tmp}/state/ssh/id_ed25519 " + LINK),
    # user-data became a link to the outside file
    Case("user-data-link-iso", _user_data_link, ("iso",), "rendered user-data {tmp}/state/user-data " + LINK),
    # qemu opens the serial log by name: refused before anything is started
    Case("serial-log-link-vm-run", _serial_log_link, ("vm.run",), "state dir entry {tmp}/state/serial.log " + LINK),
    Case("state-dir-link-of-another-user", _state_dir_link_of_another_user, ("iso",),
         "configuration key project.state_dir: {tmp}/state is a symbolic link owned by nobody (uid 65534), "
         "not by you or root; refusing to follow it"),
    # item 11: a directory that is not the tool's own is neither used nor deleted from
    Case("foreign-dir-iso", _foreign_dir, ("iso",),
         "configuration key project.state_dir: {tmp}/state is not a directory this tool made: it holds notes.txt"),
    Case("foreign-dir-destroy", _foreign_dir, ("vm.destroy",), "{tmp}/state is not a directory this tool made"),
    Case("state-dir-empty", lambda w: None, ("iso",), "configuration key project.state_dir is empty",
         env=(("INVOKE_PROJECT_STATE_DIR", ""),)),
    # item 10: valid JSON of the wrong shape is an error naming the file (vm.destroy works: below)
    Case("record-null-status", _record_null, ("vm.status",),
         "the launch record {tmp}/state/vm.json is not valid: expected a JSON object, got null"),
    Case("record-wrong-shape-status", _record_wrong_shape, ("vm.status",),
         "the launch record {tmp}/state/vm.json is not valid: 'pid' is \"12\", expected int"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_state_dir_is_one_error_and_touches_nothing_outside(
    case: Case, world: World, run_inv: Callable[..., Any]
) -> None:
    case.setup(world)
    before = world.snapshot()
    inside = sorted(str(p) for p in world.state.rglob("*")) if world.state.is_dir() else []
    result = run_inv(*case.args, env=dict(case.env) | {"INVOKE_VM_ACCEL": "tcg"}, timeout=120)
    assert result.returncode == case.code, result.stderr
    assert_one_error(result.stderr, case.phrase.replace("{tmp}", str(world.tmp)))
    assert world.snapshot() == before  # no link target written, truncated or chmod'ed
    if case.id.startswith(("foreign", "state-dir")):
        now = sorted(str(p) for p in world.state.rglob("*")) if world.state.is_dir() else []
        assert now == inside  # nothing created in, nothing deleted from a directory that is not ours
    assert not (world.tmp.parent / "user-data").exists() and not (Path.cwd() / "ssh").exists()
    assert temp_leftovers(world.tmp) == []
    assert processes_of(world.tmp) == []


def test_planted_temp_links_are_never_written_through(world: World, run_inv: Callable[..., Any]) -> None:
    """`.user-data.tmp`/`.seed.iso.tmp` links made `inv iso` overwrite their targets and left user-data and
    seed.iso as links to them: temp names are unpredictable now (O_EXCL|O_NOFOLLOW), the links stay unused."""
    world.link(".user-data.tmp", world.outside / "v")
    world.link(".seed.iso.tmp", world.outside / "pub" / "iso")
    before = world.snapshot()
    result = run_inv("iso", timeout=120)
    assert result.returncode == 0, result.stderr
    assert world.snapshot() == before and not (world.outside / "pub" / "iso").exists()
    for name in (state.USER_DATA, state.SEED_ISO):
        assert stat.S_ISREG((world.state / name).lstat().st_mode)
    assert stat.S_IMODE((world.state / state.SSH_DIR).stat().st_mode) == 0o700


def test_a_state_dir_linked_by_you_is_followed(world: World, run_inv: Callable[..., Any]) -> None:
    """The control: a state dir that is your own link to a directory of yours (state kept on another disk)."""
    mine = world.tmp / "elsewhere"
    world.state.symlink_to(mine)
    result = run_inv("iso", timeout=120)
    assert result.returncode == 0, result.stderr
    assert (mine / state.SEED_ISO).is_file() and (mine / state.MARKER).is_file()


@pytest.mark.parametrize(
    "setup", [_record_null, _record_wrong_shape, _foreign_dir], ids=["null", "shape", "legacy"]
)
def test_vm_destroy_always_works_on_the_tools_own_files(
    setup: Callable[[World], None], world: World, run_inv: Callable[..., Any]
) -> None:
    """Item 10: a record of the wrong shape never stops vm.destroy. Item 11: a state dir from before the
    marker (only the tool's names in it) is destroyed whole; the foreign one's case is in the table."""
    setup(world)
    (world.state / "notes.txt").unlink(missing_ok=True)  # "legacy": the tool's names only
    result = run_inv("vm.destroy", timeout=120)
    assert result.returncode == 0, result.stderr
    assert not world.state.exists(), sorted(world.state.rglob("*"))


def test_vm_destroy_removes_only_the_tools_files(world: World, run_inv: Callable[..., Any]) -> None:
    """Item 11: a state dir with the marker loses only the names the tool makes; what else is there stays."""
    assert run_inv("iso", timeout=120).returncode == 0
    (world.state / state.BAKE_DIR).mkdir()
    (world.state / state.BAKE_DIR / "keep").write_text("x")
    result = run_inv("vm.destroy", timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in world.state.iterdir()) == [state.MARKER, state.BAKE_DIR]


# -- item 12: a full disk is named before anything is registered or started ---------------------------------
@pytest.mark.tools("mount")
@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (("iso",), "disk full: cannot write the "),
        (
            ("vm.run",),
            "disk full: {tmp}/state has 0 MiB free; the VM's overlay disk, logs and records grow there",
        ),
    ],
    ids=["iso", "vm-run"],
)
def test_a_full_state_disk_is_one_disk_full_error(
    args: tuple[str, ...], phrase: str, world: World, run_inv: Callable[..., Any]
) -> None:
    state_dir = world.tmp / "fs" / "state"
    with small_filesystem(world.tmp / "fs", "1m") as fs:
        state_dir.mkdir()
        if args == ("vm.run",):  # a state dir the tool made before the disk filled up
            (state_dir / state.MARKER).write_text("")
        fill_up(fs)
        env = {"INVOKE_VM_ACCEL": "tcg", "INVOKE_PROJECT_STATE_DIR": str(state_dir)}
        result = run_inv(*args, env=env, timeout=120)
        left = sorted(str(p.relative_to(fs)) for p in fs.rglob("*"))
    assert result.returncode == 1, result.stderr
    assert_one_error(result.stderr, phrase.replace("{tmp}/state", str(state_dir)))
    made = [f"state/{state.MARKER}", f"state/{state.LOCK}"] if args == ("vm.run",) else []  # the lock stays
    assert left == sorted(["filler", "state", *made])  # nothing half-made: no key, no temp file, no lock
    assert processes_of(world.tmp) == []


@pytest.mark.tools("mount")
def test_a_full_state_disk_stops_a_deploy_before_it_registers(
    world: World, run_inv: Callable[..., Any]
) -> None:
    """The record's pre-check once only created an empty file (which fits on a full disk): the job was
    registered, then writing the record failed, with a false "no automatic rollback happened" line."""
    double = NomadAPIDouble().ready_now().start()
    try:
        job = world.tmp / "web.nomad.hcl"
        job.write_text(web_job(version_variable=True))
        env = {"NOMAD_ADDR": double.url, "NOMAD_TOKEN": "", "INVOKE_DEPLOY_APP_JOB": str(job)}
        state_dir = world.tmp / "fs" / "state"
        env["INVOKE_PROJECT_STATE_DIR"] = str(state_dir)
        with small_filesystem(world.tmp / "fs", "1m", full=True) as fs:
            state_dir.mkdir()
            result = run_inv("deploy.app", "--image", "web:2", "--detach", env=env, timeout=120)
            left = sorted(str(p.relative_to(fs)) for p in fs.rglob("*"))
        assert result.returncode == 1, result.stderr
        assert_one_error(result.stderr, f"disk full: cannot write {state_dir}/deployed.json (the record of the "
                                        "deployed image)")  # fmt: skip
        assert "no automatic rollback" not in result.stderr
        assert double.count(r"^/v1/jobs$", "POST") == 0 and double.jobs == {}
        assert left == ["filler", "state"]
    finally:
        double.stop()

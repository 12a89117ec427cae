"""infra/core/files.py: bounded reads of user-supplied files, atomic writes that never leave a temp file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.core import files
from infra.core.errors import ConfigError, InfraError, SSHKeyError


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"x" * 1025, r"is larger than 1 KiB; is this the right file\?"),
        (b"ssh-ed25519 \x00AAAA", r"is binary \(a NUL byte at offset 12\)"),
        (b"caf\xe9", r"is not UTF-8 text \(invalid byte at offset 3\)"),
    ],
)
def test_read_text_refuses_what_is_not_a_small_text_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "key.pub"
    path.write_bytes(content)
    with pytest.raises(SSHKeyError, match=rf"SSH key {path} {message}"):
        files.read_text(path, "SSH key", error=SSHKeyError, limit=1024)


def test_read_text_names_a_directory_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match=rf"job file {tmp_path} is a directory, expected a file"):
        files.read_text(tmp_path, "job file")
    with pytest.raises(InfraError, match="No such file or directory"):
        files.read_text(tmp_path / "nope", "job file")
    (tmp_path / "ok").write_text("é\n")
    assert files.read_text(tmp_path / "ok", "job file", limit=3) == "é\n"  # exactly at the limit


def test_write_atomic_sets_the_mode_and_never_reuses_a_predictable_temp_name(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "user-data"
    target.parent.mkdir()
    stale = target.with_name(".user-data.tmp")  # the old fixed name: someone's file, or a link
    stale.write_text("left by someone")
    stale.chmod(0o666)
    files.write_atomic(target, b"new", "user-data", mode=0o600)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == [".user-data.tmp", "user-data"]
    assert stale.read_text() == "left by someone" and stale.stat().st_mode & 0o777 == 0o666  # untouched


def test_write_atomic_failing_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "seed.iso"

    def full_disk(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(
        InfraError, match=rf"disk full: cannot write the seed ISO {target} \(No space left on device\)"
    ):
        files.write_atomic(target, b"x" * 100, "seed ISO")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_refuses_a_directory_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "user-data").mkdir()
    with pytest.raises(InfraError, match=r"user-data is a directory"):
        files.write_atomic(tmp_path / "user-data", b"x", "rendered user-data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user-data"]


def test_writable_dir_creates_and_probes(tmp_path: Path) -> None:
    assert files.writable_dir(tmp_path / "a" / "b", "project.state_dir").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe is gone
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"configuration key project\.cache_dir: .*/f is not a directory"):
        files.writable_dir(tmp_path / "f", "project.cache_dir")
    with pytest.raises(ConfigError, match=r"/f/sub is not writable \(Not a directory\)"):
        files.writable_dir(tmp_path / "f" / "sub", "project.cache_dir")


# -- issue 23, item 1: links are never followed where the tool writes; item 11: the tool's own directory --
def _outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside"
    target.write_bytes(b"precious\n")
    target.chmod(0o640)
    return target


def _untouched(target: Path) -> None:
    assert target.read_bytes() == b"precious\n" and target.stat().st_mode & 0o777 == 0o640


def test_write_atomic_refuses_a_link_at_the_target_and_in_place_of_its_directory(tmp_path: Path) -> None:
    target = _outside(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "vm.json").symlink_to(target)
    with pytest.raises(
        InfraError, match=r"launch record .*/d/vm\.json is a symbolic link \(to .*/outside, owned by "
    ):
        files.write_atomic(tmp_path / "d" / "vm.json", b"{}", "launch record")
    (tmp_path / "linked").symlink_to(tmp_path / "d")
    with pytest.raises(InfraError, match=r"directory of the seed ISO .*/linked is a symbolic link"):
        files.write_atomic(tmp_path / "linked" / "seed.iso", b"x", "seed ISO")
    _untouched(target)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["vm.json"]  # no temp file left


def test_in_place_files_dirs_and_modes_never_go_through_a_link(tmp_path: Path) -> None:
    target = _outside(tmp_path)
    (tmp_path / "vm.lock").symlink_to(target)
    with pytest.raises(InfraError, match=r"VM lock file .*/vm\.lock is a symbolic link"):
        files.open_nofollow(tmp_path / "vm.lock", "VM lock file", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    (tmp_path / "id_ed25519").symlink_to(target)
    with pytest.raises(InfraError, match=r"private key .*/id_ed25519 is a symbolic link"):
        files.tighten(tmp_path / "id_ed25519", 0o600, "private key")
    _untouched(target)
    public = tmp_path / "pub"
    public.mkdir()
    public.chmod(0o1777)
    (tmp_path / "ssh").symlink_to(public)
    with pytest.raises(InfraError, match=r"SSH key directory .*/ssh is a symbolic link"):
        files.make_dir(tmp_path / "ssh", "SSH key directory", mode=0o700)
    assert public.stat().st_mode & 0o7777 == 0o1777
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InfraError, match=r"the qemu log .*/fifo is not a regular file"):
        files.open_nofollow(fifo, "qemu log", os.O_RDONLY)  # O_NONBLOCK: refused, never a hang


def test_trusted_dir_follows_only_links_of_yours_or_roots(tmp_path: Path) -> None:
    mine = tmp_path / "real"
    mine.mkdir()
    (tmp_path / "state").symlink_to(mine)
    assert files.trusted_dir(tmp_path / "state" / "sub", "project.state_dir") == mine / "sub"
    (tmp_path / "theirs").symlink_to(mine)
    os.lchown(tmp_path / "theirs", 65534, 65534)  # needs root, as the suite runs here and in CI (.ci/run)
    with pytest.raises(
        ConfigError, match=r"project\.state_dir: .*/theirs is a symbolic link owned by nobody"
    ):
        files.trusted_dir(tmp_path / "theirs", "project.state_dir")


def test_own_dir_marks_adopts_and_refuses(tmp_path: Path) -> None:
    new = tmp_path / "new"
    assert files.own_dir(new, "project.state_dir", ".mark", ["seed.iso"], mark=False) == new
    assert list(new.iterdir()) == []  # a check writes nothing
    files.own_dir(new, "project.state_dir", ".mark", ["seed.iso"])
    assert (new / ".mark").is_file()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "seed.iso").write_text("")
    files.own_dir(legacy, "project.state_dir", ".mark", ["seed.iso"])
    assert (legacy / ".mark").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "seed.iso").write_text("")
    (foreign / "thesis.tex").write_text("")
    with pytest.raises(ConfigError, match=r"foreign is not a directory this tool made: it holds thesis\.tex"):
        files.own_dir(foreign, "project.state_dir", ".mark", ["seed.iso"])
    assert sorted(p.name for p in foreign.iterdir()) == ["seed.iso", "thesis.tex"]

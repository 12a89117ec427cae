"""infra/files.py: bounded reads of user-supplied files, atomic writes that never leave a temp file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra import files
from infra.errors import ConfigError, InfraError, SSHKeyError


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

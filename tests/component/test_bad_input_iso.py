"""Bad-input battery, seed ISO surface (`inv iso`; issue 10, items 13, 16, 17 and 4): bad SSH keys, files
that never end, unwritable places, writes that fail half-way, a HashiCorp key file with an extra key. Each
case: the exit code, the one `error:` line, and nothing left behind (no ISO, no user-data, no temp file);
where a write failed, the next run must write again rather than report "unchanged".
"""

from __future__ import annotations

import resource
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.badinput import (
    FIFO,
    assert_one_error,
    files_under,
    make_files,
    temp_leftovers,
    unwritable_dir,
)
from support.servers.common import processes_of

from infra.core.errors import InfraError, TemplateError, ValidationError
from infra.guest import pgp, seed

FIXTURES = Path(__file__).parent.parent / "fixtures"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGk8M6bJg4dD2Hn0n1c7aQx8G5b5wq3eXq3mQnY0y3Zt test@host"
PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


@dataclass(frozen=True)
class Case:
    id: str
    ssh_key: str  # --ssh-key value; "{tmp}" is the test's tmp_path
    phrase: str
    files: dict[str, bytes] = field(default_factory=dict)
    code: int = 1


CASES = [
    Case("dev-zero", "/dev/zero", "SSH public key file /dev/zero is a device, not a regular file"),
    Case("dev-urandom", "/dev/urandom", "SSH public key file /dev/urandom is a device, not a regular file"),
    # issue 23, item 9: a FIFO hung `inv iso` forever (open waits for a writer); refused at once now
    Case("fifo", "{tmp}/key.fifo", "SSH public key file {tmp}/key.fifo is a FIFO, not a regular file",
         files={"key.fifo": FIFO}),
    Case("huge-text", "{tmp}/huge.pub", "huge.pub is larger than 16 KiB", files={"huge.pub": (KEY + "\n").encode() * 1000}),
    Case("binary", "{tmp}/key.pub", "key.pub is binary (a NUL byte at offset 4)", files={"key.pub": b"\x7fELF\x00\x01"}),
    Case("not-utf8", "{tmp}/key.pub", "key.pub is not UTF-8 text", files={"key.pub": b"ssh-ed25519 AAAA caf\xe9\n"}),
    Case("directory", "{tmp}/keys", "keys is a directory, expected a file", files={"keys/a.pub": KEY.encode()}),
    Case("missing", "{tmp}/nope.pub", "nope.pub: No such file or directory"),  # already worked
    Case("private-key", "{tmp}/id", "this is a private key", files={"id": PRIVATE.encode()}),  # already worked
    Case("two-keys", "{tmp}/two.pub", "expected exactly one public key line, got 2 lines",
         files={"two.pub": f"{KEY}\n{KEY}\n".encode()}),  # already worked
    Case("broken-key-text", "ssh-ed25519 AAAAbroken", "not valid base64"),  # already worked
    Case("unknown-type", "{tmp}/dsa.pub", "unsupported SSH key type 'ssh-dss'",
         files={"dsa.pub": b"ssh-dss AAAAB3NzaC1kc3MAAACBAP8= x\n"}),  # already worked
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_ssh_key_is_one_error_line_and_leaves_nothing(
    case: Case, run_inv: Callable[..., Any], tmp_path: Path
) -> None:
    make_files(tmp_path, case.files)
    state = tmp_path / "state"

    result = run_inv("iso", "--ssh-key", case.ssh_key.replace("{tmp}", str(tmp_path)), timeout=30)

    assert result.returncode == case.code, result.stderr
    assert_one_error(result.stderr, case.phrase.replace("{tmp}", str(tmp_path)))
    assert files_under(state) == []  # no ISO, no user-data, no generated key
    assert temp_leftovers(tmp_path) == []
    assert processes_of(tmp_path) == []


# ------------------------------------------------------------------------------ places that cannot be written --
def test_unwritable_state_dir_is_named_before_anything_is_made(
    run_inv: Callable[..., Any], tmp_path: Path
) -> None:
    with unwritable_dir(tmp_path / "state") as state:
        result = run_inv("iso")
        assert files_under(state) == []
    assert result.returncode == 1
    assert_one_error(result.stderr, f"configuration key project.state_dir: {state} is not writable")
    assert "hint: set project.state_dir to a writable directory" in result.stderr


def test_user_data_path_that_is_a_directory(run_inv: Callable[..., Any], tmp_path: Path) -> None:
    """Item 17: the write fails cleanly, and later runs do not report "unchanged" while no user-data exists."""
    state = tmp_path / "state"
    (state / "user-data").mkdir(parents=True)

    failed = run_inv("iso", "--ssh-key", KEY)

    assert failed.returncode == 1
    assert_one_error(failed.stderr, f"cannot write the rendered user-data: {state}/user-data is a directory")
    assert temp_leftovers(tmp_path) == []
    assert not (state / "seed.iso").exists()  # the ISO is written only after its user-data copy
    (state / "user-data").rmdir()
    again = run_inv("iso", "--ssh-key", KEY)
    assert again.returncode == 0, again.stderr
    assert "seed ISO wrote" in again.stderr
    assert (state / "user-data").is_file()
    third = run_inv("iso", "--ssh-key", KEY)
    assert "seed ISO unchanged" in third.stderr


def test_iso_write_failing_half_way_leaves_no_temp_file(run_inv: Callable[..., Any], tmp_path: Path) -> None:
    """Item 17: a write that fails part-way (here: the file-size limit, EFBIG, as a full disk would) removes
    `.seed.iso.tmp`, and the next run writes the ISO instead of trusting what is there."""
    state = tmp_path / "state"
    first = run_inv("iso", "--ssh-key", KEY)
    assert first.returncode == 0, first.stderr
    iso = (state / "seed.iso").read_bytes()
    (state / "seed.iso").write_bytes(iso[: len(iso) // 2])  # as if an older run had been cut off

    def small_files() -> None:  # in the child: writes beyond 40 KB fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    limited = run_inv("iso", "--ssh-key", KEY, preexec_fn=small_files)

    assert limited.returncode == 1
    assert_one_error(limited.stderr, f"cannot write the seed ISO {state}/seed.iso: File too large")
    assert temp_leftovers(tmp_path) == []
    again = run_inv("iso", "--ssh-key", KEY)
    assert "seed ISO wrote" in again.stderr, again.stderr
    assert (state / "seed.iso").read_bytes() == iso


# ---------------------------------------------------------------------------------- files the seed ships --
def test_binary_file_shipped_by_user_data_is_named(
    make_cfg: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = tmp_path / "files"
    shutil.copytree(seed.FILES_DIR, files)
    (files / "scripts" / "lib.sh").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    monkeypatch.setattr(seed, "FILES_DIR", files)
    cfg = make_cfg()

    with pytest.raises(
        TemplateError, match=r"file shipped by user-data .*/scripts/lib\.sh is not UTF-8 text"
    ):
        seed.write_iso(cfg, ssh_key=KEY)
    assert files_under(cfg.project.state_dir) == []
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("pinned+other", "holds 2 armored blocks; expected exactly one public key"),
        ("other+pinned", "holds 2 armored blocks"),
        ("other", "key fingerprint 676200965EA75A203F22FDC4A6811CE22CC966D2 is not the pinned"),
        ("binary", "HashiCorp key file .* is binary"),
        ("pinned", ""),  # the control: the pinned key alone is embedded
    ],
)
def test_hashicorp_key_file_with_any_other_key_is_refused(
    content: str, phrase: str, make_cfg: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 4, host side: `inv iso` embeds cloud-init/keys/hashicorp.asc only when it is exactly the pinned key
    (here the superseded 2023 key plays the pinned one; the other is a throwaway ed25519 key)."""
    pinned = (FIXTURES / "hashicorp-2023-superseded.asc").read_text()
    other = (FIXTURES / "throwaway-ed25519.asc").read_text()
    texts = {"pinned": pinned, "other": other, "pinned+other": pinned + other, "other+pinned": other + pinned}
    key_file = tmp_path / "hashicorp.asc"
    key_file.write_bytes(b"\x00\x01binary" if content == "binary" else texts[content].encode())
    monkeypatch.setattr(seed, "HASHICORP_KEY_FILE", key_file)
    monkeypatch.setattr(pgp, "HASHICORP_KEY_FPR", "798AEC654E5C15428C8E42EEAA16FCBCA621E701")
    cfg = make_cfg()

    if not phrase:
        assert seed.write_iso(cfg, ssh_key=KEY).changed
        doc = yaml.safe_load((cfg.project.state_dir / "user-data").read_bytes())
        shipped = {f["path"]: f["content"] for f in doc["write_files"]}
        assert shipped["/etc/infra-lab/hashicorp.asc"] == pinned
        return
    with pytest.raises((ValidationError, InfraError), match=phrase):
        seed.write_iso(cfg, ssh_key=KEY)
    assert files_under(cfg.project.state_dir) == []
    assert temp_leftovers(tmp_path) == []

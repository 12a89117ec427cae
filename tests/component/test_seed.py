"""infra/guest/seed.py: user-data composition, validation, and the ISO read back with pycdlib."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.core.errors import ValidationError
from infra.guest import pgp, seed

pytestmark = pytest.mark.tools("cloud-init", "blkid", "gpg")

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBPkFsOzBkaGc663XawP6l6Ir0RQXYvFAyRrdwGFAdIT test@example"


def test_rendered_user_data_passes_debians_cloud_init_schema(make_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "user-data"
    path.write_bytes(seed.render(make_cfg(), KEY).user_data)
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_two_builds_identical_and_blkid_reports_cidata(make_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = seed.write_iso(make_cfg())
    data1 = first.path.read_bytes()
    first.path.unlink()
    second = seed.write_iso(make_cfg())
    assert second.sha256 == first.sha256 == hashlib.sha256(second.path.read_bytes()).hexdigest()
    assert second.path.read_bytes() == data1
    third = seed.write_iso(make_cfg())
    assert third.changed is False
    out = subprocess.run(["blkid", str(second.path)], capture_output=True, text=True, check=True).stdout
    assert 'LABEL="cidata"' in out and 'TYPE="iso9660"' in out


def test_cli_prints_path_and_sha_and_generates_key_0600(run_inv, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = run_inv("iso")
    assert first.returncode == 0, first.stderr
    path, sha = first.stdout.split()
    iso = Path(path)
    assert iso == tmp_path / "state" / "seed.iso"
    assert sha == "sha256:" + hashlib.sha256(iso.read_bytes()).hexdigest()
    key = tmp_path / "state" / "ssh" / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    pub = (tmp_path / "state" / "ssh" / "id_ed25519.pub").read_text()
    second = run_inv("iso")
    assert second.returncode == 0
    assert second.stdout == first.stdout  # same key reused, same bytes
    assert "unchanged" in second.stderr
    assert (tmp_path / "state" / "ssh" / "id_ed25519.pub").read_text() == pub


def test_key_from_file_and_missing_file(make_cfg, tmp_path: Path, run_inv) -> None:  # type: ignore[no-untyped-def]
    pub = tmp_path / "me.pub"
    pub.write_text(KEY + "\n")
    result = seed.write_iso(make_cfg(), ssh_key=str(pub))
    doc = yaml.safe_load(result.path.with_name("user-data").read_bytes())
    assert doc["users"][0]["ssh_authorized_keys"] == [KEY]
    assert not (tmp_path / "state" / "ssh" / "id_ed25519").exists()  # nothing generated when a key is given
    missing = run_inv("iso", "--ssh-key", str(tmp_path / "nope.pub"))
    assert missing.returncode != 0
    assert f"SSH public key file {tmp_path / 'nope.pub'}: No such file or directory" in missing.stderr


def test_cli_bad_key_leaves_no_iso(run_inv, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_inv("iso", env={"INVOKE_SSH_PUBLIC_KEY": "ssh-ed25519 AAAAbroken"})
    assert result.returncode != 0
    assert "error: ssh.public_key:" in result.stderr
    assert not (tmp_path / "state" / "seed.iso").exists()


# ----------------------------------------------------------------------------------------- HashiCorp key --
def test_superseded_hashicorp_key_is_refused(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    old = Path(__file__).parent.parent / "fixtures" / "hashicorp-2023-superseded.asc"
    key = pgp.primary_key(pgp.dearmor(old.read_text(), "old"), "old")
    assert key.fingerprint == "798AEC654E5C15428C8E42EEAA16FCBCA621E701"  # what gpg --show-keys prints
    colons = subprocess.run(
        ["gpg", "--show-keys", "--with-colons", str(old)], capture_output=True, text=True, check=True
    ).stdout
    assert f"fpr:::::::::{key.fingerprint}:" in colons
    fake = tmp_path / "hashicorp.asc"
    shutil.copy(old, fake)
    monkeypatch.setattr(seed, "HASHICORP_KEY_FILE", fake)
    with pytest.raises(ValidationError, match=r"key fingerprint 798AEC65.* is not the pinned D55C0D1A"):
        seed.embedded_hashicorp_key()


def test_provisioning_wait_helper_is_bounded(tmp_path: Path) -> None:
    """lib.sh's wait_for, run by the real sh: succeeds as soon as the command does, fails after its limit."""
    lib = seed.FILES_DIR / "scripts" / "lib.sh"
    marker = tmp_path / "up"
    ok = subprocess.run(
        ["sh", "-c", f". {lib}; (sleep 1; touch {marker}) & wait_for marker none.service 10 test -e {marker}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run(
        ["sh", "-c", f". {lib}; wait_for 'the thing' none.service 2 false; echo rc=$?"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "infra-lab: the thing did not answer within 2 s" in fail.stderr
    assert fail.stdout.strip() == "rc=1"

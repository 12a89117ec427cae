"""Item 4 of issue 10, guest side: lib.sh's `pin_key` (used by 20-nomad-install.sh) run by the real sh with
the real gpg. The keyring it writes for apt's `signed-by` must hold exactly the pinned key; a key file with
any other key beside it (another armored block, or both keys in one block) is refused and writes nothing.

The superseded 2023 HashiCorp key (a real key) plays the pinned one; tests/fixtures/throwaway-ed25519.asc is
a throwaway key generated with `gpg --batch --quick-gen-key` for these tests.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from infra.guest import pgp, seed

FIXTURES = Path(__file__).parent.parent / "fixtures"
LIB = seed.FILES_DIR / "scripts" / "lib.sh"
INSTALLER = seed.FILES_DIR / "scripts" / "20-nomad-install.sh"
PINNED_FPR = "798AEC654E5C15428C8E42EEAA16FCBCA621E701"
OTHER_FPR = "676200965EA75A203F22FDC4A6811CE22CC966D2"
PINNED = (FIXTURES / "hashicorp-2023-superseded.asc").read_text()
OTHER = (FIXTURES / "throwaway-ed25519.asc").read_text()


def gpg(home: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["gpg", "--batch", "--homedir", str(home), *args],
        input=stdin, capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip


def primaries(path: Path, home: Path) -> list[str]:
    """Primary-key fingerprints of a key file or keyring, as gpg itself reads it."""
    out = gpg(home, "--show-keys", "--with-colons", str(path))
    lines = out.splitlines()
    return [
        lines[i + 1].split(":")[9]
        for i, line in enumerate(lines[:-1])
        if line.startswith(("pub:", "sec:")) and lines[i + 1].startswith("fpr:")
    ]


def agents_left(tmp_path: Path, within: float = 60.0) -> list[str]:
    """gpg-agents of pin_key's throwaway home (made under TMPDIR=tmp_path) still alive after `within` s
    (gpgconf --kill is asynchronous). The test's own `home` and other tests' agents do not count. A killed
    agent may linger as a zombie where PID 1 of a container does not reap daemons: it has exited."""
    own = str(tmp_path / "gnupg")
    deadline = time.monotonic() + within
    while True:
        left = [
            " ".join(p.info["cmdline"] or [])
            for p in psutil.process_iter(["name", "status", "cmdline"])
            if (p.info.get("name") or "").startswith("gpg-agent")
            and p.info.get("status") != psutil.STATUS_ZOMBIE
            and str(tmp_path) in " ".join(p.info["cmdline"] or [])
            and own not in " ".join(p.info["cmdline"] or [])
        ]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A GNUPGHOME for the test's own gpg calls (the function under test makes and removes its own)."""
    path = tmp_path / "gnupg"
    path.mkdir(mode=0o700)
    yield path
    subprocess.run(["gpgconf", "--homedir", str(path), "--kill", "all"], capture_output=True, check=False)


@pytest.fixture
def one_block_with_both(home: Path) -> str:
    """Both keys in ONE armored block (RFC 4880 §6.2, with its CRC-24), as `gpg --armor --export` writes a
    keyring of two keys; gpg itself confirms it reads two keys from it."""
    data = pgp.dearmor(PINNED, "pinned") + pgp.dearmor(OTHER, "other")
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc = (crc << 1) ^ (0x1864CFB if crc & 0x800000 else 0)
    body = base64.b64encode(data).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    crc_line = "=" + base64.b64encode((crc & 0xFFFFFF).to_bytes(3, "big")).decode()
    block = "\n".join(["-----BEGIN PGP PUBLIC KEY BLOCK-----", "", *lines, crc_line,
                       "-----END PGP PUBLIC KEY BLOCK-----", ""])  # fmt: skip
    path = home / "both.asc"
    path.write_text(block)
    assert primaries(path, home) == [PINNED_FPR, OTHER_FPR]
    return block


def pin_key(tmp_path: Path, content: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    keyfile = tmp_path / "hashicorp.asc"
    keyfile.write_text(content)
    keyring = tmp_path / "keyrings" / "hashicorp-archive-keyring.gpg"
    keyring.parent.mkdir(exist_ok=True)
    result = subprocess.run(
        ["sh", "-c", '. "$1"; pin_key "$2" "$3" "$4"', "sh", str(LIB), str(keyfile), PINNED_FPR, str(keyring)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    return result, keyring


def test_the_pinned_key_alone_becomes_a_keyring_of_exactly_that_key(tmp_path: Path, home: Path) -> None:
    result, keyring = pin_key(tmp_path, PINNED)

    assert result.returncode == 0, result.stderr
    assert agents_left(tmp_path) == []  # no agent left running for the throwaway home
    assert primaries(keyring, home) == [PINNED_FPR]
    assert not keyring.with_name(keyring.name + ".tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gnupg",
        "hashicorp.asc",
        "keyrings",
    ]  # temp home gone


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("pinned-then-other-block", f"{PINNED_FPR} {OTHER_FPR}"),
        ("other-then-pinned-block", f"{OTHER_FPR} {PINNED_FPR}"),
        ("both-in-one-block", f"{PINNED_FPR} {OTHER_FPR}"),
        ("other-only", OTHER_FPR),
        ("garbage", ""),
        ("empty", ""),
    ],
)
def test_a_key_file_with_anything_but_the_pinned_key_is_refused(
    name: str, found: str, tmp_path: Path, one_block_with_both: str
) -> None:
    content = {
        "pinned-then-other-block": PINNED + OTHER,
        "other-then-pinned-block": OTHER + PINNED,
        "both-in-one-block": one_block_with_both,
        "other-only": OTHER,
        "garbage": "<html>Service Unavailable</html>\n",
        "empty": "",
    }[name]

    result, keyring = pin_key(tmp_path, content)

    assert agents_left(tmp_path) == []
    assert result.returncode == 1
    assert f"holds key(s) [{found}], expected exactly [{PINNED_FPR}]; refusing it" in result.stderr
    assert list(keyring.parent.iterdir()) == []  # neither the keyring nor its .tmp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gnupg", "hashicorp.asc", "keyrings"]


def test_the_installer_pins_through_pin_key_and_is_shellcheck_clean() -> None:
    """20-nomad-install.sh trusts nothing but what pin_key wrote (no `gpg --dearmor` of the whole file)."""
    script = INSTALLER.read_text()
    assert 'pin_key "$key" "$HASHICORP_KEY_FPR" "$keyring"' in script
    assert "--dearmor" not in script
    assert ". /usr/local/lib/infra-lab/lib.sh" in script
    lint = subprocess.run(
        ["shellcheck", "--shell=sh", "--exclude=SC1091", str(INSTALLER), str(LIB)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert lint.returncode == 0, lint.stdout

"""infra/guest/pgp.py: the pinned HashiCorp key is accepted only ALONE (issue 10, item 4). Before, only the first
key of the file was checked, so the pinned key followed by any other key passed, and apt would have trusted
both. The superseded 2023 HashiCorp key (real) plays the pinned key; the other is a throwaway ed25519 key."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from infra.core.errors import ValidationError
from infra.guest import pgp

FIXTURES = Path(__file__).parent.parent / "fixtures"
PINNED = (FIXTURES / "hashicorp-2023-superseded.asc").read_text()
OTHER = (FIXTURES / "throwaway-ed25519.asc").read_text()
PINNED_FPR = "798AEC654E5C15428C8E42EEAA16FCBCA621E701"
OTHER_FPR = "676200965EA75A203F22FDC4A6811CE22CC966D2"


def armor(data: bytes) -> str:
    """One armored block around `data` (the CRC line is optional in RFC 4880 and ignored by dearmor)."""
    body = base64.b64encode(data).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(
        ["-----BEGIN PGP PUBLIC KEY BLOCK-----", "", *lines, "-----END PGP PUBLIC KEY BLOCK-----"]
    )


def packets(text: str) -> bytes:
    return pgp.dearmor(text, "fixture")


def new_format(tag: int, body: bytes) -> bytes:
    assert len(body) < 192
    return bytes([0xC0 | tag, len(body)]) + body


CASES = {
    "pinned-then-other-block": (PINNED + OTHER, "holds 2 armored blocks; expected exactly one public key"),
    "other-then-pinned-block": (OTHER + PINNED, "holds 2 armored blocks"),
    "both-in-one-block": (armor(packets(PINNED) + packets(OTHER)), f"holds 2 keys \\({PINNED_FPR}, {OTHER_FPR}\\)"),
    "other-first-in-one-block": (armor(packets(OTHER) + packets(PINNED)), "holds 2 keys"),
    "other-only": (OTHER, f"key fingerprint {OTHER_FPR} is not the pinned"),
    "secret-key-packet": (armor(packets(PINNED) + new_format(5, b"\x04secret")), "holds secret key material"),
    "truncated": (armor(packets(PINNED)[:-40]), "truncated packet"),
    "signature-first": (armor(new_format(2, b"\x04sig") + packets(PINNED)), "first packet is tag 2"),
    "not-armored": ("hello", "not an ASCII-armored OpenPGP public key block"),
    "bad-base64": ("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n!!!\n-----END PGP PUBLIC KEY BLOCK-----", "not valid base64"),
}  # fmt: skip


@pytest.mark.parametrize(("text", "phrase"), CASES.values(), ids=CASES.keys())
def test_anything_but_the_pinned_key_alone_is_refused(text: str, phrase: str) -> None:
    with pytest.raises(ValidationError, match=phrase):
        pgp.check_fingerprint(text, PINNED_FPR, "hashicorp.asc")


def test_the_pinned_key_alone_passes_with_its_subkeys_and_signatures() -> None:
    key = pgp.check_fingerprint(PINNED, PINNED_FPR, "hashicorp.asc")
    assert key.fingerprint == PINNED_FPR
    tags = [tag for tag, _ in pgp.packets(packets(PINNED), "fixture")]
    assert tags[0] == 6 and 14 in tags and 2 in tags  # primary, subkey(s), signatures: one key all the same
    assert (
        pgp.check_fingerprint(armor(packets(PINNED)), PINNED_FPR.lower(), "re-armored").fingerprint
        == PINNED_FPR
    )


def test_every_primary_key_is_found() -> None:
    both = packets(PINNED) + packets(OTHER)
    assert [k.fingerprint for k in pgp.primary_keys(both, "both")] == [PINNED_FPR, OTHER_FPR]
    assert pgp.primary_key(both, "both").fingerprint == PINNED_FPR

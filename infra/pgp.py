"""Just enough OpenPGP to check which key an ASCII-armored public key block holds.

`inv iso` embeds HashiCorp's package-signing key only when its primary-key fingerprint is the pinned one,
so a wrong or stale key (e.g. the 2023 key rotated out on 2026-09-10) fails at build time on the host, not at
boot in the guest. The guest checks the fingerprint again with gpg before trusting the repository.
Fingerprint per RFC 4880 §12.2 (v4 keys): SHA-1 over 0x99, the two-octet length and the key packet body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from infra.errors import ValidationError

#: HashiCorp's Linux package-signing key since 2026-09-10 (rsa4096, created 2026-09-09, expires 2031-09-08).
#: Source: hashicorp/nomad#28540 and HashiCorp's security page (https://www.hashicorp.com/en/trust/security).
HASHICORP_KEY_FPR = "D55C0D1AC78A8D8126CB631CFC9CA96ACA026560"
HASHICORP_KEY_URL = "https://apt.releases.hashicorp.com/gpg"


@dataclass(frozen=True)
class PrimaryKey:
    fingerprint: str  # upper-case hex, no spaces
    created: int  # unix time


def dearmor(text: str, source: str) -> bytes:
    lines = [line.strip() for line in text.strip().splitlines()]
    try:
        start = lines.index("-----BEGIN PGP PUBLIC KEY BLOCK-----")
        end = lines.index("-----END PGP PUBLIC KEY BLOCK-----")
    except ValueError:
        raise ValidationError(f"{source}: not an ASCII-armored OpenPGP public key block") from None
    body = lines[start + 1 : end]
    while body and (":" in body[0]):  # armor headers ("Comment: ...")
        body = body[1:]
    data = [line for line in body if line and not line.startswith("=")]  # drop blank line and CRC24
    try:
        return base64.b64decode("".join(data), validate=True)
    except binascii.Error as exc:
        raise ValidationError(f"{source}: the armored key is not valid base64") from exc


def primary_key(data: bytes, source: str) -> PrimaryKey:
    """Parse the first packet, which must be a v4 public-key packet (tag 6)."""
    if not data or not data[0] & 0x80:
        raise ValidationError(f"{source}: not an OpenPGP packet stream")
    first = data[0]
    if first & 0x40:  # new packet format
        tag = first & 0x3F
        o = data[1]
        if o < 192:
            length, start = o, 2
        elif o < 224:
            length, start = ((o - 192) << 8) + data[2] + 192, 3
        else:
            length, start = struct.unpack(">I", data[2:6])[0], 6
    else:  # old format
        tag = (first >> 2) & 0x0F
        length_type = first & 0x03
        size = {0: 1, 1: 2, 2: 4}.get(length_type)
        if size is None:
            raise ValidationError(f"{source}: indeterminate-length packet not supported")
        length = int.from_bytes(data[1 : 1 + size], "big")
        start = 1 + size
    if tag != 6:
        raise ValidationError(f"{source}: first packet is tag {tag}, expected a public key (6)")
    body = data[start : start + length]
    if len(body) != length or body[0] != 4:
        raise ValidationError(f"{source}: only complete v4 public keys are supported")
    digest = hashlib.sha1(b"\x99" + struct.pack(">H", length) + body, usedforsecurity=False).hexdigest()
    (created,) = struct.unpack(">I", body[1:5])
    return PrimaryKey(fingerprint=digest.upper(), created=created)


def check_fingerprint(text: str, expected: str, source: str) -> PrimaryKey:
    key = primary_key(dearmor(text, source), source)
    if key.fingerprint != expected.replace(" ", "").upper():
        raise ValidationError(
            f"{source}: key fingerprint {key.fingerprint} is not the pinned {expected}",
            hint="HashiCorp rotated its package-signing key on 2026-09-10; fetch the current key from "
            f"{HASHICORP_KEY_URL} and check its fingerprint before committing it",
        )
    return key

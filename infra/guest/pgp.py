"""Just enough OpenPGP to check which key an ASCII-armored public key block holds.

`inv iso` embeds HashiCorp's package-signing key only when its primary-key fingerprint is the pinned one,
so a wrong or stale key (e.g. the 2023 key rotated out on 2026-09-10) fails at build time on the host, not at
boot in the guest. The guest checks the fingerprint again with gpg before trusting the repository.
The file must hold exactly that one key (subkeys and signatures of it aside): a second key would end up in
apt's `signed-by` keyring and be trusted too, so it is refused here and in the guest (lib.sh `pin_key`).
Fingerprint per RFC 4880 §12.2 (v4 keys): SHA-1 over 0x99, the two-octet length and the key packet body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from infra.core.errors import ValidationError

#: HashiCorp's Linux package-signing key since 2026-09-10 (rsa4096, created 2026-09-09, expires 2031-09-08).
#: Source: hashicorp/nomad#28540 and HashiCorp's security page (https://www.hashicorp.com/en/trust/security).
HASHICORP_KEY_FPR = "D55C0D1AC78A8D8126CB631CFC9CA96ACA026560"
HASHICORP_KEY_URL = "https://apt.releases.hashicorp.com/gpg"


@dataclass(frozen=True)
class PrimaryKey:
    fingerprint: str  # upper-case hex, no spaces
    created: int  # unix time


_BEGIN = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
_END = "-----END PGP PUBLIC KEY BLOCK-----"
_PUBLIC_KEY, _SECRET_KEY, _SECRET_SUBKEY = 6, 5, 7


def dearmor(text: str, source: str) -> bytes:
    """The packets of the ONE armored public-key block in `text`; a second block is refused, because gpg
    (and apt's keyring) would take every key of every block."""
    lines = [line.strip() for line in text.strip().splitlines()]
    blocks = sum(1 for line in lines if line.startswith("-----BEGIN PGP"))
    if blocks > 1:
        raise ValidationError(
            f"{source}: holds {blocks} armored blocks; expected exactly one public key",
            hint=_ONE_KEY_HINT,
        )
    try:
        start = lines.index(_BEGIN)
        end = lines.index(_END)
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


def packets(data: bytes, source: str) -> Iterator[tuple[int, bytes]]:
    """(tag, body) of every packet (RFC 4880 §4.2); partial or indeterminate lengths are refused (keys
    never use them)."""
    pos = 0
    while pos < len(data):
        first = data[pos]
        if not first & 0x80:
            raise ValidationError(f"{source}: not an OpenPGP packet stream (byte {pos})")
        if first & 0x40:  # new packet format
            tag = first & 0x3F
            o = data[pos + 1] if pos + 1 < len(data) else 0
            if o < 192:
                length, start = o, pos + 2
            elif o < 224:
                length, start = (
                    ((o - 192) << 8) + (data[pos + 2] if pos + 2 < len(data) else 0) + 192,
                    pos + 3,
                )
            elif o == 255:
                length, start = int.from_bytes(data[pos + 2 : pos + 6], "big"), pos + 6
            else:
                raise ValidationError(f"{source}: partial-length packet not supported")
        else:  # old format
            tag = (first >> 2) & 0x0F
            size = {0: 1, 1: 2, 2: 4}.get(first & 0x03)
            if size is None:
                raise ValidationError(f"{source}: indeterminate-length packet not supported")
            length = int.from_bytes(data[pos + 1 : pos + 1 + size], "big")
            start = pos + 1 + size
        body = data[start : start + length]
        if len(body) != length:
            raise ValidationError(f"{source}: truncated packet (tag {tag})")
        yield tag, body
        pos = start + length


def _fingerprint(body: bytes, source: str) -> PrimaryKey:
    if not body or body[0] != 4:
        raise ValidationError(f"{source}: only complete v4 public keys are supported")
    digest = hashlib.sha1(b"\x99" + struct.pack(">H", len(body)) + body, usedforsecurity=False).hexdigest()
    (created,) = struct.unpack(">I", body[1:5])
    return PrimaryKey(fingerprint=digest.upper(), created=created)


def primary_keys(data: bytes, source: str) -> list[PrimaryKey]:
    """Every primary public key in the packet stream (subkeys belong to the primary before them)."""
    keys: list[PrimaryKey] = []
    for i, (tag, body) in enumerate(packets(data, source)):
        if i == 0 and tag != _PUBLIC_KEY:
            raise ValidationError(f"{source}: first packet is tag {tag}, expected a public key (6)")
        if tag in (_SECRET_KEY, _SECRET_SUBKEY):
            raise ValidationError(f"{source}: holds secret key material; expected a public key only")
        if tag == _PUBLIC_KEY:
            keys.append(_fingerprint(body, source))
    if not keys:
        raise ValidationError(f"{source}: not an OpenPGP packet stream")
    return keys


def primary_key(data: bytes, source: str) -> PrimaryKey:
    """The first primary key of the packet stream."""
    return primary_keys(data, source)[0]


def check_fingerprint(text: str, expected: str, source: str) -> PrimaryKey:
    """The key in `text`, which must be exactly one primary key with fingerprint `expected`: a file that
    holds any other key besides it is refused (every key in the file would be trusted by apt)."""
    want = expected.replace(" ", "").upper()
    keys = primary_keys(dearmor(text, source), source)
    others = [k.fingerprint for k in keys if k.fingerprint != want]
    if len(keys) == 1 and not others:
        return keys[0]
    if len(keys) == 1:
        raise ValidationError(
            f"{source}: key fingerprint {keys[0].fingerprint} is not the pinned {expected}",
            hint="HashiCorp rotated its package-signing key on 2026-09-10; fetch the current key from "
            f"{HASHICORP_KEY_URL} and check its fingerprint before committing it",
        )
    raise ValidationError(
        f"{source}: holds {len(keys)} keys ({', '.join(k.fingerprint for k in keys)}); expected only the "
        f"pinned {expected}",
        hint=_ONE_KEY_HINT,
    )


_ONE_KEY_HINT = (
    "every key in the file would be trusted for HashiCorp's repository; keep only the key with the pinned "
    f"fingerprint (gpg --armor --export <fingerprint>, from {HASHICORP_KEY_URL})"
)

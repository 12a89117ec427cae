"""SSH keys: validate a public key, or generate and reuse the project's ed25519 keypair.

The generated private key is written 0600 in <state_dir>/ssh/ with no passphrase (it only opens the local
VM, whose SSH port is bound to 127.0.0.1). Keys are generated with `cryptography` (a dependency of
paramiko/fabric), so no ssh-keygen is needed on the host.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from infra import files
from infra.errors import SSHKeyError
from infra.state import StatePaths

ALLOWED_TYPES = frozenset(
    {
        "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)  # fmt: skip

#: An authorized_keys line is < 1 KiB even for rsa-16384 with a long comment; bounded reads stop /dev/zero.
MAX_PUBLIC_KEY = 16 * 1024


@dataclass(frozen=True)
class KeyPair:
    public: str  # one authorized_keys line
    private_path: Path | None  # None when the user supplied only a public key
    source: str  # where the public key came from, for messages


def validate_public_key(text: str, source: str) -> str:
    """Return the key as one normalized authorized_keys line, or raise SSHKeyError naming `source`."""
    line = text.strip()
    if "PRIVATE KEY" in line:
        raise SSHKeyError(
            f"{source}: this is a private key; give the public key (the .pub file)",
            hint="ssh.public_key takes a path to a .pub file or the key text",
        )
    if not line or "\n" in line:
        raise SSHKeyError(
            f"{source}: expected exactly one public key line, got {len(line.splitlines())} lines"
        )
    fields = line.split()
    if len(fields) < 2:
        raise SSHKeyError(f"{source}: not an SSH public key (expected '<type> <base64> [comment]')")
    key_type, blob_b64 = fields[0], fields[1]
    if key_type not in ALLOWED_TYPES:
        raise SSHKeyError(
            f"{source}: unsupported SSH key type {key_type!r}",
            hint=f"supported: {', '.join(sorted(ALLOWED_TYPES))}",
        )
    try:
        blob = base64.b64decode(blob_b64, validate=True)
        (name_len,) = struct.unpack(">I", blob[:4])
        inner_type = blob[4 : 4 + name_len].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError) as exc:
        raise SSHKeyError(f"{source}: the key data of the {key_type} key is not valid base64") from exc
    if inner_type != key_type:
        raise SSHKeyError(f"{source}: key says {key_type!r} but its data encodes {inner_type!r}")
    if not key_type.startswith("sk-"):
        try:
            serialization.load_ssh_public_key(f"{key_type} {blob_b64}".encode())
        except (ValueError, TypeError) as exc:
            raise SSHKeyError(f"{source}: the {key_type} key data is corrupt ({exc})") from exc
    return line


def resolve(configured: str, state: StatePaths) -> KeyPair:
    """The public key to authorize: `configured` (path or key text) or the project's generated key."""
    if configured:
        candidate = Path(os.path.expanduser(configured))
        first = configured.strip().split(" ", 1)[0]
        looks_like_key = first.startswith(("ssh-", "ecdsa-", "sk-")) or "PRIVATE KEY" in configured
        if not looks_like_key:
            text = files.read_text(
                candidate,
                "SSH public key file",
                error=SSHKeyError,
                limit=MAX_PUBLIC_KEY,
                hint="set ssh.public_key (or --ssh-key) to an existing .pub file, or leave it empty "
                "to use a generated key",
            )
            return KeyPair(validate_public_key(text, str(candidate)), None, str(candidate))
        return KeyPair(validate_public_key(configured, "ssh.public_key"), None, "ssh.public_key")
    return ensure_generated(state)


def ensure_generated(state: StatePaths) -> KeyPair:
    """Generate <state>/ssh/id_ed25519 once (0600) and reuse it afterwards."""
    private, public = state.ssh_key, state.ssh_pubkey
    if private.exists() and public.exists():
        mode = private.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(private, 0o600)
        return KeyPair(validate_public_key(public.read_text(), str(public)), private, str(public))
    private.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private.parent, 0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = pub.decode() + " infra-lab"
    _write_private(private, pem)
    tmp = public.with_suffix(".pub.tmp")
    tmp.write_text(line + "\n")
    tmp.replace(public)
    return KeyPair(line, private, str(public))


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.replace(path)

"""SSH keys: validate a public key, or generate and reuse the project's ed25519 keypair.

The generated private key is written 0600 in <state_dir>/ssh/ with no passphrase (it only opens the local
VM, whose SSH port is bound to 127.0.0.1). Keys are generated with `cryptography` (a dependency of
paramiko/fabric), so no ssh-keygen is needed on the host.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from infra.core import files
from infra.core.errors import SSHKeyError
from infra.core.state import StatePaths

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
    """Generate <state>/ssh/id_ed25519 once (0600, in a 0700 directory) and reuse it afterwards.

    Safe when several commands run at once: generation happens under an flock on the ssh directory, so
    exactly one keypair is made and every caller gets the same one (never a private key with another's
    public half)."""
    try:
        return _ensure_generated(state)
    except OSError as exc:
        raise SSHKeyError(
            f"cannot keep the generated SSH key in {state.ssh_key.parent}: {exc.strerror or exc}",
            hint="project.state_dir must be a directory this user can write",
        ) from exc


def _ensure_generated(state: StatePaths) -> KeyPair:
    private, public = state.ssh_key, state.ssh_pubkey
    ssh_dir = private.parent
    state.claim()
    files.make_dir(ssh_dir, "SSH key directory", mode=0o700, error=SSHKeyError)  # never through a link
    dir_fd = files.open_dir(ssh_dir, "SSH key directory", error=SSHKeyError, create=False)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        if private.exists() and public.exists():
            files.tighten(private, 0o600, "generated SSH private key", error=SSHKeyError)
            text = files.read_text(
                public, "generated SSH public key", error=SSHKeyError, limit=MAX_PUBLIC_KEY
            )
            return KeyPair(validate_public_key(text, str(public)), private, str(public))
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        line = pub.decode() + " infra-lab"
        # a fresh temp name each (O_EXCL), mode set on the open fd: a file someone left cannot lend its mode
        files.write_atomic(private, pem, "generated SSH private key", mode=0o600, error=SSHKeyError)
        files.write_atomic(public, (line + "\n").encode(), "generated SSH public key", error=SSHKeyError)
        return KeyPair(line, private, str(public))
    finally:
        os.close(dir_fd)  # releases the flock

"""Files the user points at: bounded reads and atomic writes that never leave a temporary file behind.

Every read of a user-supplied file (an SSH key, a -f config file, a job file, a file shipped by user-data)
goes through `read_text`: at most `limit` bytes are read, so `--ssh-key /dev/zero` fails at once, and
binary or non-UTF-8 content is an error naming the file. `write_atomic` writes a temporary file beside the
target and renames it into place; on any failure (including Ctrl-C) the temporary file is removed.
`writable_dir` checks a configured directory by creating it and a probe file in it, before any work that
would otherwise fail half-way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from infra.errors import ConfigError, InfraError

#: Default read cap: far above any key, config or job file, far below "read until the kernel kills us".
MAX_TEXT = 1 << 20


def read_text(
    path: Path,
    what: str,
    *,
    error: type[InfraError] = InfraError,
    limit: int = MAX_TEXT,
    hint: str | None = None,
) -> str:
    """The UTF-8 text of `path` (at most `limit` bytes), or `error` naming `what` and the path."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, expected a file", hint=hint) from None
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror or exc}", hint=hint) from None
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {limit // 1024} KiB; is this the right file?", hint=hint)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} {path} is not UTF-8 text (invalid byte at offset {exc.start})", hint=hint
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        raise error(f"{what} {path} is binary (a NUL byte at offset {nul}), expected text", hint=hint)
    return text


def write_atomic(
    path: Path, data: bytes, what: str, *, mode: int = 0o644, error: type[InfraError] = InfraError
) -> None:
    """Write `data` to `path` via `.<name>.tmp` + rename; a failure removes the temporary file."""
    if path.is_dir():
        raise error(f"cannot write the {what}: {path} is a directory", hint=f"remove or rename {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot write the {what}: cannot create {path.parent}: {exc.strerror or exc}") from None
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode does not apply to a file that already existed
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise error(f"cannot write the {what} {path}: {exc.strerror or exc}") from None
        raise


def probe_dir(path: Path) -> None:
    """Create directory `path` if needed and a probe file in it: OSError when it cannot hold files."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
    os.close(fd)
    os.unlink(probe)


def writable_dir(path: Path, key: str) -> Path:
    """The directory of configuration key `key`, created if needed and proven writable (a probe file)."""
    hint = f"set {key} to a writable directory (e.g. INVOKE_{key.replace('.', '_').upper()}=/path)"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"configuration key {key}: {path} is not a directory", hint=hint)
    try:
        probe_dir(path)
    except OSError as exc:
        raise ConfigError(
            f"configuration key {key}: {path} is not writable ({exc.strerror or exc})", hint=hint
        ) from None
    return path

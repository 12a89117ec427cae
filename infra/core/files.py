"""Files the user points at: bounded reads and atomic writes that never leave a temporary file behind.

Every read of a user-supplied file (an SSH key, a -f config file, a job file, a file shipped by user-data)
goes through `read_text`: only a regular file is read (a FIFO or a device is refused at once, never waited
on), at most `limit` bytes of it, and binary or non-UTF-8 content is an error naming the file. `write_atomic` writes a temporary file beside the
target and renames it into place; on any failure (including Ctrl-C) the temporary file is removed.
`writable_dir` checks a configured directory by creating it and a probe file in it, before any work that
would otherwise fail half-way.

Links are never followed when writing (the tool runs as root in CI, in directories others may write to):
`trusted_dir` refuses a configured directory reached through a symbolic link owned by someone other than
you or root (naming the link and its owner) and resolves the others once; below it, every write opens its
directory with O_DIRECTORY|O_NOFOLLOW, creates its temporary file under an unpredictable name with
O_CREAT|O_EXCL|O_NOFOLLOW and renames it into place (a link at the target is refused, not followed), files
written in place (`open_nofollow`) and directories (`make_dir`) are opened with O_NOFOLLOW, and modes are set
with fchmod on such a descriptor, never through a path. `own_dir` keeps a tool's directory dedicated: a
marker file says the tool made it, and a directory holding files of others is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from infra.core.errors import ConfigError, InfraError

PROBE_PREFIX = ".write-probe-"
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
        # O_NONBLOCK: a FIFO (or a device) is refused after fstat, instead of an open that waits for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, expected a file", hint=hint) from None
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror or exc}", hint=hint) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise error(f"{what} {path} is a directory, expected a file", hint=hint)
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a file"
        )
        raise error(f"{what} {path} is {kind}, not a regular file", hint=hint)
    with os.fdopen(fd, "rb") as f:
        os.set_blocking(fd, True)
        try:
            data = f.read(limit + 1)
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


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def link_error(
    path: Path, what: str, error: type[InfraError], st: os.stat_result | None = None
) -> InfraError:
    """The error for a symbolic link found where the tool writes: names the link, its owner and its target."""
    try:
        st = st or os.lstat(path)
        owner, target = _owner(st.st_uid), os.readlink(path)
    except OSError:
        owner, target = "unknown", "?"
    return error(
        f"{what} {path} is a symbolic link (to {target}, owned by {owner}); refusing to write through it",
        hint=f"links are never followed where this tool writes: remove {path} (its target is untouched)",
    )


def trusted_dir(path: Path, key: str) -> Path:
    """`path` (configuration key `key`) with its symbolic links resolved, each one checked first: a link owned
    by someone other than you or root is refused (naming it and its owner), never followed."""
    seen = Path(path.anchor)
    linked = False
    for part in path.parts[1:]:
        seen = seen / part
        try:
            st = os.lstat(seen)
        except OSError:
            break  # the rest does not exist yet: it is created as real directories
        if stat.S_ISLNK(st.st_mode):
            if not _trusted_owner(st.st_uid):
                raise ConfigError(
                    f"configuration key {key}: {seen} is a symbolic link owned by {_owner(st.st_uid)}, not by "
                    "you or root; refusing to follow it",
                    hint=f"point {key} at a directory of your own",
                )
            linked = True
    return path.resolve() if linked else path


def open_dir(path: Path, what: str, *, error: type[InfraError] = InfraError, create: bool = True) -> int:
    """A descriptor of directory `path` (created when missing, parents included), opened without following a
    link at `path` itself (O_DIRECTORY|O_NOFOLLOW): a link there is `error` naming it and its owner."""
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, 0o755)  # mkdir never follows a link: an existing one is EEXIST, checked below
        except FileExistsError:
            pass
        except OSError as exc:
            raise error(f"cannot create the {what} {path}: {exc.strerror or exc}") from None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise link_error(path, what, error) from None
        raise error(f"cannot open the {what} {path}: {exc.strerror or exc}") from None


def make_dir(path: Path, what: str, *, mode: int, error: type[InfraError] = InfraError) -> None:
    """Directory `path` of this user, with no permission beyond `mode` (tightened with fchmod on a descriptor
    opened with O_NOFOLLOW: never through a link)."""
    fd = open_dir(path, what, error=error)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise error(
                f"the {what} {path} is owned by {_owner(st.st_uid)}, not by you",
                hint=f"remove {path}; it is made again",
            )
        if st.st_mode & 0o7777 & ~mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def open_nofollow(
    path: Path, what: str, flags: int, *, mode: int = 0o644, error: type[InfraError] = InfraError
) -> int:
    """A descriptor of the regular file `path` opened with `flags` | O_NOFOLLOW (a file written in place, such
    as a lock or a log): a link there is `error` naming it and its owner, so is anything but a regular file
    (O_NONBLOCK: a FIFO there cannot hang the open). A missing directory stays FileNotFoundError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise link_error(path, what, error) from None
        raise error(f"cannot open the {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"the {what} {path} is not a regular file", hint=f"remove {path}")
    os.set_blocking(fd, True)
    return fd


def tighten(path: Path, mode: int, what: str, *, error: type[InfraError] = InfraError) -> None:
    """Drop permissions beyond `mode` from the regular file `path`: fchmod on an O_NOFOLLOW descriptor."""
    fd = open_nofollow(path, what, os.O_RDONLY, error=error)
    try:
        if os.fstat(fd).st_mode & 0o7777 & ~mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def no_links(root: Path, names: Iterable[str], what: str, *, error: type[InfraError] = InfraError) -> None:
    """None of `names` in directory `root` is a symbolic link (files another program, e.g. qemu, opens by
    name and would follow): the first one found is `error` naming it and its owner."""
    for name in names:
        path = root / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise link_error(path, what, error, st)


def write_atomic(
    path: Path, data: bytes, what: str, *, mode: int = 0o644, error: type[InfraError] = InfraError
) -> None:
    """Write `data` to `path` through a temporary file of an unpredictable name in the same directory
    (O_CREAT|O_EXCL|O_NOFOLLOW, mode set with fchmod), renamed into place; a failure removes the temporary
    file. The directory is opened without following a link; a link at `path` is refused, never followed."""
    dir_fd = open_dir(path.parent, f"directory of the {what}", error=error)
    tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        try:
            st = os.lstat(path.name, dir_fd=dir_fd)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise link_error(path, what, error, st)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise error(f"cannot write the {what}: {path} is a directory", hint=f"remove or rename {path}")
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd
            )
            try:
                os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(exc, OSError):
                raise error(failed(f"cannot write the {what} {path}", exc)) from None
            raise
    finally:
        os.close(dir_fd)


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def failed(doing: str, exc: OSError) -> str:
    """A message for an OSError while `doing` ("cannot write the seed ISO /x/seed.iso"): its reason, or
    "disk full: ..." first for a full disk (ENOSPC) or quota (EDQUOT)."""
    if disk_full(exc):
        return f"disk full: {doing} ({exc.strerror or 'no space left'})"
    return f"{doing}: {exc.strerror or exc}"


def probe_dir(path: Path) -> None:
    """Create directory `path` if needed and a probe file in it: OSError when it cannot hold files."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=PROBE_PREFIX)
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


def _transient(name: str) -> bool:
    """A temporary file of this module (`write_atomic`'s, `probe_dir`'s), perhaps another command's now."""
    return name.startswith(PROBE_PREFIX) or (name.startswith(".") and name.endswith(".tmp"))


def own_dir(path: Path, key: str, marker: str, known: Iterable[str], *, mark: bool = True) -> Path:
    """The dedicated directory of configuration key `key`, proven writable (`writable_dir`) and the tool's
    own: created with `marker` in it when missing; an existing one must hold `marker`, or nothing but the
    names in `known` (a directory from before markers existed: adopted, the marker written). A directory that
    holds anything else is refused, naming what it holds: the tool creates and deletes files there.
    `mark=False` only checks (before work that may still fail: nothing is left behind then)."""
    existed = path.is_dir()
    writable_dir(path, key)
    marker_path = path / marker
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(marker_path).st_mode):
            return path
    names = set(known) | {marker}
    foreign = sorted(n for n in os.listdir(path) if n not in names and not _transient(n))
    if existed and foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(
            f"configuration key {key}: {path} is not a directory this tool made: it holds {shown}",
            hint=f"point {key} at a new or empty directory of its own (the tool creates and deletes files "
            "there, e.g. on vm.destroy)",
        )
    if not mark:
        return path
    write_atomic(
        marker_path,
        b"made by infra-lab: its files here are removed by `inv vm.destroy`\n",
        f"{key} marker",
        error=ConfigError,
    )
    return path

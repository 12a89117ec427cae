"""One exception family for the domain.

Every error carries a message (what went wrong), an optional hint (what to do or where to look) and optional
details (log excerpts, task events). Tasks turn them into `invoke.Exit` with `str(error)`; nothing else in the
package prints tracebacks at the user.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class InfraError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        details: Iterable[str] = (),
        log: Path | str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = list(details)
        self.log = Path(log) if log else None

    def __str__(self) -> str:
        parts = [self.message]
        if self.details:
            parts.append("\n".join("  " + line for line in self.details))
        if self.log:
            parts.append(f"log: {self.log}")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class ConfigError(InfraError):
    """Invalid or unknown configuration (names the key)."""


class TemplateError(InfraError):
    """A template or data file under cloud-init/, vm/ or nomad/ is malformed (names file:line:column)."""


class ValidationError(InfraError):
    """Rendered data failed a schema or project rule (names the field path)."""


class SSHKeyError(InfraError):
    """An SSH key is missing, unreadable or not a valid public key."""


class ImageError(InfraError):
    """A base image could not be fetched or failed its checksum."""


class VMError(InfraError):
    """The VM could not be started, stopped or reached."""


class PortInUseError(VMError):
    """A host port needed for a forward is already bound."""


class WaitTimeout(InfraError):
    """Something awaited did not happen before its deadline (carries the last state seen)."""

    exit_code = 2


class NomadError(InfraError):
    """The Nomad API answered with an error or could not be reached."""


class DeployError(InfraError):
    """A job failed to register, place or become healthy."""

    #: The deployment that failed (Nomad's Deployment object), when a deployment failed.
    deployment: dict[str, Any] | None = None


class BuildError(InfraError):
    """Building or shipping the app image failed."""


#: What a hidden secret is shown as (also in the e2e's Nomad recordings, tests/e2e/nomad_recording.py).
REDACTED = "<redacted>"
#: A URL's userinfo (RFC 3986 3.2.1, `user:password@`): from `scheme://` to the last `@` before the
#: authority ends (at /, ?, # or white space), so a password holding a raw `@` is hidden whole.
_URL_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")


def url_secrets(text: str) -> list[str]:
    """The secrets inside URLs in `text`: each userinfo's password (or the whole userinfo when it has no
    `:`, e.g. a token given as the user name)."""
    found = (m.group("userinfo") for m in _URL_USERINFO.finditer(text))
    return [userinfo.partition(":")[2] or userinfo for userinfo in found if userinfo]


def redact_urls(text: str) -> str:
    """`text` with every URL's userinfo hidden: `http://user:pw@host` -> `http://user:<redacted>@host`,
    `https://TOKEN@host` -> `https://<redacted>@host`. The one redaction of URLs, for messages and the e2e's
    recordings alike."""

    def hide(m: re.Match[str]) -> str:
        user, colon, _ = m.group("userinfo").partition(":")
        if not m.group("userinfo"):
            return m.group(0)
        return m.group("head") + (f"{user}:{REDACTED}" if colon else REDACTED) + "@"

    return _URL_USERINFO.sub(hide, text)


def printable(text: str, *, limit: int | None = None) -> str:
    """Text from outside (a server's answer, a log line, a name the user gave) made safe for a terminal:
    passwords inside URLs hidden (`redact_urls`), control characters and escape sequences (NUL, ESC, CR,
    DEL, C1) shown as \\xNN, tabs and newlines kept; cut at `limit`."""
    text = redact_urls(text)
    out = "".join(
        ch
        if ch in "\n\t" or (ch.isprintable() and ch != "\x7f")
        else f"\\x{ord(ch):02x}"
        if ord(ch) < 256
        else "?"
        for ch in text
    )
    if limit is not None and len(out) > limit:
        out = out[:limit] + "…"
    return out


def root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3/socket error, short enough for one line:
    "connection refused", "Name or service not known", "certificate verify failed: ...".
    """
    seen = exc
    while True:
        nxt = seen.__cause__ or seen.__context__
        if nxt is None and seen.args and isinstance(seen.args[0], BaseException):
            nxt = seen.args[0]
        if nxt is None or nxt is seen:
            break
        seen = nxt
    verify_message = getattr(seen, "verify_message", None)  # ssl.SSLCertVerificationError
    if verify_message:
        return f"certificate verify failed: {verify_message}"
    reason = getattr(seen, "reason", None)
    text = str(reason or seen)
    if "Errno 111" in text or "Connection refused" in text:
        return "connection refused"
    m = re.search(r"certificate verify failed: ([^()'\"]+)", text)
    if m:
        return f"certificate verify failed: {m.group(1).strip()}"
    # urllib3 wraps the interesting part: "...: Failed to resolve 'x' ([Errno -2] Name or service not known)"
    m = re.search(r"\[Errno [-\d]+\] ([^)'\"]+)", text)
    if m:
        return m.group(1).strip()
    return text.splitlines()[0][:300] if text else type(seen).__name__


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception behind it, each once: __cause__, __context__, a `reason` attribute
    (urllib3) and exceptions passed as arguments (requests wraps urllib3's that way), depth first."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(
            x
            for x in (e.__cause__, e.__context__, getattr(e, "reason", None))
            if isinstance(x, BaseException)
        )
        todo.extend(a for a in e.args if isinstance(a, BaseException))


def unresolved_host(exc: BaseException) -> str | None:
    """The host name whose DNS lookup failed somewhere in `exc`'s chain (requests -> urllib3 ->
    socket.gaierror), or None when the failure was something else."""
    for e in causes(exc):
        if isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError":
            m = re.search(r"Failed to resolve '([^']+)'", str(e))
            return m.group(1) if m else (getattr(e, "host", None) or "the host")
    return None

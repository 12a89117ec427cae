"""Terminal output: quiet success, visible progress.

All output goes to stderr through one rich Console so that stdout stays clean for values a script may
capture (a path, a sha256, a URL). When stderr is not a terminal (CI, pipes) rich degrades to plain lines.

Every message is text from outside as far as this module knows (a job ID a server chose, a state dir or a
job name the user gave): each line is made printable (`errors.printable`: terminal escapes shown as \\xNN,
passwords inside URLs hidden) and printed literally (rich markup such as `[red]` or `[/x]` in a name is
shown as written, never interpreted); only this module's own prefixes are styled.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.status import Status
from rich.text import Text

from infra.core.errors import printable

console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

VERBOSE = os.environ.get("INFRA_VERBOSE", "") not in ("", "0")


def literal(text: str, style: str = "") -> Text:
    """`text` made printable (no escape sequence, no password in a URL), as rich text that is never parsed
    as markup."""
    return Text(printable(text), style=style)


def _line(prefix: str, style: str, message: str) -> None:
    console.print(Text.assemble((prefix, style), literal(message)) if prefix else literal(message, style))


def info(message: str) -> None:
    _line("", "", message)


def step(message: str) -> None:
    """A named step of a longer flow (e.g. `inv up`)."""
    _line("==> ", "bold", message)


def ok(message: str) -> None:
    _line("ok  ", "green", message)


def skip(message: str) -> None:
    """A step that was already satisfied and did nothing."""
    _line("--  ", "cyan", message)


def warn(message: str) -> None:
    _line("warning: ", "yellow", message)


def debug(message: str) -> None:
    if VERBOSE:
        _line("", "dim", message)


def out(value: str) -> None:
    """A machine-readable result on stdout (made printable too: it may be a terminal)."""
    sys.stdout.write(printable(value) + "\n")
    sys.stdout.flush()


class LiveLine:
    """One status line that is rewritten while waiting.

    On a terminal: a spinner with the text and its `progress` suffix (elapsed time), updated in place.
    Elsewhere (CI logs, pipes): a line only when the text itself changes, plus a heartbeat every
    HEARTBEAT seconds, so a long wait does not print one line per second.
    """

    HEARTBEAT = 30.0

    def __init__(self, status: Status | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._status = status
        self._clock = clock
        self._last = ""
        self._printed_at = clock()

    def update(self, text: str, progress: str = "") -> None:
        if self._status is not None:
            self._status.update(literal(f"{text} {progress}".rstrip()))
            return
        now = self._clock()
        if text != self._last or now - self._printed_at >= self.HEARTBEAT:
            console.print(literal(f"... {text} {progress}".rstrip()))
            self._last = text
            self._printed_at = now


@contextlib.contextmanager
def live(text: str) -> Iterator[LiveLine]:
    if console.is_terminal:
        with console.status(literal(text)) as status:
            yield LiveLine(status)
    else:
        line = LiveLine(None)
        line.update(text)
        yield line


def download_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),  # a file name, printed literally
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and not VERBOSE,
    )

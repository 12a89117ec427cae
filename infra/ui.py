"""Terminal output: quiet success, visible progress.

All output goes to stderr through one rich Console so that stdout stays clean for values a script may
capture (a path, a sha256, a URL). When stderr is not a terminal (CI, pipes) rich degrades to plain lines.
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

console = Console(stderr=True, highlight=False, soft_wrap=True)

VERBOSE = os.environ.get("INFRA_VERBOSE", "") not in ("", "0")


def info(message: str) -> None:
    console.print(message)


def step(message: str) -> None:
    """A named step of a longer flow (e.g. `inv up`)."""
    console.print(f"[bold]==>[/bold] {message}")


def ok(message: str) -> None:
    console.print(f"[green]ok[/green]  {message}")


def skip(message: str) -> None:
    """A step that was already satisfied and did nothing."""
    console.print(f"[cyan]--[/cyan]  {message}")


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def debug(message: str) -> None:
    if VERBOSE:
        console.print(f"[dim]{message}[/dim]")


def out(value: str) -> None:
    """A machine-readable result on stdout."""
    sys.stdout.write(value + "\n")
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
            self._status.update(f"{text} {progress}".rstrip())
            return
        now = self._clock()
        if text != self._last or now - self._printed_at >= self.HEARTBEAT:
            console.print(f"... {text} {progress}".rstrip())
            self._last = text
            self._printed_at = now


@contextlib.contextmanager
def live(text: str) -> Iterator[LiveLine]:
    if console.is_terminal:
        with console.status(text) as status:
            yield LiveLine(status)
    else:
        line = LiveLine(None)
        line.update(text)
        yield line


def download_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and not VERBOSE,
    )

"""Wait on state, never on time.

`wait_until` is the one wait loop of the package: a probe returns (done, state-description); the loop shows
the state on one live line, stops when done, and on its deadline raises WaitTimeout carrying what was
awaited, the last state observed and a hint on where to look. Probes that block server-side (Nomad blocking
queries) pass `interval=0`: the probe itself is the wait.

At least one probe always runs to its end before a timeout is declared, even when the deadline passed
during it (a slow machine, a request capped by the time left): a deadline is never an excuse for reporting
nothing. A probe that got no answer at all (nothing listening, a request that timed out) says so with
`answered=False`; such a look does not replace the last answered state in the timeout message, and when no
probe was ever answered the message says that plainly ("no answer from Nomad at ... within 3s").
The clock and the sleep are parameters, so the loop's deadline behaviour is tested with a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from infra.core import ui
from infra.core.errors import WaitTimeout

T = TypeVar("T")


@dataclass
class Probe(Generic[T]):
    """The result of one look at the world."""

    done: bool
    state: str
    value: T | None = None
    #: False: the look learned nothing (no answer within its time); `state` then says why.
    answered: bool = True


class Deadline:
    """A point in monotonic time; `remaining()` never goes below zero."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._clock = clock
        self.seconds = seconds
        self.start = clock()
        self.end = self.start + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - self._clock())

    def expired(self) -> bool:
        return self._clock() >= self.end

    def elapsed(self) -> float:
        return self._clock() - self.start


def wait_until(
    probe: Callable[[Deadline], Probe[T]],
    *,
    what: str,
    timeout: float,
    interval: float = 1.0,
    hint: str | None = None,
    details: Callable[[], list[str]] | None = None,
    source: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Probe[T]:
    """Call `probe` until it reports done; raise WaitTimeout after `timeout` seconds.

    The deadline is checked only after a probe has returned, so at least one probe always completes.
    `source` names who is asked, for the message when nothing ever answered (default: `what`).
    `details`, when given, is called only on timeout to attach evidence (log lines, task events).
    """
    deadline = Deadline(timeout, clock=clock)
    last: Probe[T] | None = None
    answered: Probe[T] | None = None  # the last look that learned something
    with ui.live(f"waiting for {what}") as line:
        while True:
            last = probe(deadline)
            if last.answered:
                answered = last
            line.update(f"waiting for {what}: {last.state}", f"({deadline.elapsed():.0f}s/{timeout:.0f}s)")
            if last.done:
                ui.ok(f"{what}: {last.state} after {deadline.elapsed():.1f}s")
                return last
            if deadline.expired():
                break
            if interval:
                sleep(min(interval, deadline.remaining()))
    raise WaitTimeout(
        timeout_message(what, timeout, last, answered, source),
        hint=hint,
        details=details() if details else (),
    )


def timeout_message(
    what: str, timeout: float, last: Probe[T], answered: Probe[T] | None, source: str | None = None
) -> str:
    """What a timed-out wait says: the last answered state, and plainly when nothing ever answered."""
    head = f"timed out after {timeout:.0f}s waiting for {what}"
    if answered is None:
        return f"{head}: no answer from {source or what} within {timeout:.0f}s ({last.state})"
    if answered is last:
        return f"{head}; last state: {answered.state}"
    return f"{head}; last state: {answered.state} (no answer after that: {last.state})"

"""Wait on state, never on time.

`wait_until` is the one wait loop of the package: a probe returns (done, state-description); the loop shows
the state on one live line, stops when done, and on its deadline raises WaitTimeout carrying what was
awaited, the last state observed and a hint on where to look. Probes that block server-side (Nomad blocking
queries) pass `interval=0`: the probe itself is the wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from infra import ui
from infra.errors import WaitTimeout

T = TypeVar("T")


@dataclass
class Probe(Generic[T]):
    """The result of one look at the world."""

    done: bool
    state: str
    value: T | None = None


class Deadline:
    """A point in monotonic time; `remaining()` never goes below zero."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
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
    sleep: Callable[[float], None] = time.sleep,
) -> Probe[T]:
    """Call `probe` until it reports done; raise WaitTimeout after `timeout` seconds.

    `details`, when given, is called only on timeout to attach evidence (log lines, task events).
    """
    deadline = Deadline(timeout)
    last = Probe[T](False, "no answer yet")
    with ui.live(f"waiting for {what}") as line:
        while True:
            last = probe(deadline)
            line.update(f"waiting for {what}: {last.state}", f"({deadline.elapsed():.0f}s/{timeout:.0f}s)")
            if last.done:
                ui.ok(f"{what}: {last.state} after {deadline.elapsed():.1f}s")
                return last
            if deadline.expired():
                break
            if interval:
                sleep(min(interval, deadline.remaining()))
    raise WaitTimeout(
        f"timed out after {timeout:.0f}s waiting for {what}; last state: {last.state}",
        hint=hint,
        details=details() if details else (),
    )

"""A fake clock for deadlines and waits (`Deadline(clock=...)`, `wait_until(clock=..., sleep=...)`)."""

from __future__ import annotations


class FakeClock:
    """Time that moves only when told: by a sleep (each one noted in `sleeps`), by `advance`, or by a probe
    that says how long it took."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

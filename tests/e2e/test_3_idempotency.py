"""A second `inv up` on the running setup changes nothing, says so step by step, and takes seconds."""

from __future__ import annotations

from e2e import harness
from e2e.harness import Stack


def test_second_up_changes_nothing(stack: Stack) -> None:
    """second inv up changes nothing, in seconds"""
    before = stack.smoke.snapshot()
    result = stack.inv(["up"], timeout=harness.IDEMPOTENT_UP_LIMIT * 3)
    after = stack.smoke.snapshot()
    for phase, seconds in result.phases():
        stack.timings.add(f"inv up (again): {phase}", seconds)
    harness.up_again_verdict(before, after, result)

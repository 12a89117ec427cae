"""infra/core/waits.py and the live line of infra/core/ui.py (not a terminal under pytest: the CI-log behaviour)."""

from __future__ import annotations

import pytest
from support.clock import FakeClock

from infra.core import ui
from infra.core.errors import WaitTimeout
from infra.core.waits import Deadline, Probe, wait_until


def test_wait_until_returns_the_done_probe_and_shows_state_changes_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    states = iter(["no leader", "no leader", "no leader", "node initializing", "ready"])

    def probe(_d: Deadline) -> Probe[str]:
        state = next(states)
        return Probe(state == "ready", state, value=state.upper())

    clock = FakeClock()
    result = wait_until(probe, what="the cluster", timeout=10, interval=1, sleep=clock.sleep, clock=clock)
    assert result.value == "READY"
    err = capsys.readouterr().err
    assert err.count("waiting for the cluster: no leader") == 1  # three identical states, one line
    assert "waiting for the cluster: node initializing" in err
    assert "ok  the cluster: ready after 4.0s" in err
    assert clock.sleeps == [1, 1, 1, 1]


def test_wait_until_times_out_with_last_state_hint_and_details() -> None:
    clock = FakeClock()
    calls = 0

    def probe(_d: Deadline) -> Probe[None]:
        nonlocal calls
        calls += 1
        clock.now += 0.25  # each look takes a quarter of a second
        return Probe(False, f"attempt {calls}: docker driver unhealthy")

    with pytest.raises(WaitTimeout) as err:
        wait_until(
            probe,
            what="nomad",
            timeout=5,
            interval=1.0,
            hint="inv vm.logs",
            details=lambda: ["log line 1"],
            sleep=clock.sleep,
            clock=clock,
        )
    text = str(err.value)
    # 1.25 s per round: probes at 0, 1.25, 2.5, 3.75, 5.0 (the last one ends past the deadline)
    assert calls == 5
    assert text.startswith(
        "timed out after 5s waiting for nomad; last state: attempt 5: docker driver unhealthy"
    )
    assert "  log line 1" in text and "hint: inv vm.logs" in text
    assert err.value.exit_code == 2
    # never sleeps past the deadline: the last pause is what was left of it
    assert clock.sleeps == [1.0, 1.0, 1.0, 1.0]


def test_wait_until_sleeps_no_longer_than_the_time_left() -> None:
    clock = FakeClock()

    def probe(_d: Deadline) -> Probe[None]:
        return Probe(False, "not yet")

    with pytest.raises(WaitTimeout):
        wait_until(probe, what="x", timeout=2.5, interval=1.0, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == [1.0, 1.0, 0.5]


def test_wait_until_completes_a_probe_that_outlives_the_deadline() -> None:
    """A probe whose look takes longer than the whole deadline (a starved process, a blocking query capped
    by the time left) still counts: its answer is returned, or reported, never dropped for a bare timeout."""
    clock = FakeClock()
    calls = 0

    def slow_but_done(_d: Deadline) -> Probe[str]:
        nonlocal calls
        calls += 1
        clock.now += 30  # the deadline (3 s) passes during the look
        return Probe(True, "ready", value="R")

    assert wait_until(slow_but_done, what="x", timeout=3, sleep=clock.sleep, clock=clock).value == "R"
    assert calls == 1 and clock.sleeps == []

    def slow_not_done(_d: Deadline) -> Probe[str]:
        nonlocal calls
        calls += 1
        clock.now += 30
        return Probe(False, "leader elected; docker driver not detected")

    calls = 0
    with pytest.raises(WaitTimeout) as err:
        wait_until(slow_not_done, what="x", timeout=3, sleep=clock.sleep, clock=clock)
    assert calls == 1 and clock.sleeps == []
    assert (
        str(err.value)
        == "timed out after 3s waiting for x; last state: leader elected; docker driver not detected"
    )


def test_wait_until_runs_one_probe_even_when_the_deadline_is_gone_before_it_starts() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 100  # every reading of the clock is 100 s later: the deadline is past at the first look
        return now[0]

    seen: list[float] = []

    def probe(d: Deadline) -> Probe[None]:
        seen.append(d.remaining())
        return Probe(False, "node initializing")

    with pytest.raises(WaitTimeout, match=r"last state: node initializing$"):
        wait_until(probe, what="x", timeout=3, sleep=lambda s: None, clock=clock)
    assert seen == [0.0]


def test_a_wait_that_never_got_an_answer_says_so_plainly() -> None:
    clock = FakeClock()
    calls = 0

    def probe(_d: Deadline) -> Probe[None]:
        nonlocal calls
        calls += 1
        clock.now += 1.5
        return Probe(False, "Nomad API not answering (read timed out)", answered=False)

    with pytest.raises(WaitTimeout) as err:
        wait_until(probe, what="Nomad at http://127.0.0.1:4646 (leader, node ready)", timeout=3,
                   interval=0, source="Nomad at http://127.0.0.1:4646", sleep=clock.sleep, clock=clock)  # fmt: skip
    assert calls == 2
    assert str(err.value) == (
        "timed out after 3s waiting for Nomad at http://127.0.0.1:4646 (leader, node ready): "
        "no answer from Nomad at http://127.0.0.1:4646 within 3s (Nomad API not answering (read timed out))"
    )
    assert "last state" not in str(err.value)


def test_a_look_without_answer_does_not_hide_the_last_answered_state() -> None:
    """The deadline cuts the last blocking query short: the state Nomad last answered with is reported."""
    clock = FakeClock()
    looks = iter(
        [
            Probe[None](False, "leader elected; node nomad-1 ready, eligible; docker driver not detected"),
            Probe[None](False, "Nomad API not answering (read timed out)", answered=False),
        ]
    )

    def probe(_d: Deadline) -> Probe[None]:
        clock.now += 2
        return next(looks)

    with pytest.raises(WaitTimeout) as err:
        wait_until(probe, what="nomad", timeout=3, interval=0, sleep=clock.sleep, clock=clock)
    assert str(err.value) == (
        "timed out after 3s waiting for nomad; last state: leader elected; node nomad-1 ready, eligible; "
        "docker driver not detected (no answer after that: Nomad API not answering (read timed out))"
    )


def test_live_line_heartbeat_when_state_does_not_change(capsys: pytest.CaptureFixture[str]) -> None:
    now = [0.0]
    line = ui.LiveLine(None, clock=lambda: now[0])
    for t in range(0, 65):
        now[0] = float(t)
        line.update("waiting for ssh: connection refused", f"({t}s)")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("...")]
    assert lines == [
        "... waiting for ssh: connection refused (0s)",
        "... waiting for ssh: connection refused (30s)",
        "... waiting for ssh: connection refused (60s)",
    ]


def test_deadline_never_negative() -> None:
    now = [100.0]
    d = Deadline(5, clock=lambda: now[0])
    now[0] = 104.0
    assert d.remaining() == pytest.approx(1.0) and not d.expired()
    now[0] = 200.0
    assert d.remaining() == 0.0 and d.expired()

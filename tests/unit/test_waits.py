"""infra/waits.py and the live line of infra/ui.py (not a terminal under pytest: the CI-log behaviour)."""

from __future__ import annotations

import pytest

from infra import ui
from infra.errors import WaitTimeout
from infra.waits import Deadline, Probe, wait_until


def test_wait_until_returns_the_done_probe_and_shows_state_changes_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    states = iter(["no leader", "no leader", "no leader", "node initializing", "ready"])

    def probe(_d: Deadline) -> Probe[str]:
        state = next(states)
        return Probe(state == "ready", state, value=state.upper())

    result = wait_until(probe, what="the cluster", timeout=10, interval=0.001)
    assert result.value == "READY"
    err = capsys.readouterr().err
    assert err.count("waiting for the cluster: no leader") == 1  # three identical states, one line
    assert "waiting for the cluster: node initializing" in err
    assert "ok  the cluster: ready after" in err


def test_wait_until_times_out_with_last_state_hint_and_details() -> None:
    calls = 0

    def probe(_d: Deadline) -> Probe[None]:
        nonlocal calls
        calls += 1
        return Probe(False, f"attempt {calls}: docker driver unhealthy")

    with pytest.raises(WaitTimeout) as err:
        wait_until(
            probe,
            what="nomad",
            timeout=0.05,
            interval=0.01,
            hint="inv vm.logs",
            details=lambda: ["log line 1"],
        )
    text = str(err.value)
    assert text.startswith("timed out after 0s waiting for nomad; last state: attempt")
    assert "docker driver unhealthy" in text
    assert "  log line 1" in text and "hint: inv vm.logs" in text
    assert err.value.exit_code == 2
    assert calls >= 2


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

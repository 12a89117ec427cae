"""scripts/test, the README's test command, with a stand-in for nox ($NOX): the VM tier runs beside the others,
the others at a lower priority (nice and their session's autogroup), the VM tier's output is printed when it
ends, the exit code says whether every part passed, and SIGTERM reaches both runs as Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import ROOT

SCRIPT = ROOT / "scripts" / "test"

#: A nox stand-in: records its sessions, niceness and autogroup, prints a line, sleeps FAKE_SLEEP seconds,
#: exits FAKE_EXIT_<session> (0 by default); on SIGINT records it and exits 130, as pytest would.
FAKE_NOX = r"""#!{python}
import json, os, signal, sys, time
from pathlib import Path
sessions = sys.argv[sys.argv.index("-s") + 1:]
name = "-".join(sessions)
out = Path(os.environ["FAKE_DIR"])
try:
    autogroup = Path("/proc/self/autogroup").read_text().strip()
except OSError:
    autogroup = ""
record = {{"sessions": sessions, "nice": os.nice(0), "autogroup": autogroup, "sid": os.getsid(0)}}
(out / f"{{name}}.json").write_text(json.dumps(record))
def interrupted(*_):
    (out / f"{{name}}.sigint").write_text("SIGINT")
    sys.exit(130)
signal.signal(signal.SIGINT, interrupted)
print(f"fake nox: session {{name}} ran", flush=True)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
sys.exit(int(os.environ.get(f"FAKE_EXIT_{{name.replace('-', '_')}}", "0")))
"""


@pytest.fixture
def fake(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    nox = tmp_path / "nox"
    nox.write_text(FAKE_NOX.format(python=sys.executable))
    nox.chmod(0o755)
    env = {**os.environ, "NOX": str(nox), "FAKE_DIR": str(tmp_path)}
    return tmp_path, env


def run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--vm-log", str(tmp_path / "vm.log"), *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_vm_tier_runs_beside_the_others_at_a_higher_priority(fake: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = fake
    result = run(tmp_path, env)
    assert result.returncode == 0, result.stderr
    vm = json.loads((tmp_path / "vm.json").read_text())
    rest = json.loads((tmp_path / "lint-unit-component.json").read_text())
    assert vm["sessions"] == ["vm"] and rest["sessions"] == ["lint", "unit", "component"]
    base = os.nice(0)  # this test's own niceness, which both inherit
    assert vm["nice"] == base and rest["nice"] == min(19, base + 10)
    assert vm["sid"] != rest["sid"]  # sessions of their own: the signal goes to each whole process group
    if Path("/proc/self/autogroup").exists():  # Linux with autogroup scheduling, as here
        assert rest["autogroup"].endswith("nice 10") and vm["autogroup"].endswith("nice 0")
    assert "fake nox: session vm ran" in result.stdout  # the VM tier's log, printed at the end
    assert (tmp_path / "vm.log").read_text() == "fake nox: session vm ran\n"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("test: passed: lint unit component: ok (") and ", vm: ok (" in last


@pytest.mark.parametrize("failing", ["vm", "lint_unit_component"])
def test_a_failed_part_fails_the_command_and_is_named(
    fake: tuple[Path, dict[str, str]], failing: str
) -> None:
    tmp_path, env = fake
    result = run(tmp_path, {**env, f"FAKE_EXIT_{failing}": "1"})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    name = "vm" if failing == "vm" else "lint unit component"
    assert last.startswith("test: FAILED: ") and f"{name}: FAILED (" in last


def test_sigterm_reaches_both_runs_as_ctrl_c(fake: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = fake
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--vm-log", str(tmp_path / "vm.log")],
        env={**env, "FAKE_SLEEP": "30"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not all((tmp_path / f"{n}.json").exists() for n in ("vm", "lint-unit-component")):
        assert time.monotonic() < deadline, "the stand-ins never started"
        time.sleep(0.05)
    time.sleep(0.2)  # the stand-ins have installed their SIGINT handlers
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=20)
    assert time.monotonic() - started < 10  # not the 30 s the stand-ins would sleep
    assert proc.returncode == 130, err
    assert (tmp_path / "vm.sigint").exists() and (tmp_path / "lint-unit-component.sigint").exists()
    assert err.strip().splitlines()[-1].startswith("test: interrupted (SIGTERM): ")


def test_without_nox_it_says_how_to_set_up(fake: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = fake
    result = run(tmp_path, {**env, "NOX": str(tmp_path / "no-such-nox")})
    assert result.returncode == 2
    assert "not found: run ./scripts/setup --system --dev first" in result.stderr

"""scripts/test, the README's test command, with a stand-in for nox ($NOX): the VM tier runs beside the others,
each in a session of its own at the same priority, the VM tier's output is printed when it
ends, the exit code says whether every part passed, and SIGTERM reaches both runs as Ctrl-C; `--stress N`
runs N busy loops beside every tier and stops them by PID (counted and checked by PID, not timed)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.servers.common import processes_of

from infra import ROOT

SCRIPT = ROOT / "scripts" / "test"

#: A nox stand-in: records its sessions, niceness and autogroup, and the busy loops of --stress running beside
#: it (its parent's other children), prints a line, sleeps FAKE_SLEEP seconds, exits FAKE_EXIT_<session>
#: (0 by default); on SIGINT records it and exits 130, as pytest would. `<name>.ready` once it handles SIGINT.
FAKE_NOX = r"""#!{python}
import json, os, signal, sys, time
from pathlib import Path
import psutil
sessions = sys.argv[sys.argv.index("-s") + 1:]
name = "-".join(sessions)
out = Path(os.environ["FAKE_DIR"])
try:
    autogroup = Path("/proc/self/autogroup").read_text().strip()
except OSError:
    autogroup = ""
hogs = []
for p in psutil.Process(os.getppid()).children():
    try:
        if p.cmdline()[1:] == ["-c", "while True: pass"]:
            hogs.append({{"pid": p.pid, "nice": p.nice(), "status": p.status()}})
    except psutil.Error:  # the other tier's stand-in, already ended
        pass
record = {{"sessions": sessions, "nice": os.nice(0), "autogroup": autogroup, "sid": os.getsid(0), "hogs": hogs}}
(out / f"{{name}}.json").write_text(json.dumps(record))
def interrupted(*_):
    (out / f"{{name}}.sigint").write_text("SIGINT")
    sys.exit(130)
signal.signal(signal.SIGINT, interrupted)
(out / f"{{name}}.ready").write_text("")
print(f"fake nox: session {{name}} ran", flush=True)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
sys.exit(int(os.environ.get(f"FAKE_EXIT_{{name.replace('-', '_')}}", "0")))
"""


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    nox = tmp_path / "nox"
    nox.write_text(FAKE_NOX.format(python=sys.executable))
    nox.chmod(0o755)
    env = {**os.environ, "NOX": str(nox), "FAKE_DIR": str(tmp_path)}
    yield tmp_path, env
    # A test that failed half-way (a timeout) leaves scripts/test and the stand-ins running: SIGTERM first
    # (scripts/test then stops its busy loops by pid), then SIGKILL whatever is left.
    import psutil

    leftovers = processes_of(tmp_path)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(leftovers, timeout=30)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--vm-log", str(tmp_path / "vm.log"), *args],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_the_vm_tier_runs_beside_the_others_at_the_same_priority(fake: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = fake
    result = run(tmp_path, env)
    assert result.returncode == 0, result.stderr
    vm = json.loads((tmp_path / "vm.json").read_text())
    rest = json.loads((tmp_path / "lint-unit-component.json").read_text())
    assert vm["sessions"] == ["vm"] and rest["sessions"] == ["lint", "unit", "component"]
    base = os.nice(0)  # this test's own niceness, which both inherit
    # neither is put behind the other: a lowered priority starves under outside load (README, Measured: H2)
    assert vm["nice"] == rest["nice"] == base
    assert vm["sid"] != rest["sid"]  # sessions of their own: the signal goes to each whole process group
    if Path("/proc/self/autogroup").exists():  # Linux with autogroup scheduling, as here
        assert rest["autogroup"].endswith("nice 0") and vm["autogroup"].endswith("nice 0")
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


def wait_ready(proc: subprocess.Popen[str], tmp_path: Path, *names: str) -> None:
    """Until each stand-in handles SIGINT (a generous limit: it only ends a run that never started)."""
    for _ in range(1200):
        if all((tmp_path / f"{n}.ready").exists() for n in names):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the stand-ins never started")


def test_sigterm_reaches_both_runs_as_ctrl_c(fake: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = fake
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--vm-log", str(tmp_path / "vm.log")],
        env={**env, "FAKE_SLEEP": "600"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_ready(proc, tmp_path, "vm", "lint-unit-component")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)  # the stand-ins would sleep 600 s: only SIGINT ends them
    assert proc.returncode == 130, err
    assert (tmp_path / "vm.sigint").exists() and (tmp_path / "lint-unit-component.sigint").exists()
    assert err.strip().splitlines()[-1].startswith("test: interrupted (SIGTERM): ")


def stress_pids(stderr: str) -> list[int]:
    started = [line for line in stderr.splitlines() if line.startswith("test: stress: ") and " pid " in line]
    assert len(started) == 2, stderr  # "... at normal priority beside the run, pid A B" and "stopped pid A B"
    assert "2 CPU-bound processes at normal priority beside the run" in started[0]
    pids = [int(p) for p in started[0].split(" pid ")[1].split()]
    assert started[1] == f"test: stress: stopped pid {' '.join(map(str, pids))}"
    return pids


def assert_gone(pids: list[int]) -> None:
    import psutil

    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            assert psutil.Process(pid).cmdline()[1:] != ["-c", "while True: pass"], pid


@pytest.mark.parametrize(
    ("args", "extra", "code", "stand_ins"),
    [
        ((), {}, 0, ("vm", "lint-unit-component")),
        (("--sequential",), {}, 0, ("lint-unit-component-vm",)),
        ((), {"FAKE_EXIT_vm": "1"}, 1, ("vm", "lint-unit-component")),
    ],
    ids=["parallel", "sequential", "failed"],
)
def test_stress_runs_busy_loops_beside_every_tier_and_stops_them_by_pid(
    fake: tuple[Path, dict[str, str]], args: tuple[str, ...], extra: dict[str, str], code: int,
    stand_ins: tuple[str, ...],
) -> None:  # fmt: skip
    tmp_path, env = fake
    result = run(tmp_path, {**env, **extra}, "--stress", "2", *args)
    assert result.returncode == code, result.stderr
    pids = stress_pids(result.stderr)
    base = os.nice(0)
    for name in stand_ins:  # each tier ran while both loops were running, at normal priority
        hogs = json.loads((tmp_path / f"{name}.json").read_text())["hogs"]
        assert sorted(h["pid"] for h in hogs) == sorted(pids), (name, hogs)
        assert all(h["nice"] == base and h["status"] != "zombie" for h in hogs), hogs
    assert_gone(pids)


def test_stress_loops_are_stopped_on_sigterm(fake: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = fake
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--vm-log", str(tmp_path / "vm.log"), "--stress", "2"],
        env={**env, "FAKE_SLEEP": "600"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_ready(proc, tmp_path, "vm", "lint-unit-component")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert_gone(stress_pids(err))


def test_stress_takes_a_count(fake: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = fake
    result = run(tmp_path, env, "--stress", "-1")
    assert result.returncode == 2
    assert "--stress: must be a whole number >= 0, not '-1'" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("*.json"))  # nothing ran


def test_without_nox_it_says_how_to_set_up(fake: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = fake
    result = run(tmp_path, {**env, "NOX": str(tmp_path / "no-such-nox")})
    assert result.returncode == 2
    assert "not found: run ./scripts/setup --system --dev first" in result.stderr


#: A test whose fixture needs a moment to tear down, as a VM's does (vm.destroy): run through the real noxfile.
HELD = """
import pathlib, time
import pytest

OUT = pathlib.Path({out!r})


@pytest.fixture
def held():
    (OUT / "setup").write_text("")
    yield
    time.sleep(2)  # longer than nox's own 0.3 s between Ctrl-C and SIGTERM
    (OUT / "teardown").write_text("")


def test_probe(held):
    time.sleep(600)
"""


def test_ctrl_c_gives_pytest_time_to_tear_its_fixtures_down(tmp_path: Path) -> None:
    """The real noxfile's session, Ctrl-C to its process group (as scripts/test passes SIGINT/SIGTERM on):
    the fixture's teardown completes (nox's default would terminate pytest 0.3 s after the Ctrl-C)."""
    probe = tmp_path / "test_held_probe.py"
    probe.write_text(HELD.format(out=str(tmp_path)))
    nox = Path(sys.executable).with_name("nox")
    proc = subprocess.Popen(
        [str(nox), "-s", "unit", "--", str(probe), "-k", "probe", "-p", "no:cacheprovider"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(2400):  # until the fixture is set up (a generous limit: the session never started)
            if (tmp_path / "setup").exists():
                break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        else:
            raise AssertionError("the probe never started")
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (tmp_path / "teardown").exists(), out
    assert proc.returncode != 0, out

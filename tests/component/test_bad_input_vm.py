"""Bad inputs and faults of the VM lifecycle, through the real `inv` CLI.

A table of cases: each sets up a fault (a running VM on a blank disk where the case needs one: real qemu,
no OS), runs one `inv` command, and asserts its exit code, its one-line message (a command that should stop at
once but waits would end with another exit code and message: no duration is measured), and that nothing was
left behind — no qemu or qemu-img of this state dir, no pidfile/QMP socket/launch record of a VM that does
not run, no temp files. Beside the table: two `inv vm.run` at once (the lock), and Ctrl-C
at several points of `inv vm.run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.badinput import assert_one_error
from support.servers.common import blank_vm_settings, processes_of, vm_ports
from support.servers.qmp import FakeQMP

from infra import ROOT
from infra.core.state import StatePaths
from infra.vm import qmp

pytestmark = pytest.mark.tools("qemu-system-x86_64", "qemu-img")

INV = str(Path(sys.executable).with_name("inv"))
#: What a failed or interrupted command may never leave in the state dir (a VM that is not running);
#: vm.json may stay as the record of a stopped VM (with stopped_at), never as one of a running VM.
HALF_STATE = ("qemu.pid", "qmp.sock")


@dataclass
class Lab:
    """A tmp project: a blank base disk, a -f config file (TCG, 1 vCPU, free ports), its state dir."""

    root: Path
    base: Path
    config: Path
    state: StatePaths
    settings: dict[str, Any]

    def write_config(self, path: Path, **vm: Any) -> Path:
        data = json.loads(json.dumps(self.settings))
        data["vm"].update(vm)
        path.write_text(json.dumps(data))
        return path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "NOMAD_"))}
        return {**env, **(extra or {})}

    def inv(
        self, *args: str, env: dict[str, str] | None = None, config: Path | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [INV, "-f", str(config or self.config), *args],
            cwd=ROOT, env=self.env(env), capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def start_vm(self, config: Path | None = None) -> int:
        result = self.inv("vm.run", config=config)
        assert result.returncode == 0, result.stderr
        # stdout: the seed it made, once (path + digest), as `inv iso` prints it
        assert re.fullmatch(rf"{re.escape(str(self.state.seed_iso))} sha256:[0-9a-f]{{64}}\n", result.stdout)
        return int(json.loads(self.state.vm_record.read_text())["pid"])

    def leftovers(self) -> list[str]:
        """Temp files and the state of a VM that is not running."""
        left = [str(p) for p in self.root.rglob("*") if p.name.endswith((".tmp", ".part"))]
        if not processes_of(self.state.root):
            left += [name for name in HALF_STATE if (self.state.root / name).exists()]
            if self.state.vm_record.exists() and "stopped_at" not in self.state.vm_record.read_text():
                left.append("vm.json of a VM that does not run")
        return left

    def kill_all(self) -> list[int]:
        """Kill (by pid) every process of this state dir; returns their pids."""
        procs = processes_of(self.state.root)
        for proc in procs:
            proc.kill()
        psutil.wait_procs(procs, timeout=10)
        return [p.pid for p in procs]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    state = tmp_path / "state"
    vm = blank_vm_settings(tmp_path)
    settings = {
        "project": {"state_dir": str(state), "cache_dir": str(tmp_path / "cache")},
        "provision": {"nomad": False, "docker": False},
        "vm": vm,
    }
    lab = Lab(tmp_path, Path(str(vm["image"])), tmp_path / "lab.yaml", StatePaths(state), settings)
    lab.write_config(lab.config)
    yield lab
    lab.kill_all()


# ------------------------------------------------------------------------------------------------ setups --
def running_vm(lab: Lab) -> None:
    lab.start_vm()


def garbage_pidfile(lab: Lab) -> None:
    lab.start_vm()
    lab.state.pidfile.write_bytes(b"\x00\xffgarbage\n")


def pidfile_names_another_process(lab: Lab) -> None:
    lab.start_vm()
    lab.state.pidfile.write_text(f"{os.getpid()}\n")  # alive, but not our qemu


def pidfile_and_record_lost(lab: Lab) -> None:
    """What two unlocked `vm.run`s used to leave: a qemu with neither pidfile nor vm.json."""
    lab.start_vm()
    lab.state.pidfile.unlink()
    lab.state.vm_record.unlink()


def corrupt_overlay(lab: Lab) -> None:
    lab.state.root.mkdir(parents=True)
    lab.state.disk.write_bytes(b"QFI\xfb" + os.urandom(4096))


def overlay_used_elsewhere(lab: Lab) -> None:
    """The overlay is open in a qemu this project did not start (no -pidfile of ours): never booted twice."""
    lab.state.root.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(lab.base),
                    str(lab.state.disk), "2G"], check=True)  # fmt: skip
    other = lab.root / "other.pid"
    subprocess.run(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "128", "-display", "none",
         "-vga", "none", "-monitor", "none", "-drive", f"file={lab.state.disk},if=virtio,format=qcow2",
         "-pidfile", str(other), "-daemonize"], check=True,
    )  # fmt: skip
    FOREIGN.append(int(other.read_text()))


FOREIGN: list[int] = []


def corrupt_base(lab: Lab) -> None:
    """A qcow2 whose data clusters were cut off its end: `qemu-img check` reports errors."""
    raw = lab.root / "data.raw"
    raw.write_bytes(b"\x5a" * (2 << 20))
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(lab.base)], check=True)
    raw.unlink()
    size = lab.base.stat().st_size
    with lab.base.open("r+b") as f:
        f.truncate(size - 1024 * 1024)


def fatal_console(line: str) -> Callable[[Lab], None]:
    def setup(lab: Lab) -> None:
        lab.start_vm()
        with lab.state.serial_log.open("a") as f:  # what a guest that cannot mount its root prints
            f.write(f"[    3.14] Begin: Running /scripts/local-premount ... done.\n{line}\n")

    return setup


def moved_forwards(lab: Lab) -> None:
    """`vm.run` with other forwards than lab.yaml (like INVOKE_VM_PORTS_SSH_HOST=2223 for one command)."""
    moved = lab.write_config(lab.root / "moved.yaml", ports=MOVED)
    lab.start_vm(config=moved)


MOVED = vm_ports()


def lock_held(lab: Lab) -> None:
    """Another lifecycle command holds the state dir's lock (a process running infra.vm.lock.state_lock)."""
    code = (
        "import sys, time; from infra.vm.lock import state_lock; from infra.core.state import StatePaths\n"
        "with state_lock(StatePaths(__import__('pathlib').Path(sys.argv[1])), 'vm.run', 5):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    lab.state.root.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(lab.state.root)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    LOCK_HOLDERS.append(holder)


LOCK_HOLDERS: list[subprocess.Popen[str]] = []


def no_setup(lab: Lab) -> None:
    pass


def stopped_qemu(lab: Lab) -> None:
    """A hung qemu: stopped with SIGSTOP, so its QMP socket accepts connections and never answers."""
    pid = lab.start_vm()
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------- table --
@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Lab], object]
    args: tuple[str, ...]
    code: int
    message: str  # a regex one line of the output must match, after str.format: {pid} = the VM's pid,
    # {ssh}/{nomad} = the MOVED forwards; literal braces are doubled
    env: dict[str, str] = field(default_factory=dict)
    vm_survives: bool = False  # the VM is expected to keep running after the command (then stopped here)
    absent: tuple[str, ...] = ("Traceback",)  # never in the output


CASES = [
    # the VM is identified by its record and command line, not only by the pidfile's text
    Case("garbage-pidfile/status", garbage_pidfile, ("vm.status",), 0, r"^VM: running, pid {pid}\b",
         vm_survives=True),
    Case("garbage-pidfile/stop", garbage_pidfile, ("vm.stop", "--timeout", "0"), 0,
         r"VM stopped \(killed, pid {pid}\)"),
    Case("pidfile-names-other-process/stop", pidfile_names_another_process, ("vm.stop", "--timeout", "0"), 0,
         r"VM stopped \(killed, pid {pid}\)"),
    Case("pidfile-and-record-lost/status", pidfile_and_record_lost, ("vm.status",), 0,
         r"^VM: running, pid {pid}\b", vm_survives=True),
    Case("pidfile-and-record-lost/destroy", pidfile_and_record_lost, ("vm.destroy",), 0,
         r"VM destroyed: removed \d+ item"),
    # images checked before booting; a fatal console line ends the SSH wait at once
    Case("corrupt-overlay/run", corrupt_overlay, ("vm.run",), 1,
         r"^error: VM disk \(overlay\) .*disk\.qcow2 is corrupt or unreadable \(qemu-img check"),
    Case("overlay-in-use-elsewhere/run", overlay_used_elsewhere, ("vm.run",), 1,
         r"^error: VM disk \(overlay\) .*disk\.qcow2 is in use by another process"),
    Case("corrupt-base/run", corrupt_base, ("vm.run",), 1,
         r"^error: base image .*blank\.qcow2 is corrupt or unreadable \(qemu-img check exit 2\)"),
    *[
        Case(f"fatal-console/{name}", fatal_console(line), ("vm.check",), 1,
             rf"^error: the guest cannot boot; its serial console says: {re.escape(line.strip())}",
             env={"INVOKE_VM_SSH_TIMEOUT": "120"}, vm_survives=True)
        for name, line in (
            ("panic", "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"),
            ("initramfs", "(initramfs) "),
            ("mount", "Failed to mount /dev/vda1 on /root"),
        )
    ],
    # tasks that reach the VM use the forwards it was launched with
    Case("moved-forward/check", moved_forwards, ("vm.check",), 2,
         r"^error: timed out after 2s waiting for SSH on 127\.0\.0\.1:{ssh}", env={"INVOKE_VM_SSH_TIMEOUT": "2"},
         vm_survives=True),
    Case("moved-forward/nomad.wait", moved_forwards, ("nomad.wait", "--timeout", "2"), 2,
         r"^error: timed out after 2s waiting for Nomad at http://127\.0\.0\.1:{nomad} ",
         vm_survives=True),
    # `up` without Nomad says so at once; vm.status while the guest boots
    Case("up-without-nomad", no_setup, ("up",), 1,
         r"^error: `inv up` deploys onto the VM's own Nomad, but provision\.nomad is off"),
    Case("status-while-booting", running_vm, ("vm.status",), 0,
         r"^\s+cloud-init: unknown \(SSH not up yet\)$", vm_survives=True,
         absent=("Traceback", "SSHException", "No existing session")),
    # a second lifecycle command waits for the lock, then names its holder
    Case("lock-held/stop", lock_held, ("vm.stop",), 2,
         r"^error: vm\.stop: the state dir .* is locked by pid \d+ \(vm\.run, for \d+s\); waited \d+s",
         env={"INVOKE_VM_LOCK_TIMEOUT": "1"}),
    Case("base-digest-mismatch/run", no_setup, ("vm.run",), 1,
         r"^error: .*blank\.qcow2 does not match vm\.image_sha256: expected 0{{64}}, got [0-9a-f]{{64}}$",
         env={"INVOKE_VM_IMAGE_SHA256": "0" * 64}),
    Case("state-dir-is-a-file/run", lambda lab: lab.state.root.write_text("not a directory"), ("vm.run",), 1,
         r"^error: .*(state dir|state_dir)"),
    # the VM is not running
    Case("not-running/ssh", no_setup, ("vm.ssh", "-c", "true"), 1, r"^error: the VM is not running$"),
    Case("not-running/check", no_setup, ("vm.check",), 1, r"^error: the VM is not running$"),
    Case("not-running/stop", no_setup, ("vm.stop",), 0, r"VM is not running$"),
    Case("not-running/destroy", no_setup, ("vm.destroy",), 0, r"VM destroyed: nothing to remove"),
    Case("not-running/logs", no_setup, ("vm.logs",), 1, r"^error: no serial log at .*serial\.log$"),
    # a hung qemu (SIGSTOP): QMP does not answer, the VM is killed all the same (SIGTERM + SIGCONT, SIGKILL)
    Case("stopped-qemu/stop", stopped_qemu, ("vm.stop",), 0, r"VM stopped \(killed, pid {pid}\)",
         absent=("Traceback", "unexpected", "bug")),
    # `down` asks the hung VM's Nomad forward first: the connection is accepted and never answered, so the
    # question ends at nomad.read_timeout (30 s by default; 2 s here: the wait is not what this case is about)
    Case("stopped-qemu/down", stopped_qemu, ("down",), 0, r"VM stopped \(killed, pid {pid}\)",
         absent=("Traceback", "unexpected", "bug"), env={"INVOKE_NOMAD_READ_TIMEOUT": "2"}),
    Case("missing-qemu/run", no_setup, ("vm.run",), 1,
         r"^error: qemu binary 'qemu-system-nonexistent' not found on PATH$",
         env={"INVOKE_VM_QEMU": "qemu-system-nonexistent"}),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_vm_fault(lab: Lab, case: Case) -> None:
    state_existed = False
    try:
        case.setup(lab)
        state_existed = lab.state.root.exists()
        pids = [p.pid for p in processes_of(lab.state.root)]
        result = lab.inv(*case.args, env=case.env, timeout=300)  # only ends a hang
    finally:
        for holder in LOCK_HOLDERS:
            holder.kill()
            holder.wait(10)
        LOCK_HOLDERS.clear()
        for pid in FOREIGN:  # the foreign qemu is the setup's, not a leftover of the command
            with contextlib.suppress(psutil.NoSuchProcess):
                foreign = psutil.Process(pid)
                foreign.kill()
                foreign.wait(10)
        FOREIGN.clear()
    output = result.stderr + result.stdout
    pattern = case.message.format(
        pid=pids[0] if pids else "NONE", ssh=MOVED["ssh"]["host"], nomad=MOVED["nomad"]["host"]
    )
    assert result.returncode == case.code, output
    assert any(re.search(pattern, line) for line in output.splitlines()), (
        f"no line matches {pattern!r}:\n{output}"
    )
    for word in case.absent:
        assert word not in output, output
    alive = [p.pid for p in processes_of(lab.state.root)]
    if case.vm_survives:
        assert alive == pids, f"the running VM was lost: before {pids}, after {alive}"
        stopped = lab.inv("vm.stop", "--timeout", "0")
        assert stopped.returncode == 0 and f"pid {pids[0]}" in stopped.stderr, stopped.stderr
    assert processes_of(lab.state.root) == [], "a qemu of this state dir is still running"
    assert lab.leftovers() == []
    if not state_existed:
        assert not lab.state.root.exists(), sorted(p.name for p in lab.state.root.iterdir())


# ------------------------------------------------------------------------------------------------ item 7 --
def test_two_vm_runs_at_once_start_one_vm(lab: Lab) -> None:
    """Two `inv vm.run` from an empty state at the same moment: one VM, complete and visible to both."""
    argv = [INV, "-f", str(lab.config), "vm.run"]
    procs = [
        subprocess.Popen(
            argv, cwd=ROOT, env=lab.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    errs = [err for _out, err in outputs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert not any("Traceback" in err for err in errs), errs
    assert sum("VM started: pid" in err for err in errs) == 1, errs
    assert sum("VM already running" in err for err in errs) == 1, errs
    qemus = processes_of(lab.state.root)
    assert len(qemus) == 1, [q.cmdline() for q in qemus]
    assert lab.state.pidfile.read_text().strip() == str(qemus[0].pid)
    assert lab.state.qmp_socket.is_socket()
    assert json.loads(lab.state.vm_record.read_text())["pid"] == qemus[0].pid
    status = lab.inv("vm.status", "--json")
    assert status.returncode == 0, status.stderr
    (info,) = json.loads(status.stdout)["nodes"]  # {"nodes": [...]}, one VM too
    assert info["running"] is True and info["pid"] == qemus[0].pid
    stopped = lab.inv("vm.stop", "--timeout", "0")
    assert stopped.returncode == 0, stopped.stderr
    assert processes_of(lab.state.root) == [] and lab.leftovers() == []


# ------------------------------------------------------------------------------------------------ item 9 --
#: When Ctrl-C hits `inv vm.run`: as soon as a file appears in the state dir (+ a delay in seconds).
INTERRUPT_POINTS = [("vm.lock", 0.0), ("vm.lock", 0.15), ("seed.iso", 0.0), ("disk.qcow2", 0.0),
                    ("qemu.log", 0.0), ("qemu.log", 0.05), ("qemu.pid", 0.0), ("vm.json", 0.0)]  # fmt: skip


@pytest.mark.parametrize(
    ("trigger", "delay"), INTERRUPT_POINTS, ids=[f"{t}+{d}s" for t, d in INTERRUPT_POINTS]
)
def test_ctrl_c_during_vm_run(lab: Lab, trigger: str, delay: float) -> None:
    """Ctrl-C (SIGINT to the foreground process group, as a terminal sends it) at an early point of
    `inv vm.run`: either the VM is complete (the launch had finished), or nothing of it is left."""
    proc = subprocess.Popen(
        [INV, "-f", str(lab.config), "vm.run"],
        cwd=ROOT, env=lab.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    target = lab.state.root / trigger
    deadline = time.monotonic() + 60
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):  # it may have finished just now
        os.killpg(proc.pid, signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    time.sleep(0.5)  # a daemonized qemu that escaped would be up by now
    qemus = processes_of(lab.state.root)
    if qemus:
        # Ctrl-C came after the launch was complete and reported (vm.run's work was done; the signal may
        # still end the process on its way out): a whole VM that the user was told about.
        assert len(qemus) == 1 and lab.state.pidfile.read_text().strip() == str(qemus[0].pid), err
        assert json.loads(lab.state.vm_record.read_text())["pid"] == qemus[0].pid
        assert lab.state.qmp_socket.is_socket()
        assert f"VM started: pid {qemus[0].pid}" in err, f"a VM runs that vm.run did not report:\n{err}"
        assert lab.inv("vm.stop", "--timeout", "0").returncode == 0
    else:  # interrupted: nothing of the VM is left
        assert proc.returncode == 130 and err.rstrip().endswith("interrupted"), (proc.returncode, err)
        assert not lab.state.disk.exists(), "the overlay of an interrupted first run is left"
        assert not lab.state.vm_record.exists(), "a launch record of a VM that never ran"
    assert lab.leftovers() == []


# ---------------------------------------------------------------------- issue 23/7: a guest qemu holds --
def test_paused_guest_is_an_error_not_a_slow_boot(lab: Lab) -> None:
    """A real qemu whose guest is stopped over QMP (`stop`: run state paused): `vm.check` fails at once
    naming the state, instead of waiting for SSH; `vm.status` shows it."""
    pid = lab.start_vm()
    qmp.execute(lab.state.qmp_socket, "stop")
    assert qmp.execute(lab.state.qmp_socket, "query-status")["status"] == "paused"
    check = lab.inv("vm.check", env={"INVOKE_VM_SSH_TIMEOUT": "300"})
    assert check.returncode == 1, check.stderr
    assert_one_error(check.stderr, "the VM does not run: the guest is paused (qemu's `stop`")
    assert "waiting for SSH" not in check.stderr  # it never started the wait
    status = lab.inv("vm.status", "--json")
    assert status.returncode == 0, status.stderr
    (info,) = json.loads(status.stdout)["nodes"]  # {"nodes": [...]}, one VM too
    assert info["run_state"] == "paused" and "qemu run state paused" in info["problem"]
    assert [p.pid for p in processes_of(lab.state.root)] == [pid]  # neither command touched the VM
    assert lab.inv("vm.stop", "--timeout", "0").returncode == 0
    assert processes_of(lab.state.root) == [] and lab.leftovers() == []


def test_io_error_names_the_host_disk(lab: Lab) -> None:
    """qemu paused the guest after a failed disk write (run state io-error, what a full state-dir
    filesystem causes; answered here by a fake QMP in place of the real qemu's socket): `vm.check` and
    `vm.status` name the host filesystem that holds the disk."""
    lab.start_vm()
    lab.state.qmp_socket.unlink()  # the real qemu keeps listening on its unlinked socket
    with FakeQMP(lab.state.qmp_socket, "status:io-error") as fake:
        check = lab.inv("vm.check", env={"INVOKE_VM_SSH_TIMEOUT": "300"})
        status = lab.inv("vm.status")
    assert check.returncode == 1, check.stderr
    line = assert_one_error(check.stderr, "the VM is paused: qemu paused the guest after a write to its disk")
    mount = psutil.disk_partitions(all=True)
    holder = max((m.mountpoint for m in mount if str(lab.state.disk).startswith(m.mountpoint.rstrip("/") + "/")),
                 key=len)  # fmt: skip
    assert f"its disk {lab.state.disk} is on the host filesystem {holder} (" in line, line
    assert f"hint: free space on {holder}" in check.stderr
    assert status.returncode == 0, status.stderr
    assert "VM: qemu runs, guest io-error" in status.stderr and f"host filesystem {holder}" in status.stderr
    assert fake.commands.count("query-status") >= 2
    assert lab.inv("vm.stop", "--timeout", "0").returncode == 0
    assert processes_of(lab.state.root) == [] and lab.leftovers() == []

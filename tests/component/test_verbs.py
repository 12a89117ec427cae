"""infra.vm.verbs's memory of a good `vm.check` per boot, against a real OpenSSH server (tests/support/servers/sshd.py)
standing in for the guest, a stand-in "qemu" process (a sleeping Python whose argv carries the state dir's
`-pidfile`, which is how infra.vm.lifecycle recognises its qemu) with a fake QMP monitor saying the guest runs
(tests/support/servers/qmp.py) and, for `inv up`, the Nomad API double.

The guest's cloud-init state files and boot id are files in tmp_path (infra.guest.ssh reads them with `cat`
over SSH); `cloud-init` itself is a fake on the session PATH that leaves a mark when run, so a test sees
that no guest-side cloud-init (Python) runs. SSH use is counted from sshd's own log (one "Accepted
publickey" line per login), not timed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.doubles.nomad_api import NomadAPIDouble
from support.servers import sshd
from support.servers.common import stop_process
from support.servers.qmp import FakeQMP

from infra.compose import release, stack
from infra.core import config
from infra.core.errors import VMError
from infra.core.state import StatePaths
from infra.guest import ssh
from infra.nomad.client import Client
from infra.vm import verbs

pytestmark = pytest.mark.tools("sshd", "ssh-keygen", "sudo")

DONE_STATUS = {
    "v1": {
        "datasource": "DataSourceNoCloud [seed=/dev/sr0][dsmode=net]",
        "stage": None,
        **{
            s: {"errors": [], "start": 1.0, "finished": 2.0} for s in ("init-local", "init", "modules-config")
        },
        "modules-final": {"errors": [], "start": 3.0, "finished": 4.0},
    }
}
DONE_RESULT = {"v1": {"datasource": "DataSourceNoCloud [seed=/dev/sr0][dsmode=net]", "errors": []}}


@dataclass
class Guest:
    """The stand-in VM: sshd, the fake qemu process, cloud-init's run dir, the boot id file."""

    server: sshd.SSHServer
    fakebin: Path
    run: Path
    boot_id: Path
    cfg: config.Config
    qemu: subprocess.Popen[bytes] | None = None
    qmp: FakeQMP | None = None  # the stand-in's monitor: the guest runs (query-status)

    @property
    def paths(self) -> StatePaths:
        return StatePaths.of(self.cfg)

    def logins(self) -> int:
        """SSH logins so far, as sshd logged them."""
        return self.server.log.read_text(errors="replace").count("Accepted publickey")

    def cloud_init_ran(self) -> bool:
        return (self.fakebin / "cloud-init-ran").exists()

    def boot_qemu(self) -> int:
        """(Re)start the stand-in qemu: a new process (new pid, new start time), recorded as qemu records it."""
        self.stop_qemu()
        p = self.paths
        p.root.mkdir(parents=True, exist_ok=True)
        self.qemu = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)", "-pidfile", str(p.pidfile)]
        )
        p.pidfile.write_text(f"{self.qemu.pid}\n")
        ports = {n: {"host": f.host, "guest": f.guest} for n, f in self.cfg.vm.ports.items()}
        p.vm_record.write_text(json.dumps({"pid": self.qemu.pid, "started_at": time.time(), "ports": ports}))
        p.serial_log.write_text("[    0.000000] Linux version 6.1.0-test\nlogin:\n")
        self.qmp = FakeQMP(p.qmp_socket, "status:running")
        return self.qemu.pid

    def stop_qemu(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.qemu is not None:
            stop_process(self.qemu)
            self.qemu = None

    def finished(self, status: dict[str, Any] = DONE_STATUS, result: dict[str, Any] = DONE_RESULT) -> None:
        (self.run / "status.json").write_text(json.dumps(status))
        (self.run / "result.json").write_text(json.dumps(result))


@pytest.fixture
def guest(
    tmp_path: Path, make_cfg: Callable[..., config.Config], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Guest]:
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    mark = fakebin / "cloud-init-ran"
    (fakebin / "cloud-init").write_text(f"#!/bin/sh\ntouch {mark}\necho 'status: done'\n")
    (fakebin / "cloud-init").chmod(0o755)
    run = tmp_path / "run-cloud-init"
    run.mkdir()
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    monkeypatch.setattr(ssh, "CLOUD_INIT_RUN", str(run))
    monkeypatch.setattr(ssh, "CLOUD_INIT_LOG", str(tmp_path / "cloud-init-output.log"))
    monkeypatch.setattr(ssh, "BOOT_ID", str(boot_id))
    server = sshd.started(env={"PATH": f"{fakebin}:/usr/local/bin:/usr/bin:/bin"})
    g: Guest | None = None
    try:  # from here on the server is stopped whatever fails, set-up included
        cfg = make_cfg(
            ssh={"user": server.user, "private_key": str(server.client_key)},
            vm={"ports": {**config.read_defaults()["vm"]["ports"], "ssh": {"host": server.port, "guest": 22}},
                "baked": "off", "cloud_init_timeout": 30, "ssh_timeout": 30},
            provision={"nomad": False, "docker": False},
        )  # fmt: skip
        g = Guest(server, fakebin, run, boot_id, cfg)
        yield g
    finally:
        if g is not None:
            g.stop_qemu()
        server.cleanup()


def test_a_checked_boot_is_not_logged_into_again(guest: Guest, capsys: pytest.CaptureFixture[str]) -> None:
    guest.boot_qemu()
    guest.finished()
    assert verbs.check_once(guest.cfg) is not None  # never checked: a real check
    assert guest.logins() == 1
    memo = json.loads(guest.paths.vm_checked.read_text())
    assert memo["boot_id"] == "11111111-2222-3333-4444-555555555555" and memo["cloud_init"] == "done"
    capsys.readouterr()

    for _ in range(3):
        assert verbs.check_once(guest.cfg) is None  # remembered: no SSH
    assert guest.logins() == 1
    assert "not asked again" in capsys.readouterr().err
    assert not guest.cloud_init_ran()  # the verdict came from cloud-init's files, not from running it


def test_a_new_qemu_forgets_the_check(guest: Guest) -> None:
    guest.boot_qemu()
    guest.finished()
    verbs.check(guest.cfg)
    assert verbs.remembered(guest.cfg) is not None
    guest.boot_qemu()  # another qemu process: another pid and start time
    assert verbs.remembered(guest.cfg) is None
    verbs.check_once(guest.cfg)
    assert guest.logins() == 2


def test_the_same_pid_with_another_start_time_is_another_boot(guest: Guest) -> None:
    guest.boot_qemu()
    guest.finished()
    verbs.check(guest.cfg)
    memo = json.loads(guest.paths.vm_checked.read_text())
    guest.paths.vm_checked.write_text(json.dumps(memo | {"qemu_started": memo["qemu_started"] - 60}))
    assert verbs.remembered(guest.cfg) is None


def test_a_guest_restart_on_the_console_forgets_the_check(guest: Guest) -> None:
    guest.boot_qemu()
    guest.finished()
    verbs.check(guest.cfg)
    assert verbs.remembered(guest.cfg) is not None  # this boot's own kernel banner came before the check
    with guest.paths.serial_log.open("a") as log:
        log.write("[  120.1] reboot: Restarting system\n")
    assert verbs.remembered(guest.cfg) is None
    guest.boot_id.write_text("99999999-2222-3333-4444-555555555555\n")
    verbs.check_once(guest.cfg)  # checks for real, and remembers the new boot
    assert guest.logins() == 2
    assert json.loads(guest.paths.vm_checked.read_text())["boot_id"].startswith("99999999")


def test_vm_check_always_checks_for_real(guest: Guest) -> None:
    guest.boot_qemu()
    guest.finished()
    for n in range(1, 4):
        report = verbs.check(guest.cfg)
        assert report.cloud_init == "done" and guest.logins() == n


def test_a_failed_cloud_init_is_not_remembered(guest: Guest) -> None:
    guest.boot_qemu()
    guest.finished()
    verbs.check(guest.cfg)  # a good check first: remembered
    assert verbs.remembered(guest.cfg) is not None
    failed = json.loads(json.dumps(DONE_STATUS))
    failed["v1"]["modules-config"]["errors"] = ["('locale', ProcessExecutionError('locale-gen'))"]
    guest.finished(failed, {"v1": {"datasource": None, "errors": failed["v1"]["modules-config"]["errors"]}})
    with pytest.raises(VMError, match=r"cloud-init failed \(status: error\)"):
        verbs.check(guest.cfg)
    assert not guest.paths.vm_checked.exists() and verbs.remembered(guest.cfg) is None
    with pytest.raises(VMError, match="cloud-init failed"):
        verbs.check_once(guest.cfg)  # so `inv up` asks again, and fails again
    assert guest.logins() == 3


def test_remembered_verdict_needs_the_services_now_configured(guest: Guest) -> None:
    guest.boot_qemu()
    guest.finished()
    verbs.check(guest.cfg)
    # docker now expected active: the memory (no services checked) does not cover it
    more = dataclasses.replace(guest.cfg, provision=dataclasses.replace(guest.cfg.provision, docker=True))
    assert verbs.remembered(more) is None


def test_vm_status_reads_the_memory_or_the_files(guest: Guest) -> None:
    guest.boot_qemu()
    (guest.run / "status.json").write_text(json.dumps({"v1": {"stage": "modules-config"}}))
    info = verbs.status(guest.cfg)  # not checked yet: asked over SSH, from the state files
    assert info["cloud_init"] == "running" and "checked" not in info
    assert guest.logins() == 1
    guest.finished()
    verbs.check(guest.cfg)
    info = verbs.status(guest.cfg)
    assert info["cloud_init"] == "done" and info["checked"]["boot_id"].startswith("11111111")
    assert guest.logins() == 2  # the check's login; status asked nobody
    assert not guest.cloud_init_ran()


def test_second_up_does_not_ssh_but_asks_nomad(guest: Guest, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole `inv up` twice on a running VM: the first checks the guest over SSH, the second only
    Nomad (node and driver readiness every time) and the no-op deploys, which name the live image."""
    guest.boot_qemu()
    guest.finished()
    with NomadAPIDouble().ready_now() as api:
        cfg = dataclasses.replace(guest.cfg, nomad=dataclasses.replace(guest.cfg.nomad, addr=api.url))
        client = Client.from_config(cfg)
        release.ship(cfg, client, image="registry.example/app:1")  # `inv deploy.app --image ...`
        stack.up(cfg, client=client)
        assert guest.logins() == 1
        node_reads = api.count("^/v1/node")
        capsys.readouterr()

        stack.up(cfg, client=client)
        assert guest.logins() == 1  # no SSH at all the second time
        assert api.count("^/v1/node") > node_reads  # Nomad's own view of the node asked again
        err = capsys.readouterr().err
        assert "not asked again" in err
        assert "registry.example/app:1 is already live (job app version 0)" in err


def test_inv_up_on_a_checked_vm_neither_logs_in_nor_loads_ssh(
    guest: Guest, run_inv: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """The real CLI, as a subprocess: `inv up` on a VM whose boot was checked makes no SSH login and does
    not even import fabric/paramiko (`python -X importtime` names every module imported)."""
    guest.boot_qemu()
    guest.finished()
    verbs.check(guest.cfg)  # the boot's check (in this process, where the guest's files are redirected)
    settings = tmp_path / "guest.yaml"
    cfg = guest.cfg
    settings.write_text(
        json.dumps(
            {
                "ssh": {"user": cfg.ssh.user, "private_key": cfg.ssh.private_key},
                "vm": {
                    "baked": "off",
                    "ports": {n: {"host": f.host, "guest": f.guest} for n, f in cfg.vm.ports.items()},
                },
                "provision": {"nomad": False, "docker": False},
            }
        )
    )
    with NomadAPIDouble().ready_now() as api:
        to_api = dataclasses.replace(cfg, nomad=dataclasses.replace(cfg.nomad, addr=api.url))
        release.ship(to_api, Client.from_config(to_api), image="registry.example/app:1")
        up = ("-f", str(settings), "up")
        importtime = (sys.executable, "-X", "importtime", str(Path(sys.executable).with_name("inv")))
        first = run_inv(*up, env={"NOMAD_ADDR": api.url})  # writes the seed (validated: jsonschema)
        assert first.returncode == 0, first.stderr[-3000:]
        result = run_inv(*up, env={"NOMAD_ADDR": api.url}, program=importtime)
        assert result.returncode == 0, result.stderr[-3000:]
        assert api.count("^/v1/node") >= 1  # nomad.wait asked Nomad about the node
    assert guest.logins() == 1  # only the check above: neither `inv up` logged in
    loaded = {
        m.split(".")[0]
        for m in re.findall(r"^import time:\s+\d+ \|\s+\d+ \| +([\w.]+)$", result.stderr, re.M)
    }
    assert "infra" in loaded and not loaded & {"fabric", "paramiko", "jsonschema"}
    assert "not asked again" in result.stderr
    assert "registry.example/app:1 is already live" in result.stderr
    assert result.stdout.splitlines()[-1] == "registry.example/app:1"  # what `inv up` prints: the image live

"""infra.guest.ssh against a real OpenSSH server on loopback (tests/support/servers/sshd.py) standing in for the VM.

The "guest" is this machine: `cloud-init` and `systemctl` are fakes put first on the session PATH (sshd
SetEnv), cloud-init's run dir and output log are files in tmp_path. So SSH, the fabric connection, the
known_hosts handling and every failure message are real; only what cloud-init answers is scripted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.clock import FakeClock
from support.servers import sshd

from infra.core import config
from infra.core.errors import VMError, WaitTimeout
from infra.guest import ssh

pytestmark = pytest.mark.tools("sshd", "ssh-keygen", "sudo")


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[tuple[sshd.SSHServer, Path]]:
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    server = sshd.started(env={"PATH": f"{fakebin}:/usr/local/bin:/usr/bin:/bin"})
    try:
        yield server, fakebin
    finally:
        server.cleanup()


def fake(fakebin: Path, name: str, script: str) -> None:
    path = fakebin / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def wait_cloud_init(cfg: config.Config, timeout: float, login_timeout: float = 120, **clock: Any) -> str:
    """Log in (ssh.wait_ssh), wait for cloud-init over that connection (ssh.wait_cloud_init_verdict), close it;
    its status. `clock`: the `sleep=` and `clock=` of cloud-init's wait."""
    conn = ssh.wait_ssh(cfg, timeout=login_timeout)
    try:
        return ssh.wait_cloud_init_verdict(cfg, conn, timeout=timeout, **clock).status
    finally:
        conn.close()


@pytest.fixture
def cfg_for(
    make_cfg: Callable[..., config.Config], guest: tuple[sshd.SSHServer, Path]
) -> Callable[..., config.Config]:
    server, _ = guest

    def make(**vm: object) -> config.Config:
        ports = {"ssh": {"host": server.port, "guest": 22}}
        return make_cfg(
            ssh={"user": server.user, "private_key": str(server.client_key)},
            vm={"ports": {**config.read_defaults()["vm"]["ports"], **ports}, **vm},
            provision={"nomad": False, "docker": False},
        )

    return make


@pytest.fixture
def cloud_init_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    run = tmp_path / "run-cloud-init"
    run.mkdir()
    log = tmp_path / "cloud-init-output.log"
    monkeypatch.setattr(ssh, "CLOUD_INIT_RUN", str(run))
    monkeypatch.setattr(ssh, "CLOUD_INIT_LOG", str(log))
    return run, log


def test_wait_ssh_logs_in_and_remembers_the_host_key(cfg_for: Callable[..., config.Config]) -> None:
    cfg = cfg_for()
    conn = ssh.wait_ssh(cfg, timeout=30)
    try:
        assert ssh.sh(conn, "echo hello").stdout.strip() == "hello"
    finally:
        conn.close()
    known = (cfg.project.state_dir / "ssh" / "known_hosts").read_text()
    assert f"[127.0.0.1]:{cfg.vm.ports['ssh'].host} ssh-ed25519 " in known
    ssh.wait_ssh(cfg, timeout=30).close()  # the remembered key matches


def test_changed_host_key_is_an_error(cfg_for: Callable[..., config.Config]) -> None:
    cfg = cfg_for()
    known = cfg.project.state_dir / "ssh" / "known_hosts"
    known.parent.mkdir(parents=True)
    other = "AAAAC3NzaC1lZDI1NTE5AAAAIDmSGSaGPS93jhw+4Q8bO/Dp7R+WIUbU7/BE2bI4kTCj"
    known.write_text(f"[127.0.0.1]:{cfg.vm.ports['ssh'].host} ssh-ed25519 {other}\n")
    with pytest.raises(VMError, match=r"host key of 127\.0\.0\.1:\d+ changed"):
        ssh.wait_ssh(cfg, timeout=30)


def test_wrong_key_times_out_with_the_reason(cfg_for: Callable[..., config.Config], tmp_path: Path) -> None:
    from infra.core.state import StatePaths
    from infra.guest import keys

    stranger = keys.ensure_generated(StatePaths(tmp_path / "stranger")).private_path
    cfg = cfg_for()
    cfg = config.load(
        {
            "project": {"state_dir": str(cfg.project.state_dir)},
            "ssh": {"user": cfg.ssh.user, "private_key": str(stranger)},
            "vm": {"ports": {n: {"host": p.host, "guest": p.guest} for n, p in cfg.vm.ports.items()}},
        }
    )
    # a fake clock that moves only by the wait's pauses (1 s each): three refused logins, then the timeout,
    # however long each real login takes
    clock = FakeClock()
    with pytest.raises(WaitTimeout) as err:
        ssh.wait_ssh(cfg, timeout=3, sleep=clock.sleep, clock=clock)
    assert "timed out after 3s waiting for SSH on 127.0.0.1" in str(err.value)
    assert "last state: AuthenticationException" in str(err.value)
    assert clock.sleeps == [1.0, 1.0, 1.0]


def test_missing_private_key_is_named(make_cfg: Callable[..., config.Config], tmp_path: Path) -> None:
    cfg = make_cfg(ssh={"private_key": str(tmp_path / "nope")})
    with pytest.raises(Exception, match="nope not found"):
        ssh.connection(cfg)


def test_cloud_init_wait_follows_the_stages(
    cfg_for: Callable[..., config.Config],
    guest: tuple[sshd.SSHServer, Path],
    cloud_init_dirs: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, fakebin = guest
    run, _ = cloud_init_dirs
    (run / "status.json").write_text(
        json.dumps({"v1": {"stage": "modules:config", "init": {"finished": 1.0}}})
    )
    fake(fakebin, "cloud-init", f'touch {fakebin}/ran\necho "status: done"\n')
    # cloud-init finishes once its stage was read: the first look sees modules:config, the next one the
    # result (tied to the wait's own probes, not to a clock that a slow machine could outrun)
    result = '{"v1": {"datasource": "DataSourceNoCloud", "errors": []}}'
    fake(fakebin, "cat", f'/bin/cat "$@"; code=$?\n'
                         f"case \"$*\" in *status.json*) echo '{result}' > {run}/result.json ;; esac\nexit $code\n")  # fmt: skip
    fake(fakebin, "sleep", "exit 0\n")  # the look's wait in the guest (GUEST_WAIT) passes no real second
    assert wait_cloud_init(cfg_for(), timeout=120, login_timeout=120) == "done"
    err = capsys.readouterr().err
    assert "running modules:config" in err and "cloud-init: finished" in err
    assert not (fakebin / "ran").exists()  # read from its state files: cloud-init (Python) never ran


def test_the_wait_for_cloud_init_waits_in_the_guest_instead_of_looking_again(
    cfg_for: Callable[..., config.Config],
    guest: tuple[sshd.SSHServer, Path],
    cloud_init_dirs: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """One look over SSH waits in the guest, a `sleep 1` at a time, until result.json appears: a look costs a
    TCG guest ~0.46 s of CPU, a `sleep` far less. Counted, not timed: the guest's `sleep` is a stand-in that
    counts itself (no real second passes) and cloud-init finishes at its third call."""
    _, fakebin = guest
    run, _ = cloud_init_dirs
    (run / "status.json").write_text(
        json.dumps({"v1": {"stage": "modules:final", "init": {"finished": 1.0}}})
    )
    result = '{"v1": {"datasource": "DataSourceNoCloud", "errors": []}}'
    sleeps, looks = tmp_path / "sleeps", tmp_path / "looks"
    fake(fakebin, "sleep", f'echo "$*" >> {sleeps}\n'
                           f"[ \"$(wc -l < {sleeps})\" -ge 3 ] && echo '{result}' > {run}/result.json\nexit 0\n")  # fmt: skip
    fake(fakebin, "cat", f'case "$*" in *status.json*) echo look >> {looks} ;; esac\nexec /bin/cat "$@"\n')
    assert wait_cloud_init(cfg_for(), timeout=120) == "done"
    assert sleeps.read_text().split() == ["1", "1", "1"]  # waited in the guest until result.json appeared
    assert looks.read_text().split() == ["look"]  # and read the state files once


def test_cloud_init_error_shows_the_log(
    cfg_for: Callable[..., config.Config],
    guest: tuple[sshd.SSHServer, Path],
    cloud_init_dirs: tuple[Path, Path],
) -> None:
    run, log = cloud_init_dirs
    error = "('locale', ProcessExecutionError('Unexpected error while running command.'))"
    stages = {"init": {"errors": [], "finished": 1.0}, "modules-config": {"errors": [error], "finished": 2.0}}
    (run / "status.json").write_text(json.dumps({"v1": {"stage": None, **stages}}))
    (run / "result.json").write_text(
        json.dumps({"v1": {"datasource": "DataSourceNoCloud", "errors": [error]}})
    )
    log.write_text(
        "Cloud-init v. 22.4.2 running 'modules:config'\n*** update-locale: Error: invalid locale\nok\n"
    )
    with pytest.raises(VMError) as err:
        wait_cloud_init(cfg_for(), timeout=30)
    text = str(err.value)
    assert "cloud-init failed (status: error)" in text
    assert f"modules-config: {error}" in text  # the stage's error, as status.json has it
    assert "update-locale: Error: invalid locale" in text  # the relevant line of the output log
    assert "cloud-init analyze" in text  # where to look next


def test_cloud_init_recoverable_errors_are_a_warning(
    cfg_for: Callable[..., config.Config],
    guest: tuple[sshd.SSHServer, Path],
    cloud_init_dirs: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, _ = cloud_init_dirs
    # cloud-init >= 23.4 keeps recoverable errors per stage, by log level (cloudinit/cmd/status.py get_errors)
    final = {
        "errors": [],
        "recoverable_errors": {"WARNING": ["Invalid cloud-config provided"]},
        "finished": 3.0,
    }
    (run / "status.json").write_text(json.dumps({"v1": {"stage": None, "modules-final": final}}))
    (run / "result.json").write_text(json.dumps({"v1": {"errors": []}}))
    assert wait_cloud_init(cfg_for(), timeout=30) == "done"
    err = capsys.readouterr().err
    assert "recoverable errors (degraded done)" in err
    assert "modules-final: WARNING: Invalid cloud-config provided" in err


def test_cloud_init_that_never_finishes_times_out_with_state(
    cfg_for: Callable[..., config.Config],
    guest: tuple[sshd.SSHServer, Path],
    cloud_init_dirs: tuple[Path, Path],
) -> None:
    run, _ = cloud_init_dirs
    (run / "status.json").write_text(json.dumps({"v1": {"stage": "modules:final"}}))
    clock = FakeClock()  # past the deadline at the first pause: one look, however slow the machine
    with pytest.raises(
        WaitTimeout, match="timed out after 2s waiting for cloud-init; last state: running modules:final"
    ):
        wait_cloud_init(cfg_for(), timeout=2, sleep=lambda s: clock.advance(3), clock=clock)


def test_inactive_service_fails_with_its_state(
    cfg_for: Callable[..., config.Config],
    guest: tuple[sshd.SSHServer, Path],
    cloud_init_dirs: tuple[Path, Path],
    make_cfg: Callable[..., config.Config],
) -> None:
    _, fakebin = guest
    fake(fakebin, "systemctl", 'if [ "$2" = docker ]; then echo failed; exit 3; fi\necho active\n')
    base = cfg_for()
    cfg = config.load(
        {
            "project": {"state_dir": str(base.project.state_dir)},
            "ssh": {"user": base.ssh.user, "private_key": base.ssh.private_key},
            "provision": {"docker": True, "nomad": True},
            "vm": {"ports": {n: {"host": p.host, "guest": p.guest} for n, p in base.vm.ports.items()}},
        }
    )
    conn = ssh.wait_ssh(cfg, timeout=30)
    try:
        with pytest.raises(VMError) as err:
            ssh.check_services(cfg, conn)
    finally:
        conn.close()
    assert "service(s) not active: docker (failed)" in str(err.value)
    assert "nomad" not in str(err.value).split("\n")[0]  # nomad answered active


def test_stage_parsing() -> None:
    assert ssh._stage("{}") == "not started"
    assert ssh._stage('{"v1": {"stage": "init-network"}}') == "running init-network"
    assert ssh._stage('{"v1": {"stage": null, "init": {"finished": 2.0}}}') == "running (finished: init)"
    assert "unreadable" in ssh._stage("garbage")


def test_ssh_command_uses_the_project_key_and_loopback(cfg_for: Callable[..., config.Config]) -> None:
    cfg = cfg_for()
    argv = ssh.ssh_command(cfg, "uptime")
    assert argv[0] == "ssh" and argv[-2:] == ["--", "uptime"]
    assert f"{cfg.ssh.user}@127.0.0.1" in argv
    assert "IdentitiesOnly=yes" in argv and "StrictHostKeyChecking=accept-new" in argv
    assert argv[argv.index("-i") + 1] == cfg.ssh.private_key


#: Debian's cloud-init (the guest's version) judging a run dir, run by the system Python that carries it.
CLOUD_INIT_STATUS = """
import json, sys
from cloudinit.cmd import status
from cloudinit.helpers import Paths
d = status.get_status_details(Paths({"run_dir": sys.argv[1]}))
print(json.dumps({"status": d.status.value, "errors": d.errors}))
"""

STAGE_DONE = {"errors": [], "start": 1.0, "finished": 2.0}


@pytest.mark.tools("cloud-init")
@pytest.mark.parametrize(
    ("status", "result"),
    [
        (None, None),  # before the first stage
        (
            {"v1": {"datasource": None, "stage": "init-local", "init-local": {"errors": [], "start": 1.0}}},
            None,
        ),
        ({"v1": {"stage": "modules-config", "init": STAGE_DONE}}, None),
        ({"v1": {"stage": None, "init": STAGE_DONE, "modules-final": STAGE_DONE}}, {"v1": {"errors": []}}),
        (
            {"v1": {"stage": None, "init": STAGE_DONE, "modules-config": {**STAGE_DONE, "errors": ["boom"]}}},
            {"v1": {"errors": ["boom"]}},
        ),
    ],
)
def test_verdict_agrees_with_cloud_init_itself(
    tmp_path: Path, status: dict[str, object] | None, result: dict[str, object] | None
) -> None:
    """`ssh.verdict` on the state probe's output says what Debian's cloud-init (22.4, the guest's) says of
    the same files (cloudinit/cmd/status.py get_status_details): not run/running/done/error."""
    import subprocess

    run = tmp_path / "run"
    run.mkdir()
    for name, body in (("status.json", status), ("result.json", result)):
        if body is not None:
            (run / name).write_text(json.dumps(body))
    probe = ssh._state_probe().replace(ssh.CLOUD_INIT_RUN, str(run))
    ours = ssh.verdict(
        subprocess.run(["sh", "-c", probe], capture_output=True, text=True, check=False).stdout
    )
    theirs = json.loads(
        subprocess.run(
            ["/usr/bin/python3", "-c", CLOUD_INIT_STATUS, str(run)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert {"not run": "not started"}.get(theirs["status"], theirs["status"]) == ours.status
    assert [e.split(": ", 1)[-1] for e in ours.errors] == theirs["errors"]
    assert ours.boot_id  # the probe read this machine's boot id too

"""Checks inside the VM over SSH (fabric): SSH answers, cloud-init finished, enabled services active.

`check(cfg)` is `inv vm.check`, as a list of named steps, each with its own deadline:
1. SSH: log in as `ssh.user` with the project key at 127.0.0.1:<vm.ports.ssh.host> (the slirp forward
   accepts TCP at once, so only a completed SSH login counts); fails fast if qemu dies meanwhile.
2. cloud-init: read its own state files (/run/cloud-init/status.json, result.json) until result.json
   says it finished, and take the verdict from them as `cloud-init status` does (`verdict`): no Python runs
   in the guest (under TCG one `cloud-init status` costs seconds). Errors fail with the error lines of
   /var/log/cloud-init-output.log; recoverable errors only (cloud-init >= 23.4, "degraded done") warn.
3. services: `systemctl is-active` for docker (provision.docker) and nomad (provision.nomad); a failure
   shows the unit's journal.

Host keys: trust on first use, remembered in <state>/ssh/known_hosts (removed with a new overlay disk).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.core import files, ui
from infra.core.config import Config
from infra.core.errors import SSHKeyError, VMError
from infra.core.state import StatePaths
from infra.core.waits import Deadline, Probe, wait_until
from infra.guest import console

if TYPE_CHECKING:  # fabric and paramiko are imported where a connection is made: a task that only reads
    from fabric import Connection  # the VM's remembered check (`inv up` on a checked VM) never loads them

# paramiko logs every failed handshake with a traceback (no handler configured -> logging's last resort
# prints it); while waiting for SSH those failures are expected and summarised on the live line instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

CLOUD_INIT_LOG = "/var/log/cloud-init-output.log"
#: cloud-init's run-time state in the guest: result.json appears when its last stage (modules-final) has
#: finished; status.json tracks the stages. Both are links into /var/lib/cloud/data, made afresh by every
#: boot's first stage (cloudinit/cmd/main.py status_wrapper: init-local deletes them, each stage rewrites
#: status.json, modules-final writes result.json); /run is a tmpfs, so a file there is this boot's.
CLOUD_INIT_RUN = "/run/cloud-init"
#: The guest kernel's id of the running boot: a new one after every reboot.
BOOT_ID = "/proc/sys/kernel/random/boot_id"
#: Starts each section of the state probe's output (a line of its own).
_MARK = "==infra-lab== "


#: Seconds one look at cloud-init may wait IN THE GUEST for result.json before it reads the state files.
#: Each look over SSH costs a TCG guest ~0.46 s of qemu CPU (a session channel, a shell, three `cat`s: 20
#: looks took 9.2 s of qemu CPU, measured on the test image), so looking every 0.5 s took about half a core
#: from the very boot it waited for. Waiting in the guest costs one `sleep` a second instead, and the
#: answer comes within a second of cloud-init finishing.
GUEST_WAIT = 10


def _state_probe(wait: int = 0) -> str:
    """One shell command, no Python in the guest: cloud-init's state files (absent ones say so), whether
    its generator disabled it, and the boot id, each after a marker line. `wait` > 0: first wait up to that
    many seconds for result.json (or a disabled cloud-init), a second at a time."""
    run = CLOUD_INIT_RUN
    waiting = (
        f"i=0; while [ $i -lt {wait} ] && [ ! -e {run}/result.json ] && [ ! -e {run}/disabled ]; do "
        "sleep 1; i=$((i+1)); done; "
        if wait > 0
        else ""
    )
    return (
        waiting
        + f"for f in result.json status.json; do echo '{_MARK}'$f; cat {run}/$f 2>/dev/null; echo; done; "
        f"echo '{_MARK}disabled'; [ -e {run}/disabled ] && echo yes; "
        f"echo '{_MARK}boot_id'; cat {BOOT_ID}"
    )


@dataclass(frozen=True)
class CloudInitVerdict:
    """cloud-init's state as `cloud-init status` derives it from the same files (cloudinit/cmd/status.py
    get_status_details): not started (no status.json), running (status.json without result.json), or
    finished (result.json); `errors` from every stage's `errors` (an error at all: status "error"),
    `recoverable` from each stage's `recoverable_errors` (cloud-init >= 23.4: "degraded done", exit 2)."""

    status: str  # "not started" | "running" | "done" | "error" | "disabled"
    finished: bool
    detail: str = ""
    errors: tuple[str, ...] = ()
    recoverable: tuple[str, ...] = ()
    boot_id: str = ""

    @property
    def word(self) -> str:
        """What `cloud-init status` (extended) would print: done, degraded done, error, running ..."""
        return f"degraded {self.status}" if self.recoverable and not self.errors else self.status


def verdict(probe_output: str) -> CloudInitVerdict:
    """The verdict from the state probe's output (`_state_probe`)."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in probe_output.splitlines():
        if line.startswith(_MARK):
            current = sections.setdefault(line[len(_MARK) :].strip(), [])
        else:
            current.append(line)
    text = {name: "\n".join(lines).strip() for name, lines in sections.items()}
    boot_id = text.get("boot_id", "")
    if text.get("disabled") == "yes":  # cloud-init's generator found it disabled: it will not run this boot
        return CloudInitVerdict("disabled", True, "disabled by cloud-init-generator", boot_id=boot_id)
    status_text, result_text = text.get("status.json", ""), text.get("result.json", "")
    if not status_text and not result_text:
        return CloudInitVerdict("not started", False, boot_id=boot_id)
    try:
        v1 = json.loads(status_text).get("v1", {}) if status_text else {}
        result = json.loads(result_text).get("v1", {}) if result_text else {}
    except (ValueError, AttributeError):
        return CloudInitVerdict("running", False, "status.json unreadable (being written?)", boot_id=boot_id)
    errors: list[str] = []
    recoverable: list[str] = []
    for stage, info in sorted(v1.items()):
        if isinstance(info, dict):
            errors += [f"{stage}: {e}" for e in info.get("errors") or []]
            for level, messages in (info.get("recoverable_errors") or {}).items():
                recoverable += [f"{stage}: {level}: {m}" for m in messages or []]
    if isinstance(result, dict):  # modules-final's summary of every stage's errors: only new ones added
        errors += [
            str(e) for e in result.get("errors") or [] if not any(x.endswith(f": {e}") for x in errors)
        ]
    if not result_text:
        return CloudInitVerdict(
            "running", False, _stage(status_text), tuple(errors), tuple(recoverable), boot_id
        )
    status = "error" if errors else "done"
    detail = str(v1.get("datasource") or result.get("datasource") or "")
    return CloudInitVerdict(status, True, detail, tuple(errors), tuple(recoverable), boot_id)


#: Lines of cloud-init's output log worth showing on failure.
ERROR_LINES = re.compile(r"error|fail|traceback|warn|exception|not found|denied", re.I)


@dataclass
class CheckReport:
    """Outcome of `check`; times are wall-clock epochs (comparable with vm.json's started_at)."""

    started_at: float | None = None  # when the VM was launched, if known
    ssh_at: float = 0.0
    cloud_init_at: float = 0.0
    cloud_init: str = ""
    services: dict[str, str] = field(default_factory=dict)
    boot_id: str = ""  # the guest's boot these checks saw (/proc/sys/kernel/random/boot_id)
    recoverable: list[str] = field(default_factory=list)  # cloud-init's recoverable errors (a warning)

    def as_dict(self) -> dict[str, Any]:
        base = self.started_at
        return {
            "ssh_ready_s": round(self.ssh_at - base, 1) if base else None,
            "cloud_init_done_s": round(self.cloud_init_at - base, 1) if base else None,
            "cloud_init": self.cloud_init,
            "services": self.services,
        }


def private_key(cfg: Config) -> Path:
    path = Path(cfg.ssh.private_key).expanduser() if cfg.ssh.private_key else StatePaths.of(cfg).ssh_key
    if not path.is_file():
        raise SSHKeyError(
            f"SSH private key {path} not found",
            hint="set ssh.private_key to the key matching ssh.public_key, or leave both empty and run "
            "`inv iso` to generate the project key",
        )
    return path


def connection(cfg: Config, timeout: float = 10) -> Connection:
    """A fabric Connection to the VM (not yet opened): project key only, no agent, no ~/.ssh/config."""
    from fabric import Config as FabricConfig
    from fabric import Connection

    state = StatePaths.of(cfg)
    known = state.known_hosts
    files.make_dir(known.parent, "SSH key directory", mode=0o700, error=SSHKeyError)
    os.close(
        files.open_nofollow(
            known, "known_hosts file", os.O_WRONLY | os.O_CREAT, mode=0o600, error=SSHKeyError
        )
    )
    conn = Connection(
        host="127.0.0.1",
        port=cfg.vm.ports["ssh"].host,
        user=cfg.ssh.user,
        config=FabricConfig(overrides={"load_ssh_configs": False}),
        connect_timeout=int(timeout),
        connect_kwargs={
            "key_filename": [str(private_key(cfg))],
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
        },
    )
    conn.client.load_host_keys(str(known))  # AutoAddPolicy then saves new keys here (trust on first use)
    return conn


def sh(conn: Connection, command: str, timeout: float = 60) -> Any:
    """Run `command`, never raising on a non-zero exit (the caller reads `.exited`)."""
    return conn.run(command, hide=True, warn=True, timeout=timeout, in_stream=False)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def wait_ssh(
    cfg: Config,
    timeout: float | None = None,
    alive: Callable[[], bool] | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Connection:
    """An open, working connection; raises WaitTimeout (with the serial log tail) or VMError.
    `sleep` and `clock` drive the deadline (tests pass a fake clock)."""
    from paramiko.ssh_exception import BadHostKeyException

    state = StatePaths.of(cfg)
    port = cfg.vm.ports["ssh"].host
    holder: dict[str, Connection] = {}

    def probe(_deadline: object) -> Probe[None]:
        if alive is not None and not alive():
            raise VMError(
                "qemu exited while waiting for SSH", log=state.serial_log, details=_serial_tail(state, 20)
            )
        _stop_on_fatal_console(state)
        conn = connection(cfg, timeout=5)
        try:
            conn.open()
            result = sh(conn, "true", timeout=10)
        except BadHostKeyException as exc:
            conn.close()
            raise VMError(
                f"the SSH host key of 127.0.0.1:{port} changed ({exc.key.get_name()})",
                hint=f"if the VM was recreated, delete {state.known_hosts}; otherwise something else "
                "answers on that port",
            ) from exc
        except Exception as exc:
            conn.close()
            return Probe(False, _describe(exc))
        if result.exited != 0:
            conn.close()
            return Probe(False, f"login works but `true` exited {result.exited}")
        holder["conn"] = conn
        return Probe(True, f"logged in as {cfg.ssh.user}@127.0.0.1:{port}")

    wait_until(
        probe,
        what=f"SSH on 127.0.0.1:{port}",
        timeout=cfg.vm.ssh_timeout if timeout is None else timeout,
        interval=1.0,
        hint=f"the serial console shows how far the guest got: {state.serial_log} (inv vm.logs)",
        details=lambda: _serial_tail(state, 15),
        sleep=sleep,
        clock=clock,
    )
    return holder["conn"]


def _stop_on_fatal_console(state: StatePaths) -> None:
    """Raise at once when the serial console says the guest cannot boot (no point waiting for SSH)."""
    line = console.fatal_console_line(state.serial_log)
    if line is not None:
        raise VMError(
            f"the guest cannot boot; its serial console says: {line}",
            details=_serial_tail(state, 15),
            log=state.serial_log,
            hint="the disk image (or kernel) is broken: `inv vm.destroy` then `inv vm.run` starts from a fresh "
            "overlay; a corrupt cached base image: delete it from project.cache_dir",
        )


def _serial_tail(state: StatePaths, lines: int) -> list[str]:
    return [f"serial: {line}" for line in console.tail(state.serial_log, lines)]


def wait_cloud_init_verdict(
    cfg: Config,
    conn: Connection,
    timeout: float | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> CloudInitVerdict:
    """Wait for cloud-init to finish; returns its verdict (status, with the boot id it belongs to). Raises
    VMError on failure (with log lines). `sleep` and `clock` drive the deadline (tests pass a fake clock)."""
    state = StatePaths.of(cfg)

    def probe(deadline: Deadline) -> Probe[CloudInitVerdict]:
        _stop_on_fatal_console(state)
        # `cat` of cloud-init's own state files, not `cloud-init status`: under TCG every `cloud-init status`
        # starts a Python interpreter in the guest (seconds), and polling with it slows the boot we wait for.
        # The look waits in the guest first (GUEST_WAIT), never past the wait's own deadline.
        wait = min(GUEST_WAIT, int(deadline.remaining()))
        seen = verdict(sh(conn, _state_probe(wait), timeout=30 + wait).stdout)
        if seen.finished:
            return Probe(True, f"finished: {seen.word}", seen)
        return Probe(False, seen.detail or seen.status)

    found = wait_until(
        probe,
        what="cloud-init",
        timeout=cfg.vm.cloud_init_timeout if timeout is None else timeout,
        interval=0.5,  # between looks that each waited in the guest (GUEST_WAIT)
        hint=f"inv vm.ssh, then read {CLOUD_INIT_LOG}",
        details=lambda: cloud_init_log_lines(conn),
        sleep=sleep,
        clock=clock,
    ).value or CloudInitVerdict("unknown", True)
    if found.status == "done" and found.recoverable:  # cloud-init >= 23.4: `status` would exit 2
        ui.warn("cloud-init finished with recoverable errors (degraded done):")
        for line in found.recoverable:
            ui.info(f"    {line}")
    if found.status == "done":
        return found
    raise VMError(
        f"cloud-init failed (status: {found.word})",
        details=[*found.errors, *cloud_init_log_lines(conn)],
        hint=f"inv vm.ssh, then `sudo less {CLOUD_INIT_LOG}` and `sudo cloud-init analyze show`",
    )


def _stage(status_json: str) -> str:
    """'running modules:config' from /run/cloud-init/status.json ('not started' before it exists)."""
    try:
        v1 = json.loads(status_json).get("v1", {})
    except ValueError:
        return "running (status.json unreadable)"
    if not v1:
        return "not started"
    if v1.get("stage"):
        return f"running {v1['stage']}"
    done = [k for k, v in v1.items() if isinstance(v, dict) and v.get("finished")]
    return f"running (finished: {', '.join(done)})" if done else "running"


def cloud_init_log_lines(conn: Connection, limit: int = 30) -> list[str]:
    """The error-looking lines and the last lines of cloud-init's output log."""
    try:
        text = sh(conn, f"sudo -n cat {CLOUD_INIT_LOG}", timeout=30).stdout
    except Exception as exc:
        return [f"(could not read {CLOUD_INIT_LOG}: {_describe(exc)})"]
    lines = text.splitlines()
    flagged = [f"{CLOUD_INIT_LOG}: {ln}" for ln in lines if ERROR_LINES.search(ln)][-limit:]
    last = [f"{CLOUD_INIT_LOG} (end): {ln}" for ln in lines[-10:]]
    return flagged + last


def enabled_services(cfg: Config) -> list[str]:
    names = []
    if cfg.provision.docker:
        names.append("docker")
    if cfg.provision.nomad:
        names.append("nomad")
    return names


def check_services(cfg: Config, conn: Connection) -> dict[str, str]:
    states: dict[str, str] = {}
    failed = []
    for name in enabled_services(cfg):
        state = sh(conn, f"systemctl is-active {name}", timeout=30).stdout.strip() or "unknown"
        states[name] = state
        if state != "active":
            failed.append(name)
    if failed:
        details: list[str] = []
        for name in failed:
            journal = sh(conn, f"sudo -n journalctl -u {name} -n 25 --no-pager", timeout=30).stdout
            details += [f"{name} is {states[name]}"] + [
                f"journal {name}: {ln}" for ln in journal.splitlines()
            ]
        raise VMError(
            f"service(s) not active: {', '.join(f'{n} ({states[n]})' for n in failed)}",
            details=details + cloud_init_log_lines(conn, limit=15),
            hint="inv vm.ssh, then `systemctl status <unit>`",
        )
    return states


def check(
    cfg: Config, alive: Callable[[], bool] | None = None, started_at: float | None = None
) -> CheckReport:
    """`inv vm.check`: SSH -> cloud-init -> services, each step timed."""
    report = CheckReport(started_at=started_at)
    conn = wait_ssh(cfg, alive=alive)
    report.ssh_at = time.time()
    try:
        found = wait_cloud_init_verdict(cfg, conn)
        report.cloud_init, report.boot_id = found.status, found.boot_id
        report.recoverable = list(found.recoverable)
        report.cloud_init_at = time.time()
        services = enabled_services(cfg)
        report.services = check_services(cfg, conn)
        if services:
            ui.ok(f"services active: {', '.join(services)}")
        else:
            ui.skip("no services to check (provision.docker and provision.nomad are off)")
    finally:
        conn.close()
    if started_at:
        t = report.as_dict()
        ui.ok(f"VM ready: SSH {t['ssh_ready_s']}s, cloud-init done {t['cloud_init_done_s']}s after launch")
    return report


def cloud_init_state(cfg: Config, timeout: float = 5) -> str:
    """One short look for `vm.status`: cloud-init's status word (read from its state files, as `cloud-init
    status` reads them, without starting it), or why it could not be read."""
    from invoke.exceptions import CommandTimedOut, UnexpectedExit
    from paramiko.ssh_exception import AuthenticationException, BadHostKeyException, SSHException

    try:
        conn = connection(cfg, timeout=timeout)
    except SSHKeyError as exc:
        return f"unknown ({exc.message})"
    try:
        try:
            conn.open()
        except (AuthenticationException, BadHostKeyException) as exc:
            return f"unknown (SSH: {_describe(exc)})"
        except (SSHException, OSError, EOFError):
            # refused, reset, no banner, "No existing session": the guest's sshd is not answering yet
            return "unknown (SSH not up yet)"
        return verdict(sh(conn, _state_probe(), timeout=timeout * 2).stdout).word
    except (CommandTimedOut, UnexpectedExit, OSError, Exception) as exc:
        return f"unknown (SSH: {_describe(exc)})"
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def ssh_command(cfg: Config, command: str = "") -> list[str]:
    """The OpenSSH command line for an interactive session (`inv vm.ssh`)."""
    state = StatePaths.of(cfg)
    files.make_dir(state.known_hosts.parent, "SSH key directory", mode=0o700, error=SSHKeyError)
    argv = [
        "ssh", "-i", str(private_key(cfg)), "-p", str(cfg.vm.ports["ssh"].host),
        "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={state.known_hosts}",
        "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=10",
        f"{cfg.ssh.user}@127.0.0.1",
    ]  # fmt: skip
    if command:
        argv += ["--", command]
    return argv

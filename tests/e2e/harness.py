"""What the e2e tests (tests/e2e/test_*.py, wired in conftest.py) use; every product fact comes from infra/.

- **Preflight** (`preflight`): everything the run needs from this machine and the network, checked
  concurrently with short timeouts, so a machine that cannot run the e2e (ours: no Docker Hub, no HashiCorp,
  no cloud images) fails within seconds with ONE message listing every missing prerequisite. A missing
  prerequisite is an error, and TCG-only acceleration is one too unless the caller opts in (`--allow-tcg`).
  Ports, qemu, the base image, the KVM verdict of `inv vm.run` and HVF are asked of infra/ (host, vm, qemu, images).
- **Running inv** (`SubprocessInvoker`): the real `inv` CLI as a subprocess (the exact commands a user
  types), streamed, with a log per call and the phases `inv up` announces ("==> step" lines).
- **Smoke checks** (`Smoke`): against the forwarded ports on 127.0.0.1, through the project's Nomad client
  (infra.nomad.client), its wait loop (infra.core.waits) and its SSH connection (infra.guest.ssh).
- **Timings** and **diagnostics**: the timing table (timings.md/json) and the evidence of a failed run.
- **The Nomad API recording** (`start_recording`): every `inv` the e2e runs, and its own checks, reach Nomad
  through a recording proxy on 127.0.0.1 (tests/e2e/nomad_recording.py) that writes each exchange, secrets
  redacted and tagged with its step, to `<report_dir>/nomad-exchanges.jsonl`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, cast

import requests
from rich.markup import escape

from infra import ROOT
from infra.compose import release
from infra.core import state, ui
from infra.core.config import Config
from infra.core.errors import InfraError, PortInUseError, root_cause
from infra.core.state import StatePaths
from infra.core.waits import Probe, wait_until
from infra.guest import ssh
from infra.vm import baseimages, host, instance, qemu

if not __package__:  # run as a script (`python tests/e2e/harness.py image-cache`, ci.yml): tests/ on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from e2e.nomad_recording import Recorder, RecordingProxy

#: Seconds each network check may take (connect and read); the checks run concurrently.
NET_TIMEOUT = 3.0
#: Seconds a KVM probe guest (a 512-byte boot sector) may take to run and exit.
KVM_PROBE_TIMEOUT = 8.0
#: A second `inv up` on a running setup must finish within this many seconds.
IDEMPOTENT_UP_LIMIT = 60.0

HASHICORP_APT = "https://apt.releases.hashicorp.com/gpg"
DOCKER_REGISTRY = "https://registry-1.docker.io/v2/"
#: The guest installs Docker (and everything else) from its distribution's archive.
DISTRO_ARCHIVES = {
    "ubuntu": "http://archive.ubuntu.com/ubuntu/",
    "debian": "http://deb.debian.org/debian/",
}
INGRESS_HOST = "app.localhost"
#: `inv up` steps that verify instead of act (see infra/compose/stack.py): a second run re-checks, it cannot skip.
CHECK_STEPS = ("vm.check", "nomad.wait")
#: What an acting step says when it had nothing to do (ui.skip lines start with "--").
IDLE_WORDS = ("unchanged", "already", "nothing to do", "up to date")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
#: The Nomad API recording, in e2e.report_dir.
RECORDING_NAME = "nomad-exchanges.jsonl"


class PreflightError(InfraError):
    """A prerequisite of the e2e is missing."""


class SmokeFailed(InfraError):
    """A smoke check saw the stack misbehave."""


class InvCommandFailed(InfraError):
    """An `inv` subprocess exited non-zero or timed out."""


# ================================================================================================ preflight ==
@dataclass(frozen=True)
class Finding:
    """One prerequisite: met or not, what was seen, what to do about it."""

    name: str
    ok: bool
    detail: str
    hint: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class UrlTarget:
    """A URL that must answer. `ok_status`: the statuses that count as reachable (default: any < 400)."""

    name: str
    url: str
    why: str
    method: str = "HEAD"
    ok_status: tuple[int, ...] = ()


def guest_arch(cfg: Config) -> str:
    """The guest architecture `inv vm.run` boots (infra.vm.qemu)."""
    return qemu.guest_arch(cfg.vm.arch, qemu.Platform.current())


def find_qemu(cfg: Config, *, path: str | None = None) -> str:
    """The qemu binary `inv vm.run` would run (infra.vm.qemu.find_qemu), looked up on `path` (default PATH)."""
    return qemu.find_qemu(cfg.vm.qemu, guest_arch(cfg), lambda name: shutil.which(name, path=path))


def check_qemu(cfg: Config, *, path: str | None = None) -> Finding:
    try:
        found = find_qemu(cfg, path=path)
    except InfraError as exc:
        where = " (vm.qemu)" if cfg.vm.qemu else ""
        return Finding("qemu", False, exc.message + where, hint=exc.hint or "")
    return Finding("qemu", True, found)


TCG_HINT = (
    "the e2e needs hardware acceleration (a GitHub-hosted x86 Linux runner has KVM); "
    "pass --allow-tcg to run under TCG anyway (expect it to be several times slower)"
)


def check_accel(
    cfg: Config,
    *,
    allow_tcg: bool = False,
    qemu_path: str | None = None,
    kvm_device: Path = Path("/dev/kvm"),
    system: str | None = None,
    probe_timeout: float = KVM_PROBE_TIMEOUT,
) -> Finding:
    """Hardware acceleration that really works: KVM (device usable, a probe guest runs) or HVF on macOS.

    TCG alone is a failure for the e2e (a full `inv up` would take well over the CI budget) unless
    `allow_tcg`. A KVM that runs the probe but hangs a full kernel (seen on paravirtual hosts) cannot be
    told apart in seconds; `vm.accel: auto` probes with a real boot and falls back, and a failed verdict of
    that probe for this host boot (infra.vm.qemu.cached_kvm_verdict) fails the preflight.
    """
    system = system or platform.system()
    accel = cfg.vm.accel
    if accel == "tcg":
        if allow_tcg:
            return Finding("acceleration", True, "tcg (allowed by --allow-tcg)")
        return Finding("acceleration", False, "vm.accel is tcg (software emulation)", hint=TCG_HINT)
    if system == "Darwin":
        if accel in ("auto", "hvf") and qemu.hvf_supported():
            return Finding("acceleration", True, "hvf (kern.hv_support=1)")
        if allow_tcg:
            return Finding("acceleration", True, "tcg (allowed by --allow-tcg; HVF unavailable)")
        return Finding("acceleration", False, "HVF unavailable (kern.hv_support is not 1)", hint=TCG_HINT)
    if accel == "hvf":
        return Finding("acceleration", False, f"vm.accel is hvf but this is {system}", hint="use kvm or auto")
    problem = kvm_problem(kvm_device)
    if problem is None:
        verdict = qemu.cached_kvm_verdict(cfg.project.cache_dir / state.KVM_PROBE_CACHE)
        if verdict is not None and not verdict[0]:
            problem = f"a probe boot of `inv vm.run` on this host failed: {verdict[1]}"
    if problem is None and qemu_path and guest_arch(cfg) == "x86_64" == qemu.Platform.current().machine:
        problem = kvm_probe_guest(qemu_path, probe_timeout)
    if problem is None:
        return Finding("acceleration", True, f"kvm ({kvm_device} usable, probe guest ran)")
    if allow_tcg and accel == "auto":
        return Finding("acceleration", True, f"tcg (allowed by --allow-tcg; KVM: {problem})")
    hint = (
        'on GitHub Actions add the udev rule KERNEL=="kvm", GROUP="kvm", MODE="0666" and run '
        "`udevadm trigger --name-match=kvm`; elsewhere add yourself to the kvm group. " + TCG_HINT
    )
    return Finding("acceleration", False, f"KVM unusable: {problem}", hint=hint)


_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01


def kvm_problem(device: Path) -> str | None:
    """None when /dev/kvm opens read-write, speaks API version 12 and creates a VM; else what failed."""
    if not device.exists():
        return f"{device} does not exist (no KVM in this kernel or no nested virtualisation)"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{device} is not readable and writable by uid {os.getuid()}"
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        if version != 12:
            return f"{device} reports KVM API version {version}, expected 12"
        vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as exc:
        return f"KVM ioctl on {device} failed: {exc.strerror}"
    finally:
        os.close(fd)
    return None


#: A boot sector: write "K" to the debug console (port 0xe9), then exit qemu through isa-debug-exit
#: (port 0xf4, value 0x10 -> exit status 0x21), then halt forever.
_PROBE_SECTOR = bytes([0xB0, 0x4B, 0xE6, 0xE9, 0xB0, 0x10, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
_PROBE_EXIT = (0x10 << 1) | 1


def kvm_probe_guest(qemu_path: str, timeout: float) -> str | None:
    """Run a 512-byte guest under KVM; None when it ran to its exit port within `timeout`. (Seconds, unlike
    infra.vm.qemu.kvm_probe, which boots the VM's own kernel.)"""
    with tempfile.TemporaryDirectory(prefix="e2e-kvm-") as tmp:
        img = Path(tmp) / "probe.img"
        img.write_bytes(_PROBE_SECTOR + b"\0" * (510 - len(_PROBE_SECTOR)) + b"\x55\xaa")
        cmd = [
            qemu_path, "-accel", "kvm", "-M", "pc", "-m", "16", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-drive", f"file={img},format=raw,if=ide,snapshot=on",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"a probe guest did not finish within {timeout:.0f}s under KVM"
        except OSError as exc:
            return f"cannot run {qemu_path}: {exc}"
    if proc.returncode != _PROBE_EXIT:
        err = " ".join(proc.stderr.split())[-300:]
        return f"qemu -accel kvm exited {proc.returncode}: {err or 'no output'}"
    return None


def check_ports(cfg: Config) -> Finding:
    """Every configured forward's host port is free, as `inv vm.run` checks it (infra.vm.host.check_ports)."""
    try:
        host.check_ports(cfg.vm.ports)
    except PortInUseError as exc:
        hint = "the e2e starts from nothing: `inv down` if it is this project's VM; else " + (exc.hint or "")
        return Finding("ports", False, exc.message, hint=hint)
    return Finding(
        "ports", True, "free on 127.0.0.1: " + ", ".join(str(p.host) for p in cfg.vm.ports.values())
    )


def check_url(target: UrlTarget, timeout: float = NET_TIMEOUT) -> Finding:
    """One request with a short timeout; TLS verified; redirects not followed (an answer is enough)."""
    started = time.monotonic()
    try:
        resp = requests.request(target.method, target.url, timeout=(timeout, timeout), allow_redirects=False)
    except requests.exceptions.SSLError as exc:
        detail = f"{target.url}: TLS failed: {root_cause(exc)}"
    except requests.exceptions.Timeout:
        detail = f"{target.url}: no answer within {timeout:.0f}s"
    except requests.exceptions.ConnectionError as exc:
        detail = f"{target.url}: unreachable: {root_cause(exc)}"
    except requests.exceptions.RequestException as exc:
        detail = f"{target.url}: {root_cause(exc)}"
    else:
        took = time.monotonic() - started
        good = resp.status_code in target.ok_status if target.ok_status else resp.status_code < 400
        if good:
            return Finding(target.name, True, f"{target.url}: HTTP {resp.status_code}", seconds=took)
        detail = f"{target.url}: HTTP {resp.status_code}"
    needed = f" (needed: {target.why})" if target.why else ""
    return Finding(target.name, False, detail + needed, seconds=time.monotonic() - started)


# -------------------------------------------------------------------------------------------- base image --
def image_source(cfg: Config) -> baseimages.ImageSource:
    """The base image `inv vm.run` boots, resolved by infra.vm.baseimages (vm.image, or vm/images.yaml's entry)."""
    try:
        return baseimages.source_for(cfg, guest_arch(cfg))
    except InfraError as exc:
        raise PreflightError(exc.message, hint=exc.hint) from exc


def image_path(cfg: Config, src: baseimages.ImageSource) -> Path:
    """The local file: vm.image's, or the copy in the image cache (infra.vm.baseimages.cache_path)."""
    return src.path if src.path is not None else baseimages.cache_path(cfg.project.cache_dir, src)


def image_cache_key(src: baseimages.ImageSource) -> str:
    """For CI's cache: changes exactly when the pinned digest does."""
    return f"vm-image-{src.algo}-{src.digest}" if src.digest else f"vm-image-{src.name.replace('/', '-')}"


def check_image(
    cfg: Config, *, timeout: float = NET_TIMEOUT, source: baseimages.ImageSource | None = None
) -> Finding:
    """Cached (or local) with the right checksum, or one of its URLs answers a HEAD request."""
    try:
        src = source or image_source(cfg)
    except PreflightError as exc:
        return Finding("base image", False, exc.message, hint=exc.hint or "")
    path = image_path(cfg, src)
    if path.is_file():
        if not src.digest:
            return Finding("base image", True, f"local file {path} (no checksum configured)")
        actual = baseimages.file_digest(path, src.algo)
        if actual == src.digest.lower():
            return Finding("base image", True, f"cached: {path} ({src.algo} ok)")
        if not src.urls:
            return Finding("base image", False, f"{path}: {src.algo} {actual} != expected {src.digest}")
    if not src.urls:
        return Finding("base image", False, f"{path} does not exist", hint="check vm.image")
    tried = []
    for url in src.urls:
        found = check_url(UrlTarget("base image", url, ""), timeout)
        if found.ok:
            return dataclasses.replace(found, detail=f"not cached yet; {found.detail}")
        tried.append(found.detail)
    detail = f"not cached ({path}); " + "; ".join(tried) + " (needed: the VM's base image)"
    return Finding("base image", False, detail)


# ---------------------------------------------------------------------------------------------- the lot --
def default_targets(cfg: Config) -> list[UrlTarget]:
    # 401 + WWW-Authenticate is the registry saying hello to an anonymous client
    targets = [
        UrlTarget(
            "container registry",
            DOCKER_REGISTRY,
            "pulls of Kafka, Postgres, Traefik and the app's base image",
            method="GET",
            ok_status=(200, 401),
        )
    ]
    if cfg.provision.nomad:
        targets.append(
            UrlTarget("HashiCorp apt repository", HASHICORP_APT, "the guest installs Nomad from it")
        )
    family = cfg.vm.distro.split("-", 1)[0]
    if family in DISTRO_ARCHIVES:
        targets.append(
            UrlTarget(
                f"{family} archive", DISTRO_ARCHIVES[family], "the guest installs Docker and packages from it"
            )
        )
    return targets


def preflight(
    cfg: Config,
    *,
    allow_tcg: bool = False,
    timeout: float = NET_TIMEOUT,
    targets: Sequence[UrlTarget] | None = None,
    image: baseimages.ImageSource | None = None,
    path: str | None = None,
    kvm_device: Path = Path("/dev/kvm"),
) -> list[Finding]:
    """Check every prerequisite concurrently; raise PreflightFailed listing all that are missing.

    Each check runs in a daemon thread and the whole preflight is bounded by `timeout` + a few seconds, so
    a DNS lookup that hangs past the requests timeout cannot stall it.
    """
    found_qemu = check_qemu(cfg, path=path)
    qemu_path = found_qemu.detail if found_qemu.ok else None
    checks: list[tuple[str, Callable[[], Finding]]] = [
        (
            "acceleration",
            lambda: check_accel(cfg, allow_tcg=allow_tcg, qemu_path=qemu_path, kvm_device=kvm_device),
        ),
        ("ports", lambda: check_ports(cfg)),
        ("base image", lambda: check_image(cfg, timeout=timeout, source=image)),
    ]
    for target in default_targets(cfg) if targets is None else targets:
        checks.append((target.name, lambda t=target: check_url(t, timeout)))  # type: ignore[misc]
    results: dict[str, Finding] = {}
    lock = threading.Lock()

    def run(name: str, fn: Callable[[], Finding]) -> None:
        started = time.monotonic()
        try:
            found = fn()
        except Exception as exc:  # a check that crashes is a failed check, named
            found = Finding(name, False, f"check crashed: {type(exc).__name__}: {exc}")
        with lock:
            results[name] = dataclasses.replace(found, seconds=time.monotonic() - started)

    threads = [threading.Thread(target=run, args=c, daemon=True, name=f"preflight-{c[0]}") for c in checks]
    for t in threads:
        t.start()
    limit = time.monotonic() + max(timeout * 2, KVM_PROBE_TIMEOUT) + 2
    for t in threads:
        t.join(max(0.0, limit - time.monotonic()))
    findings = [found_qemu]
    with lock:
        for name, _ in checks:
            findings.append(
                results.get(name) or Finding(name, False, "no answer before the preflight deadline")
            )
    if any(not f.ok for f in findings):
        raise PreflightFailed(findings)
    return findings


class PreflightFailed(PreflightError):
    """One error naming every missing prerequisite; carries all findings for the report."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = list(findings)
        missing = [f for f in self.findings if not f.ok]
        super().__init__(
            f"e2e preflight: {len(missing)} of {len(self.findings)} prerequisites missing, "
            "so the e2e cannot run here",
            details=[f"{f.name}: {f.detail}" + (f"\n    hint: {f.hint}" if f.hint else "") for f in missing],
            hint="nothing was started. The full e2e needs KVM and the internet; it runs in GitHub Actions "
            "(.github/workflows/ci.yml, job e2e)",
        )


# ================================================================================================ timings ==
@dataclass
class Timings:
    """(phase, seconds) rows: each test step, each phase `inv up` announces, bring-up and teardown."""

    rows: list[tuple[str, float]] = field(default_factory=list)

    def add(self, phase: str, seconds: float) -> None:
        self.rows.append((phase, seconds))

    def table(self) -> str:
        width = max([len(p) for p, _ in self.rows] + [5])
        lines = [f"| {'phase':<{width}} | seconds |", f"|{'-' * (width + 2)}|--------:|"]
        lines += [f"| {p:<{width}} | {s:7.1f} |" for p, s in self.rows]
        return "\n".join(lines) + "\n"

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        table = directory / "timings.md"
        table.write_text(self.table())
        (directory / "timings.json").write_text(
            json.dumps([{"phase": p, "seconds": round(s, 3)} for p, s in self.rows], indent=2) + "\n"
        )
        return table


# ============================================================================================= running inv ==
@dataclass
class InvResult:
    args: list[str]
    code: int
    seconds: float
    #: (seconds since start, line) for every line of output, ANSI stripped
    lines: list[tuple[float, str]]
    log: Path | None = None

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def phases(self) -> list[tuple[str, float]]:
        """The steps `inv up` announced ("==> step" lines) with the time until the next one or the end."""
        marks = [(t, line[4:].strip()) for t, line in self.lines if line.startswith("==> ")]
        return [
            (name, (marks[i + 1][0] if i + 1 < len(marks) else self.seconds) - t)
            for i, (t, name) in enumerate(marks)
        ]

    def busy_steps(self) -> list[str]:
        """Announced action steps whose output does not say they did nothing: no "--" (skipped) line and
        no "unchanged" / "already" / "nothing to do" / "up to date". Verification steps (vm.check,
        nomad.wait) check rather than act, so they are exempt; they must just pass."""
        sections: list[tuple[str, list[str]]] = []
        for _, line in self.lines:
            if line.startswith("==> "):
                sections.append((line[4:].strip(), []))
            elif sections:
                sections[-1][1].append(line)
        return [
            name
            for name, body in sections
            if not name.startswith(CHECK_STEPS)
            and not any(b.startswith("-- ") or any(w in b.lower() for w in IDLE_WORDS) for b in body)
        ]


class Invoker(Protocol):
    def __call__(self, args: Sequence[str], *, timeout: float) -> InvResult: ...


class SubprocessInvoker:
    """Runs the real `inv` CLI in the repository, streaming its output and keeping a log per call."""

    def __init__(
        self,
        root: Path,
        log_dir: Path,
        *,
        inv: Sequence[str] | None = None,
        echo: bool = True,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` times the output lines and the call (tests pass a fake one: no stopwatch in a verdict)."""
        self.root = root
        self.log_dir = log_dir
        self.inv = list(inv) if inv else inv_command()
        self.echo = echo
        self.env = dict(env or {})
        self.clock = clock
        self.calls = 0

    def __call__(self, args: Sequence[str], *, timeout: float) -> InvResult:
        self.calls += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{self.calls:02d}-inv-{'-'.join(a.lstrip('-') for a in args)[:60]}.log"
        cmd = [*self.inv, *args]
        ui.step(f"inv {' '.join(args)}")
        started = self.clock()
        lines: list[tuple[float, str]] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb", **self.env}
        proc = subprocess.Popen(
            cmd, cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", bufsize=1, start_new_session=True,
        )  # fmt: skip
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            stop_group(proc)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            with log.open("w") as f:
                f.write(f"$ {' '.join(cmd)}\n")
                assert proc.stdout is not None
                for raw in proc.stdout:
                    line = _ANSI.sub("", raw.rstrip("\n"))
                    lines.append((self.clock() - started, line))
                    f.write(line + "\n")
                    f.flush()
                    if self.echo:
                        ui.console.print(f"  [dim]|[/dim] {escape(line)}", highlight=False)
                code = proc.wait()
        except BaseException:
            stop_group(proc)  # interrupted: the child gets SIGINT first, then SIGKILL
            raise
        finally:
            timer.cancel()
        seconds = self.clock() - started
        result = InvResult(list(args), code, seconds, lines, log)
        if code != 0 or timed_out.is_set():
            why = f"timed out after {timeout:.0f}s" if timed_out.is_set() else f"exited {code}"
            raise InvCommandFailed(
                f"`inv {' '.join(args)}` {why}", details=result.tail(25).splitlines(), log=log
            )
        return result


def inv_command() -> list[str]:
    """The `inv` of the Python running us (the nox session's venv), else `python -m invoke`."""
    candidate = Path(sys.executable).with_name("inv")
    return [str(candidate)] if candidate.exists() else [sys.executable, "-m", "invoke"]


def stop_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ================================================================================================ signals ==
def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP as Ctrl-C: pytest then stops the run and tears its fixtures down (`inv down`)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """While inside (teardown): SIGINT/SIGTERM/SIGHUP are noted, not acted on; teardown has its own timeouts."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        ui.warn(f"{signal.Signals(signum).name} during teardown: finishing the teardown first")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield seen
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ============================================================================================ smoke checks ==
def job_ids(cfg: Config) -> list[str]:
    """The project's job IDs in deploy order (data, app, ingress), as infra.compose.release names them."""
    return release.project_jobs(cfg)


def poll(
    what: str,
    probe: Callable[[], tuple[bool, str]],
    timeout: float,
    interval: float = 2.0,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """infra.core.waits.wait_until over a probe whose HTTP/Nomad/SSH errors are a state, not the end."""

    def look(_deadline: object) -> Probe[None]:
        try:
            done, state = probe()
        except (requests.RequestException, InfraError) as exc:
            done, state = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return Probe(done, state)

    return wait_until(look, what=what, timeout=timeout, interval=interval, sleep=sleep, clock=clock).state


def guest_run(cfg: Config, command: str, *, timeout: float = 60) -> str:
    """Run a command in the VM over SSH (infra.guest.ssh: project key, the state dir's known_hosts)."""
    conn = ssh.connection(cfg, timeout=15)
    try:
        res = ssh.sh(conn, command, timeout=timeout)
    except Exception as exc:  # paramiko/socket/invoke errors: the VM's SSH did not work, say how
        raise SmokeFailed(
            f"SSH to {cfg.ssh.user}@127.0.0.1:{cfg.vm.ports['ssh'].host} failed: {type(exc).__name__}: {exc}",
            hint="`inv vm.status`, `inv vm.check`",
        ) from exc
    finally:
        conn.close()
    out = f"{res.stdout}{res.stderr}"
    if res.exited != 0:
        raise SmokeFailed(
            f"in the VM `{command}` exited {res.exited}", details=out.strip().splitlines()[-15:]
        )
    return str(out)


class Smoke:
    """The checks that say the stack works, against the forwarded ports on 127.0.0.1."""

    def __init__(
        self,
        cfg: Config,
        *,
        kafka_bootstrap: str = "",
        http_timeout: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`sleep` and `clock` drive the checks' deadlines (tests pass a fake clock)."""
        self.cfg = cfg
        self.sleep = sleep
        self.clock = clock
        self.http = requests.Session()
        self.http_timeout = http_timeout
        self.marker = f"e2e-{uuid.uuid4()}"
        self.event: dict[str, Any] = {}
        kafka = cfg.vm.ports.get("kafka")
        self.kafka_bootstrap = kafka_bootstrap or f"localhost:{kafka.guest if kafka else 9092}"

    def poll(
        self, what: str, probe: Callable[[], tuple[bool, str]], timeout: float, interval: float = 2.0
    ) -> str:
        return poll(what, probe, timeout, interval, sleep=self.sleep, clock=self.clock)

    def url(self, port_name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.cfg.vm.ports[port_name].host}{path}"

    def nomad(self) -> Any:
        from infra.nomad.client import Client  # the project's client: NOMAD_* env, TLS, token

        return Client.from_config(self.cfg)

    # -- Nomad
    def nomad_answers(self) -> str:
        client = self.nomad()
        leader = client.leader(retries=0)
        if not leader:
            raise SmokeFailed(f"Nomad at {client.addr} answers but has no leader")
        ui_resp = self.http.get(client.addr + "/ui/", timeout=self.http_timeout)
        if ui_resp.status_code >= 400:
            raise SmokeFailed(f"Nomad UI at {client.addr}/ui/ answered HTTP {ui_resp.status_code}")
        return f"leader {leader}, UI HTTP {ui_resp.status_code}"

    def job_health(self, job_id: str) -> tuple[bool, str]:
        client = self.nomad()
        job = client.get(f"/v1/job/{job_id}")
        if job.get("Status") != "running":
            return False, f"{job_id}: job status {job.get('Status')!r}"
        summary = client.get(f"/v1/job/{job_id}/summary").get("Summary", {})
        for group, s in summary.items():
            if s.get("Running", 0) < 1 or s.get("Queued", 0) or s.get("Starting", 0):
                return (
                    False,
                    f"{job_id}.{group}: running={s.get('Running')} starting={s.get('Starting')} queued={s.get('Queued')}",
                )
        allocs = [
            a for a in client.get(f"/v1/job/{job_id}/allocations") or [] if a.get("DesiredStatus") == "run"
        ]
        for a in allocs:
            healthy = (a.get("DeploymentStatus") or {}).get("Healthy")
            if a.get("ClientStatus") != "running" or healthy is False:
                return (
                    False,
                    f"{job_id}: allocation {a.get('ID', '')[:8]} {a.get('ClientStatus')} healthy={healthy}",
                )
        if job.get("Type", "service") == "service":
            dep = client.get(f"/v1/job/{job_id}/deployment")
            if not dep or dep.get("Status") != "successful":
                return False, f"{job_id}: deployment {dep.get('Status') if dep else 'none'}"
            for group, tg in (dep.get("TaskGroups") or {}).items():
                if tg.get("HealthyAllocs", 0) < tg.get("DesiredTotal", 1):
                    return (
                        False,
                        f"{job_id}.{group}: {tg.get('HealthyAllocs')}/{tg.get('DesiredTotal')} healthy",
                    )
        return True, f"{job_id}: running, {len(allocs)} healthy allocation(s)"

    def jobs_healthy(self, timeout: float = 600) -> str:
        ids = job_ids(self.cfg)

        def probe() -> tuple[bool, str]:
            states = [self.job_health(j) for j in ids]
            bad = [s for ok, s in states if not ok]
            return (not bad), ("; ".join(bad) if bad else "; ".join(s for _, s in states))

        return self.poll("every job running with healthy allocations", probe, timeout)

    def first_deploy_clean(self) -> str:
        """The app's first deployment (job version 0) succeeded without a retry: no failed, lost or restarted
        allocation. The first-run races of nomad/README.md, checked on every e2e."""
        app = job_ids(self.cfg)[1]
        client = self.nomad()
        deps = client.get(f"/v1/job/{app}/deployments") or []
        first = [d for d in deps if d.get("JobVersion") == 0]
        if not first:
            raise SmokeFailed(
                f"{app}: no deployment for job version 0 (versions: {[d.get('JobVersion') for d in deps]})"
            )
        if first[-1].get("Status") != "successful":
            raise SmokeFailed(
                f"{app}: first deployment {first[-1].get('Status')}: {first[-1].get('StatusDescription')}"
            )
        problems = []
        for group, s in (client.get(f"/v1/job/{app}/summary").get("Summary") or {}).items():
            if s.get("Failed") or s.get("Lost"):
                problems.append(f"{group}: failed={s.get('Failed')} lost={s.get('Lost')}")
        for a in client.get(f"/v1/job/{app}/allocations", params={"all": "true"}) or []:
            for task, ts in (a.get("TaskStates") or {}).items():
                restarts = ts.get("Restarts", 0) or sum(
                    e.get("Type") == "Restarting" for e in ts.get("Events") or []
                )
                if restarts or ts.get("Failed"):
                    problems.append(
                        f"allocation {a.get('ID', '')[:8]} task {task}: restarts={restarts} failed={ts.get('Failed')}"
                    )
        if problems:
            raise SmokeFailed(f"{app}: the first deployment needed retries", details=problems)
        return f"{app}: version 0 deployment successful, no failed/lost allocations, no restarts"

    # -- app
    def app_healthz(self, timeout: float = 180) -> str:
        def probe() -> tuple[bool, str]:
            r = self.http.get(self.url("app", "/healthz"), timeout=self.http_timeout)
            return r.status_code == 200, f"HTTP {r.status_code} {r.text.strip()[:200]}"

        return self.poll(f"the app on 127.0.0.1:{self.cfg.vm.ports['app'].host}/healthz", probe, timeout)

    def ingress_healthz(self, timeout: float = 180) -> str:
        def probe() -> tuple[bool, str]:
            r = self.http.get(
                self.url("ingress", "/healthz"), headers={"Host": INGRESS_HOST}, timeout=self.http_timeout
            )
            return r.status_code == 200, f"HTTP {r.status_code} {r.text.strip()[:200]}"

        return self.poll(f"the app through Traefik (Host: {INGRESS_HOST})", probe, timeout)

    def ingress_https_healthz(self, timeout: float = 180) -> str:
        """The app through Traefik over HTTPS (vm.ports.ingress_https), the certificate verified against the
        project CA (`inv tls.ca`) for the name app.localhost; and refused without that CA."""
        from requests.adapters import HTTPAdapter

        from infra.compose import ingress

        class Named(HTTPAdapter):  # connect to 127.0.0.1, verify (and send SNI for) app.localhost
            def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
                kwargs["server_hostname"] = INGRESS_HOST
                super().init_poolmanager(*args, **kwargs)

        ca = str(ingress.ca_path(self.cfg))
        url = f"https://127.0.0.1:{self.cfg.vm.ports['ingress_https'].host}/healthz"
        session = requests.Session()
        session.mount("https://", Named())

        def probe() -> tuple[bool, str]:
            r = session.get(url, headers={"Host": INGRESS_HOST}, verify=ca, timeout=self.http_timeout)
            return r.status_code == 200, f"HTTP {r.status_code} {r.text.strip()[:200]}"

        try:
            seen = self.poll(
                f"the app through Traefik over HTTPS (https://{INGRESS_HOST}, CA {ca})", probe, timeout
            )
            try:
                session.get(url, headers={"Host": INGRESS_HOST}, verify=True, timeout=self.http_timeout)
            except requests.exceptions.SSLError:
                return seen + "; refused without the project CA"
            raise SmokeFailed(f"{url} verified without the project CA: not the project's certificate")
        finally:
            session.close()

    def post_event(self) -> str:
        r = self.http.post(self.url("app", "/events"), json={"e2e": self.marker}, timeout=30)
        if r.status_code != 201:
            raise SmokeFailed(f"POST /events answered HTTP {r.status_code}: {r.text.strip()[:300]}")
        self.event = r.json()
        return f"stored id={self.event.get('id')} topic={self.event.get('topic')} offset={self.event.get('offset')}"

    def event_readable(self, timeout: float = 180) -> str:
        """GET /events returns the event posted earlier (after restarts the app may need to reconnect)."""

        def probe() -> tuple[bool, str]:
            r = self.http.get(self.url("app", "/events"), params={"limit": 500}, timeout=self.http_timeout)
            if r.status_code != 200:
                return False, f"HTTP {r.status_code} {r.text.strip()[:200]}"
            events = r.json().get("events", [])
            found = any((e.get("payload") or {}).get("e2e") == self.marker for e in events)
            return found, f"{len(events)} events, ours {'present' if found else 'missing'}"

        return self.poll(f"event {self.marker} readable via GET /events", probe, timeout)

    def event_on_kafka(self, timeout: float = 120) -> str:
        """Read the event back from its topic/partition/offset with Kafka's own console consumer, run inside
        the Kafka container (`docker exec` over SSH) — the broker, not the app, says it is there."""
        topic, part, offset = self.event.get("topic"), self.event.get("partition"), self.event.get("offset")
        if topic is None or part is None or offset is None:
            raise SmokeFailed(f"POST /events did not report topic/partition/offset: {self.event}")
        data_job = job_ids(self.cfg)[0]

        def probe() -> tuple[bool, str]:
            container = self._kafka_container(data_job)
            cmd = (
                f"sudo -n docker exec {container} /opt/kafka/bin/kafka-console-consumer.sh "
                f"--bootstrap-server {self.kafka_bootstrap} --topic {topic} --partition {part} "
                f"--offset {offset} --max-messages 1 --timeout-ms 20000"
            )
            out = guest_run(self.cfg, cmd, timeout=60)
            return self.marker in out, (
                f"found at {topic}/{part}@{offset}" if self.marker in out else out[-300:]
            )

        return self.poll(f"event {self.marker} on Kafka topic {topic}", probe, timeout, interval=5)

    def _kafka_container(self, job_id: str) -> str:
        client = self.nomad()
        for a in client.get(f"/v1/job/{job_id}/allocations") or []:
            if a.get("ClientStatus") != "running":
                continue
            for task in a.get("TaskStates") or {}:
                if "kafka" in task.lower():
                    return f"{task}-{a['ID']}"  # the docker driver names containers <task>-<alloc id>
        raise SmokeFailed(f"{job_id}: no running allocation with a kafka task")

    # -- the whole setup
    def snapshot(self) -> dict[str, Any]:
        """What a no-op `inv up` must leave alone: the qemu process, the seed ISO, every job's version,
        deployment and running allocations."""
        paths = StatePaths.of(self.cfg)
        snap: dict[str, Any] = {
            "qemu pid": paths.pidfile.read_text().strip() if paths.pidfile.exists() else None,
            "seed ISO": (
                (baseimages.file_digest(paths.seed_iso, "sha256"), paths.seed_iso.stat().st_mtime_ns)
                if paths.seed_iso.exists()
                else None
            ),
        }
        client = self.nomad()
        for job in job_ids(self.cfg):
            j = client.get(f"/v1/job/{job}") or {}
            dep = client.get(f"/v1/job/{job}/deployment") or {}
            allocs = client.get(f"/v1/job/{job}/allocations") or []
            snap[f"job {job}"] = {
                "version": j.get("Version"),
                "modify index": j.get("JobModifyIndex"),
                "deployment": dep.get("ID"),
                "running allocations": sorted(a["ID"] for a in allocs if a.get("ClientStatus") == "running"),
            }
        return snap


def up_again_verdict(before: Mapping[str, Any], after: Mapping[str, Any], result: InvResult) -> str:
    """A second `inv up` changed nothing (the snapshots agree), said every acting step had nothing to do, and
    finished within IDEMPOTENT_UP_LIMIT; raise SmokeFailed naming what broke that."""
    changed = [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
    if changed:
        raise SmokeFailed("the second `inv up` changed the running setup", details=changed, log=result.log)
    if not result.phases():
        raise SmokeFailed("the second `inv up` announced no steps (==> lines): cannot tell what it skipped")
    busy = result.busy_steps()
    if busy:
        raise SmokeFailed(f"the second `inv up` did not report as skipped: {', '.join(busy)}", log=result.log)
    if result.seconds >= IDEMPOTENT_UP_LIMIT:
        raise SmokeFailed(
            f"the second `inv up` took {result.seconds:.1f}s (limit {IDEMPOTENT_UP_LIMIT:.0f}s)"
        )
    return f"{len(result.phases())} steps, nothing changed, {result.seconds:.1f}s"


def nothing_left(cfg: Config) -> str:
    """After `inv down`: no qemu of ours (infra.vm.instance.running_pid) and every forwarded port free."""
    pid = instance.running_pid(StatePaths.of(cfg))
    if pid is not None:
        raise SmokeFailed(f"qemu (pid {pid}) still runs after `inv down`")
    ports = check_ports(cfg)
    if not ports.ok:
        raise SmokeFailed(f"after `inv down` ports are still taken: {ports.detail}")
    return "no qemu process, every forwarded port free"


# ======================================================================================= bring-up, teardown ==
@dataclass(frozen=True)
class Action:
    """One step of the bring-up or the teardown: an `inv` call (`args`, within `timeout(cfg)` seconds), or
    a Python step (`call`, e.g. preparing a cached image). A timing row named `name`, plus one row per phase
    an `inv` call announces ("==> step" lines) when `phases` names their prefix."""

    name: str
    args: list[str] = field(default_factory=list)
    timeout: Callable[[Config], float] = lambda cfg: 600
    phases: str = ""
    call: Callable[[Stack], object] | None = None


@dataclass
class Stack:
    """The running setup the tests check: `inv` as a user runs it, the smoke client, the config."""

    cfg: Config
    inv: Invoker
    smoke: Smoke
    timings: Timings
    recorder: Recorder | None = None


def run_action(stack: Stack, action: Action) -> object:
    """Run one Action; its Nomad API exchanges are recorded under its name, its time in the table."""
    if stack.recorder is not None:
        stack.recorder.scenario = action.name
    started = time.monotonic()
    try:
        result = (
            action.call(stack) if action.call else stack.inv(action.args, timeout=action.timeout(stack.cfg))
        )
    finally:
        stack.timings.add(action.name, time.monotonic() - started)
    if action.phases and isinstance(result, InvResult):
        for phase, seconds in result.phases():
            stack.timings.add(f"{action.phases}: {phase}", seconds)
    return result


@contextlib.contextmanager
def running(
    stack: Stack,
    up: Sequence[Action],
    down: Sequence[Action],
    *,
    keep: bool,
    failed: Callable[[], bool],
    diagnose: Callable[[], object],
    verify_down: Callable[[], object],
) -> Iterator[Stack]:
    """`up` in order, then the caller's checks, then ALWAYS (a failed `up`, a failed check as `failed()`
    says, an exception, Ctrl-C or SIGTERM as KeyboardInterrupt): `diagnose()` if anything failed, while the
    VM still runs; every `down` action even if one fails; `verify_down()`. --keep (`keep`) skips `down`.
    Signals during the teardown are noted, not acted on. A teardown error is raised after it all, unless
    an exception is already on its way (which then carries on; the teardown error was printed)."""
    ok = in_flight = False
    try:
        for action in up:
            run_action(stack, action)
        yield stack
        ok = not failed()
    except BaseException:
        in_flight = True
        raise
    finally:
        with signals_deferred():
            errors = tear_down(stack, down, ok=ok, keep=keep, diagnose=diagnose, verify_down=verify_down)
        if errors and not in_flight:
            raise errors[0]


def tear_down(
    stack: Stack,
    down: Sequence[Action],
    *,
    ok: bool,
    keep: bool,
    diagnose: Callable[[], object],
    verify_down: Callable[[], object],
) -> list[Exception]:
    errors: list[Exception] = []
    if not ok:
        try:
            diagnose()
        except Exception as exc:
            ui.warn(escape(f"collecting diagnostics failed: {type(exc).__name__}: {exc}"))
    if keep:
        ui.warn("--keep: the VM and jobs are left running; tear down with `inv down`")
        return errors
    for action in down:
        try:
            run_action(stack, action)
        except Exception as exc:
            ui.warn(escape(f"teardown: {action.name} failed: {exc}"))
            errors.append(exc)
    started = time.monotonic()
    try:
        verify_down()
    except Exception as exc:
        ui.warn(escape(f"teardown: {exc}"))
        errors.append(exc)
    stack.timings.add("nothing left after inv down", time.monotonic() - started)
    return errors


# ============================================================================================ diagnostics ==
GUEST_DIAGNOSTICS = {
    "cloud-init-status.txt": "cloud-init status --long || true",
    "cloud-init-output.log": "sudo -n cat /var/log/cloud-init-output.log",
    "cloud-init.log": "sudo -n tail -n 3000 /var/log/cloud-init.log",
    "journal-nomad-docker.txt": "sudo -n journalctl -u nomad -u docker --no-pager -n 1000",
    "docker-ps.txt": "sudo -n docker ps -a",
}


def collect_diagnostics(cfg: Config, smoke: Smoke, out: Path) -> Path:
    """Evidence for a failed run, gathered while the VM still runs: serial console, qemu log, cloud-init
    logs and the journal (over SSH), Nomad jobs/allocations/deployments with task events (API). Each piece
    that cannot be collected says why in its file."""
    out.mkdir(parents=True, exist_ok=True)
    ui.step(f"e2e: collecting diagnostics into {out}")
    paths = StatePaths.of(cfg)
    for f in (paths.serial_log, paths.qemu_log, paths.vm_record, paths.user_data):
        if f.is_file():
            shutil.copy2(f, out / f.name)
    for name, cmd in GUEST_DIAGNOSTICS.items():
        try:
            (out / name).write_text(guest_run(cfg, cmd, timeout=60))
        except Exception as exc:
            (out / name).write_text(f"could not collect: {type(exc).__name__}: {exc}\n")
    try:
        client = smoke.nomad()
        nomad: dict[str, Any] = {"jobs": client.get("/v1/jobs")}
        for job in job_ids(cfg):
            for what in ("", "/allocations?all=true", "/deployments", "/summary", "/evaluations"):
                with contextlib.suppress(InfraError):
                    nomad[f"/v1/job/{job}{what}"] = client.get(f"/v1/job/{job}{what}")
        (out / "nomad.json").write_text(json.dumps(nomad, indent=2, default=str))
    except Exception as exc:
        (out / "nomad.json").write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    return out


# ============================================================================================== recording ==
def start_recording(cfg: Config) -> tuple[RecordingProxy, Config]:
    """A recording proxy in front of the Nomad API `inv` would use (nomad.* config, NOMAD_* environment, or
    the VM's forward), and `cfg` pointing at it. The caller stops the proxy (which closes the recording)."""
    from infra.nomad.client import settings  # the same resolution as every task's client

    s = settings(cfg)
    recorder = Recorder(cfg.e2e.report_dir / RECORDING_NAME)
    proxy = RecordingProxy(
        s.addr,
        recorder,
        verify=s.cacert or True,
        cert=(s.client_cert, s.client_key) if s.client_cert else None,
        connect_timeout=s.connect_timeout,
    ).start()
    recorded = dataclasses.replace(cfg, nomad=dataclasses.replace(cfg.nomad, addr=proxy.url))
    return proxy, recorded


# ================================================================================================ config ==
def load_config() -> Config:
    """The same merged configuration `inv` sees (invoke.yaml, ~/.invoke.yaml, /etc/invoke.yaml, INVOKE_*)."""
    from invoke.config import Config as InvokeConfig

    from infra.core.config import from_invoke

    c = InvokeConfig(project_location=ROOT)
    c.load_project()
    c.load_shell_env()
    return from_invoke(cast(Mapping[str, Any], c))


def image_cache_main() -> int:
    """`python tests/e2e/harness.py image-cache`: for CI's cache step (`>> $GITHUB_OUTPUT`), the directory
    holding the base image and its .verified marker, and a key made of the pinned digest."""
    try:
        cfg = load_config()
        src = image_source(cfg)
    except InfraError as exc:
        ui.console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    ui.out(f"path={image_path(cfg, src).parent}")
    ui.out(f"key={image_cache_key(src)}")
    return 0


def bake_cache_main() -> int:
    """`python tests/e2e/harness.py bake-cache`: for CI's second cache step, the directory of the baked images
    and a key made of infra.compose.bake's content key (a changed input is a new key: a stale bake is not restored)."""
    from infra.vm import bakecache

    try:
        key, _inputs = bakecache.current_key(load_config())
    except InfraError as exc:
        ui.console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    ui.out(f"path={bakecache.bakes_dir(load_config())}")
    ui.out(f"key=vm-bake-{key}")
    return 0


if __name__ == "__main__":
    commands = {"image-cache": image_cache_main, "bake-cache": bake_cache_main}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit("usage: python tests/e2e/harness.py image-cache|bake-cache")
    sys.exit(commands[sys.argv[1]]())

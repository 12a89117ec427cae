"""The end-to-end run behind `nox -s e2e`: a preflight, then `inv up` -> smoke checks -> `inv down`.

Three parts, each usable alone:

- **Preflight** (`preflight`): everything the run needs from this machine and the network, checked
  concurrently with short timeouts, so a machine that cannot run the e2e (ours: no Docker Hub, no HashiCorp,
  no cloud images) fails within seconds with ONE message listing every missing prerequisite. Never a
  silent pass or skip: a missing prerequisite is an error, and TCG-only acceleration is one too unless the
  caller opts in (`--allow-tcg`).
- **The driver** (`run_plan` + `E2E`): the real `inv` CLI run as subprocesses (the exact commands a user
  types), smoke checks against the forwarded ports, and teardown (`inv down`) guaranteed by try/finally and
  signal handlers unless `--keep`.
- **The report** (`Report`): a JUnit XML file (one testcase per preflight check and per step) and a timing
  table (each step, and each phase `inv up` announces: boot, cloud-init, Nomad ready, each deploy) written
  to `e2e.report_dir`.
- **The Nomad API recording** (`start_recording`): every `inv` the e2e runs, and its own checks, reach Nomad
  through a recording proxy on 127.0.0.1 (infra/nomad_recording.py), which writes each exchange, secrets
  redacted and tagged with its step, to `<report_dir>/nomad-exchanges.jsonl`. `scripts/recording-to-replay`
  turns that into replay fixture scenarios: Nomad's own answers instead of hand-written contract data.
  `--no-record` talks to Nomad directly.

The run bakes first (`inv image.bake`: a no-op when the image cache holds the bake for the current key)
and `inv up` boots that bake, so the timing table shows the bake and the boot apart.

Run it as `python -m infra.e2e [--keep] [--allow-tcg] [--preflight-only]`; `python -m infra.e2e
image-cache` / `bake-cache` print the base image's / the baked image's cache path and key for CI's cache
steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, cast

import requests
from rich.markup import escape

from infra import ROOT, ui
from infra.config import Config
from infra.errors import InfraError, PreflightError, root_cause
from infra.nomad_recording import Recorder, RecordingProxy
from infra.state import StatePaths

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
#: `inv up` steps that verify instead of act (see infra/stack.py): a second run re-checks, it cannot skip.
CHECK_STEPS = ("vm.check", "nomad.wait")
#: What an acting step says when it had nothing to do (ui.skip lines start with "--").
IDLE_WORDS = ("unchanged", "already", "nothing to do", "up to date")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
#: The Nomad API recording, in e2e.report_dir.
RECORDING_NAME = "nomad-exchanges.jsonl"


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


def host_arch(cfg: Config, machine: str | None = None) -> str:
    if cfg.vm.arch != "auto":
        return cfg.vm.arch
    m = (machine or platform.machine()).lower()
    return {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}.get(m, m)


def qemu_binary(cfg: Config) -> str:
    return cfg.vm.qemu or f"qemu-system-{host_arch(cfg)}"


def check_qemu(cfg: Config, *, path: str | None = None) -> Finding:
    name = qemu_binary(cfg)
    found = shutil.which(name, path=path)
    if found:
        return Finding("qemu", True, f"{name} -> {found}")
    where = "vm.qemu" if cfg.vm.qemu else "PATH"
    return Finding(
        "qemu",
        False,
        f"{name} not found ({where})",
        hint="install qemu (Debian/Ubuntu: apt-get install qemu-system-x86 qemu-utils; macOS: brew install "
        "qemu) or set vm.qemu to the binary",
    )


def check_accel(
    cfg: Config,
    *,
    allow_tcg: bool = False,
    qemu: str | None = None,
    kvm_device: Path = Path("/dev/kvm"),
    system: str | None = None,
    probe_timeout: float = KVM_PROBE_TIMEOUT,
) -> Finding:
    """Hardware acceleration that really works: KVM (device usable, a probe guest runs) or HVF on macOS.

    TCG alone is a failure for the e2e (a full `inv up` would take well over the CI budget) unless
    `allow_tcg`. A KVM that runs the probe but hangs a full kernel (seen on paravirtual hosts) cannot be
    told apart in seconds; `vm.accel: auto` probes with a real boot and falls back (issue 3).
    """
    system = system or platform.system()
    accel = cfg.vm.accel
    tcg_hint = "the e2e needs hardware acceleration (a GitHub-hosted x86 Linux runner has KVM); " \
        "pass --allow-tcg to run under TCG anyway (expect it to be several times slower)"  # fmt: skip
    if accel == "tcg":
        if allow_tcg:
            return Finding("acceleration", True, "tcg (allowed by --allow-tcg)")
        return Finding("acceleration", False, "vm.accel is tcg (software emulation)", hint=tcg_hint)
    if system == "Darwin":
        return _check_hvf(accel, allow_tcg, tcg_hint)
    if accel == "hvf":
        return Finding("acceleration", False, f"vm.accel is hvf but this is {system}", hint="use kvm or auto")
    problem = _kvm_problem(kvm_device) or _kvm_verdict_cached(cfg)
    if (
        problem is None
        and qemu
        and host_arch(cfg) == "x86_64"
        and platform.machine().lower() in ("x86_64", "amd64")
    ):
        problem = _kvm_probe_guest(qemu, probe_timeout)
    if problem is None:
        return Finding("acceleration", True, f"kvm ({kvm_device} usable, probe guest ran)")
    if allow_tcg and accel == "auto":
        return Finding("acceleration", True, f"tcg (allowed by --allow-tcg; KVM: {problem})")
    hint = (
        'on GitHub Actions add the udev rule KERNEL=="kvm", GROUP="kvm", MODE="0666" and run '
        "`udevadm trigger --name-match=kvm`; elsewhere add yourself to the kvm group. " + tcg_hint
    )
    return Finding("acceleration", False, f"KVM unusable: {problem}", hint=hint)


def _check_hvf(accel: str, allow_tcg: bool, tcg_hint: str) -> Finding:
    try:
        out = subprocess.run(
            ["sysctl", "-n", "kern.hv_support"], capture_output=True, text=True, timeout=3, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        out = f"sysctl failed: {exc}"
    if out == "1" and accel in ("auto", "hvf"):
        return Finding("acceleration", True, "hvf (kern.hv_support=1)")
    if allow_tcg:
        return Finding("acceleration", True, f"tcg (allowed by --allow-tcg; kern.hv_support={out or '?'})")
    return Finding("acceleration", False, f"HVF unavailable (kern.hv_support={out or '?'})", hint=tcg_hint)


_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01


def _kvm_problem(device: Path) -> str | None:
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


def _kvm_verdict_cached(cfg: Config) -> str | None:
    """`inv vm.run` (accel auto) probes KVM with a real kernel boot and caches the verdict per host boot in
    <cache>/kvm-probe.json (infra/qemu.py). A failed verdict for this boot is a failed prerequisite."""
    try:
        cached = json.loads((cfg.project.cache_dir / "kvm-probe.json").read_text())
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, ValueError):
        return None
    if isinstance(cached, dict) and cached.get("boot_id") == boot_id and cached.get("works") is False:
        return f"a probe boot of `inv vm.run` on this host failed: {cached.get('reason', '?')}"
    return None


#: A boot sector: write "K" to the debug console (port 0xe9), then exit qemu through isa-debug-exit
#: (port 0xf4, value 0x10 -> exit status 0x21), then halt forever.
_PROBE_SECTOR = bytes([0xB0, 0x4B, 0xE6, 0xE9, 0xB0, 0x10, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
_PROBE_EXIT = (0x10 << 1) | 1


def _kvm_probe_guest(qemu: str, timeout: float) -> str | None:
    """Run a 512-byte guest under KVM; None when it ran to its exit port within `timeout`."""
    with tempfile.TemporaryDirectory(prefix="e2e-kvm-") as tmp:
        img = Path(tmp) / "probe.img"
        img.write_bytes(_PROBE_SECTOR + b"\0" * (510 - len(_PROBE_SECTOR)) + b"\x55\xaa")
        cmd = [
            qemu, "-accel", "kvm", "-M", "pc", "-m", "16", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-drive", f"file={img},format=raw,if=ide,snapshot=on",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"a probe guest did not finish within {timeout:.0f}s under KVM"
        except OSError as exc:
            return f"cannot run {qemu}: {exc}"
    if proc.returncode != _PROBE_EXIT:
        err = " ".join(proc.stderr.split())[-300:]
        return f"qemu -accel kvm exited {proc.returncode}: {err or 'no output'}"
    return None


def check_ports(cfg: Config, host: str = "127.0.0.1") -> Finding:
    """Every configured forward's host port can be bound on `host` (as qemu's hostfwd will)."""
    taken: list[str] = []
    for name, port in sorted(cfg.vm.ports.items(), key=lambda kv: kv[1].host):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as qemu's slirp does
            try:
                s.bind((host, port.host))
            except OSError as exc:
                owner = port_owner(port.host)
                taken.append(
                    f"{port.host} (vm.ports.{name}): {exc.strerror}" + (f", held by {owner}" if owner else "")
                )
    if not taken:
        ports = ", ".join(str(p.host) for p in cfg.vm.ports.values())
        return Finding("ports", True, f"free on {host}: {ports}")
    return Finding(
        "ports",
        False,
        f"taken on {host}: " + "; ".join(taken),
        hint="the e2e starts from nothing: stop what holds them (`inv down` if it is this project's VM) or "
        "change vm.ports in a config file",
    )


def port_owner(port: int) -> str:
    """'pid 123 (name)' of the process listening on TCP `port` (Linux /proc), or '' when not found."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    if not inodes:
        return ""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    comm = (proc / "comm").read_text().strip()
                    return f"pid {proc.name} ({comm})"
    return ""


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
@dataclass(frozen=True)
class ImageSource:
    """Where the base image comes from (infra.images decides) and where its cache keeps it."""

    urls: tuple[str, ...]  # primary first, then fallbacks; empty for a local file
    path: Path  # the cached copy, or the local vm.image file
    algo: str  # "sha256" / "sha512" / "" (a local file without a digest)
    digest: str

    @property
    def cache_key(self) -> str:
        """For CI's cache: changes exactly when the pinned digest does."""
        return f"vm-image-{self.algo}-{self.digest}" if self.digest else f"vm-image-{self.path.name}"


def image_source(cfg: Config) -> ImageSource:
    """The base image the VM will boot, resolved by infra.images (vm.image, or vm/images.yaml's entry for
    vm.distro and the guest architecture) — the same resolution `inv vm.run` uses."""
    from infra import images

    try:
        src = images.source_for(cfg, host_arch(cfg))
    except InfraError as exc:
        raise PreflightError(exc.message, hint=exc.hint) from exc
    if src.path is not None:
        return ImageSource((), src.path, src.algo, src.digest)
    return ImageSource(src.urls, images.cache_path(cfg.project.cache_dir, src), src.algo, src.digest)


def file_digest(path: Path, algo: str) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def check_image(cfg: Config, *, timeout: float = NET_TIMEOUT, source: ImageSource | None = None) -> Finding:
    """Cached (or local) with the right checksum, or one of its URLs answers a HEAD request."""
    try:
        src = source or image_source(cfg)
    except PreflightError as exc:
        return Finding("base image", False, exc.message, hint=exc.hint or "")
    if src.path.is_file():
        if not src.digest:
            return Finding("base image", True, f"local file {src.path} (no checksum configured)")
        actual = file_digest(src.path, src.algo)
        if actual == src.digest.lower():
            return Finding("base image", True, f"cached: {src.path} ({src.algo} ok)")
        if not src.urls:
            return Finding("base image", False, f"{src.path}: {src.algo} {actual} != expected {src.digest}")
    if not src.urls:
        return Finding("base image", False, f"{src.path} does not exist", hint="check vm.image")
    tried = []
    for url in src.urls:
        found = check_url(UrlTarget("base image", url, ""), timeout)
        if found.ok:
            return dataclasses.replace(found, detail=f"not cached yet; {found.detail}")
        tried.append(found.detail)
    detail = f"not cached ({src.path}); " + "; ".join(tried) + " (needed: the VM's base image)"
    return Finding("base image", False, detail)


# ---------------------------------------------------------------------------------------------- the lot --
def default_targets(cfg: Config) -> list[UrlTarget]:
    targets = [
        UrlTarget(
            "container registry",
            DOCKER_REGISTRY,
            "pulls of Kafka, Postgres, Traefik and the app's base image",
            method="GET",
            ok_status=(
                200,
                401,
            ),  # 401 + WWW-Authenticate is the registry saying hello to an anonymous client
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
    image: ImageSource | None = None,
    path: str | None = None,
    kvm_device: Path = Path("/dev/kvm"),
) -> list[Finding]:
    """Check every prerequisite concurrently; raise PreflightError listing all that are missing.

    Each check runs in a daemon thread and the whole preflight is bounded by `timeout` + a few seconds, so
    a DNS lookup that hangs past the requests timeout cannot stall it.
    """
    qemu = check_qemu(cfg, path=path)
    qemu_path = shutil.which(qemu_binary(cfg), path=path) if qemu.ok else None
    checks: list[tuple[str, Callable[[], Finding]]] = [
        (
            "acceleration",
            lambda: check_accel(cfg, allow_tcg=allow_tcg, qemu=qemu_path, kvm_device=kvm_device),
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
    findings = [qemu]
    with lock:
        for name, _ in checks:
            findings.append(
                results.get(name) or Finding(name, False, "no answer before the preflight deadline")
            )
    for f in findings:
        if f.ok:
            ui.ok(escape(f"preflight {f.name}: {f.detail}"))
    missing = [f for f in findings if not f.ok]
    if missing:
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


# =================================================================================================== report ==
@dataclass
class StepRecord:
    name: str
    group: str
    seconds: float = 0.0
    status: str = "passed"  # passed | failed | error | skipped
    message: str = ""
    output: str = ""


@dataclass
class Report:
    """Collects step outcomes and timings; writes JUnit XML + a timing table (markdown and JSON)."""

    suite: str = "e2e"
    records: list[StepRecord] = field(default_factory=list)
    #: (phase, seconds): the `inv up` phases (boot, cloud-init, Nomad ready, each deploy) and each step.
    timings: list[tuple[str, float]] = field(default_factory=list)

    def add(self, record: StepRecord) -> None:
        self.records.append(record)

    def add_findings(self, findings: Sequence[Finding]) -> None:
        for f in findings:
            self.add(
                StepRecord(
                    f"preflight: {f.name}",
                    "preflight",
                    f.seconds,
                    "passed" if f.ok else "failed",
                    "" if f.ok else f.detail,
                    f.detail + (f"\nhint: {f.hint}" if f.hint else ""),
                )
            )

    @property
    def failed(self) -> bool:
        return any(r.status in ("failed", "error") for r in self.records)

    def junit(self) -> ET.ElementTree:
        suites = ET.Element("testsuites", name=self.suite)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=self.suite,
            tests=str(len(self.records)),
            failures=str(sum(r.status == "failed" for r in self.records)),
            errors=str(sum(r.status == "error" for r in self.records)),
            skipped=str(sum(r.status == "skipped" for r in self.records)),
            time=f"{sum(r.seconds for r in self.records):.3f}",
        )
        suites.set("tests", suite.get("tests", "0"))
        suites.set("failures", suite.get("failures", "0"))
        suites.set("errors", suite.get("errors", "0"))
        suites.set("time", suite.get("time", "0"))
        for r in self.records:
            case = ET.SubElement(
                suite, "testcase", classname=f"{self.suite}.{r.group}", name=r.name, time=f"{r.seconds:.3f}"
            )
            if r.status in ("failed", "error"):
                tag = "failure" if r.status == "failed" else "error"
                el = ET.SubElement(
                    case, tag, message=r.message.splitlines()[0][:500] if r.message else r.status
                )
                el.text = r.message
            elif r.status == "skipped":
                ET.SubElement(case, "skipped", message=r.message or "skipped")
            if r.output:
                ET.SubElement(case, "system-out").text = _xml_safe(r.output)
        ET.indent(suites)
        return ET.ElementTree(suites)

    def timing_table(self) -> str:
        width = max([len(p) for p, _ in self.timings] + [5])
        lines = [f"| {'phase':<{width}} | seconds |", f"|{'-' * (width + 2)}|--------:|"]
        lines += [f"| {p:<{width}} | {s:7.1f} |" for p, s in self.timings]
        return "\n".join(lines) + "\n"

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        junit = directory / "junit.xml"
        self.junit().write(junit, encoding="utf-8", xml_declaration=True)
        table = directory / "timings.md"
        table.write_text(self.timing_table())
        (directory / "timings.json").write_text(
            json.dumps([{"phase": p, "seconds": round(s, 3)} for p, s in self.timings], indent=2) + "\n"
        )
        return junit, table


def _xml_safe(text: str) -> str:
    """XML 1.0 cannot carry most control characters (terminal output has them)."""
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", _ANSI.sub("", text))


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


class InvCommandFailed(InfraError):
    """An `inv` subprocess exited non-zero or timed out."""


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
    ) -> None:
        self.root = root
        self.log_dir = log_dir
        self.inv = list(inv) if inv else _inv_command()
        self.echo = echo
        self.env = dict(env or {})
        self.calls = 0

    def __call__(self, args: Sequence[str], *, timeout: float) -> InvResult:
        self.calls += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{self.calls:02d}-inv-{'-'.join(a.lstrip('-') for a in args)[:60]}.log"
        cmd = [*self.inv, *args]
        ui.step(f"inv {' '.join(args)}")
        started = time.monotonic()
        lines: list[tuple[float, str]] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb", **self.env}
        proc = subprocess.Popen(
            cmd, cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", bufsize=1, start_new_session=True,
        )  # fmt: skip
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            _stop_group(proc)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            with log.open("w") as f:
                f.write(f"$ {' '.join(cmd)}\n")
                assert proc.stdout is not None  # noqa: S101 - stdout=PIPE
                for raw in proc.stdout:
                    line = _ANSI.sub("", raw.rstrip("\n"))
                    lines.append((time.monotonic() - started, line))
                    f.write(line + "\n")
                    f.flush()
                    if self.echo:
                        ui.console.print(f"  [dim]|[/dim] {escape(line)}", highlight=False)
                code = proc.wait()
        except BaseException:
            _stop_group(proc)  # interrupted: the child gets SIGINT first, then SIGKILL
            raise
        finally:
            timer.cancel()
        seconds = time.monotonic() - started
        result = InvResult(list(args), code, seconds, lines, log)
        if code != 0 or timed_out.is_set():
            why = f"timed out after {timeout:.0f}s" if timed_out.is_set() else f"exited {code}"
            raise InvCommandFailed(
                f"`inv {' '.join(args)}` {why}", details=result.tail(25).splitlines(), log=log
            )
        return result


def _inv_command() -> list[str]:
    """The `inv` of the Python running us (the nox session's venv), else `python -m invoke`."""
    candidate = Path(sys.executable).with_name("inv")
    return [str(candidate)] if candidate.exists() else [sys.executable, "-m", "invoke"]


def _stop_group(proc: subprocess.Popen[str]) -> None:
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


# ================================================================================================== driver ==
class Interrupted(BaseException):
    """SIGTERM/SIGHUP arrived (SIGINT arrives as KeyboardInterrupt). BaseException: no `except Exception` eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Step:
    name: str
    run: Callable[[], Any]
    group: str = "steps"
    #: a label for the timing table ("" = the step's name)
    phase: str = ""


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP raise Interrupted in the main thread (so finally blocks run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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


def run_step(step: Step, report: Report) -> Any:
    """Run one step, record it (time, outcome, evidence); re-raise its failure."""
    ui.step(f"e2e: {step.name}")
    started = time.monotonic()
    record = StepRecord(step.name, step.group)
    try:
        value = step.run()
    except InvCommandFailed as exc:
        record.status, record.message, record.output = "failed", exc.message, str(exc)
        raise
    except InfraError as exc:
        record.status, record.message, record.output = "failed", exc.message, str(exc)
        raise
    except (KeyboardInterrupt, Interrupted) as exc:
        record.status, record.message = "error", f"interrupted ({exc or 'SIGINT'})"
        raise
    except Exception as exc:
        record.status, record.message = "error", f"{type(exc).__name__}: {exc}"
        raise
    else:
        if isinstance(value, InvResult):
            record.output = value.tail(60)
        return value
    finally:
        record.seconds = time.monotonic() - started
        report.add(record)
        report.timings.append((step.phase or step.name, record.seconds))
        if record.status == "passed":
            ui.ok(f"e2e: {step.name} ({record.seconds:.1f}s)")
        else:
            ui.warn(escape(f"e2e: {step.name} {record.status} after {record.seconds:.1f}s: {record.message}"))


def run_plan(
    steps: Sequence[Step],
    teardown: Sequence[Step],
    report: Report,
    *,
    keep: bool = False,
    on_failure: Callable[[], Any] | None = None,
) -> bool:
    """Run `steps` in order, stopping at the first failure; then `teardown` unless `keep`, ALWAYS.

    True when every step (and teardown step) passed. Failures are recorded in `report`, not raised;
    an interruption (Ctrl-C, SIGTERM) still tears down and is then re-raised. `on_failure` (collecting
    logs while the VM still runs) is called after a failure, before teardown; its own errors are noted.
    """
    ok = True
    interrupted: BaseException | None = None
    try:
        with signals_raise():
            for step in steps:
                run_step(step, report)
    except (KeyboardInterrupt, Interrupted) as exc:
        ok, interrupted = False, exc
    except Exception:  # recorded by run_step
        ok = False
    finally:
        if not ok and on_failure is not None:
            with signals_deferred():
                try:
                    on_failure()
                except Exception as exc:
                    ui.warn(escape(f"collecting diagnostics failed: {type(exc).__name__}: {exc}"))
        if keep:
            ui.warn("--keep: the VM and jobs are left running; tear down with `inv down`")
        else:
            with signals_deferred():
                for step in teardown:
                    try:
                        run_step(step, report)
                    except Exception:
                        ok = False  # recorded; the next teardown step still runs
    if interrupted is not None:
        raise interrupted
    return ok


# ============================================================================================ smoke checks ==
class SmokeFailed(InfraError):
    """A smoke check saw the stack misbehave."""


def job_ids(cfg: Config) -> list[str]:
    """The project's job IDs, read from the `job "<id>"` line of each configured spec."""
    ids = []
    for spec in (cfg.deploy.data_job, cfg.deploy.app_job, cfg.deploy.ingress_job):
        try:
            text = spec.read_text()
        except OSError as exc:
            raise SmokeFailed(f"cannot read job spec {spec}: {exc.strerror}") from exc
        m = re.search(r'^\s*job\s+"([^"]+)"', text, re.M)
        if not m:
            raise SmokeFailed(f'{spec}: no `job "<name>"` block found')
        ids.append(m.group(1))
    return ids


def poll(what: str, probe: Callable[[], tuple[bool, str]], timeout: float, interval: float = 2.0) -> str:
    """Call probe until (True, state); raise SmokeFailed with the last state on timeout."""
    deadline = time.monotonic() + timeout
    state = "no answer yet"
    with ui.live(f"waiting for {what}") as line:
        while True:
            try:
                done, state = probe()
            except (requests.RequestException, InfraError) as exc:
                done, state = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            line.update(escape(f"{what}: {state}"))
            if done:
                return state
            if time.monotonic() >= deadline:
                raise SmokeFailed(f"{what}: not true after {timeout:.0f}s; last state: {state}")
            time.sleep(interval)


class Smoke:
    """The checks that say the stack works, against the forwarded ports on 127.0.0.1."""

    def __init__(self, cfg: Config, *, kafka_bootstrap: str = "", http_timeout: float = 10.0) -> None:
        self.cfg = cfg
        self.http = requests.Session()
        self.http_timeout = http_timeout
        self.marker = f"e2e-{uuid.uuid4()}"
        self.event: dict[str, Any] = {}
        kafka = cfg.vm.ports.get("kafka")
        self.kafka_bootstrap = kafka_bootstrap or f"localhost:{kafka.guest if kafka else 9092}"

    def url(self, port_name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.cfg.vm.ports[port_name].host}{path}"

    def nomad(self) -> Any:
        from infra.nomad import Client  # the project's client: NOMAD_* env, TLS, token

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

        return poll("every job running with healthy allocations", probe, timeout)

    def first_deploy_clean(self) -> str:
        """The app's first deployment (job version 0) succeeded without a retry: no failed, lost or restarted
        allocation. This is the hand-made version's flaky first run, checked on every e2e."""
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

        return poll(f"the app on 127.0.0.1:{self.cfg.vm.ports['app'].host}/healthz", probe, timeout)

    def ingress_healthz(self, timeout: float = 180) -> str:
        def probe() -> tuple[bool, str]:
            r = self.http.get(
                self.url("ingress", "/healthz"), headers={"Host": INGRESS_HOST}, timeout=self.http_timeout
            )
            return r.status_code == 200, f"HTTP {r.status_code} {r.text.strip()[:200]}"

        return poll(f"the app through Traefik (Host: {INGRESS_HOST})", probe, timeout)

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

        return poll(f"event {self.marker} readable via GET /events", probe, timeout)

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

        return poll(f"event {self.marker} on Kafka topic {topic}", probe, timeout, interval=5)

    def _kafka_container(self, job_id: str) -> str:
        client = self.nomad()
        for a in client.get(f"/v1/job/{job_id}/allocations") or []:
            if a.get("ClientStatus") != "running":
                continue
            for task in a.get("TaskStates") or {}:
                if "kafka" in task.lower():
                    return f"{task}-{a['ID']}"  # the docker driver names containers <task>-<alloc id>
        raise SmokeFailed(f"{job_id}: no running allocation with a kafka task")


def guest_run(cfg: Config, command: str, *, timeout: float = 60) -> str:
    """Run a command in the VM over SSH (fabric) with the project key; stdout+stderr; raise on failure."""
    from fabric import Connection

    paths = StatePaths(cfg.project.state_dir)
    key = cfg.ssh.private_key or str(paths.ssh_key)
    conn = Connection(
        "127.0.0.1",
        user=cfg.ssh.user,
        port=cfg.vm.ports["ssh"].host,
        connect_timeout=15,
        connect_kwargs={"key_filename": [key], "allow_agent": False, "look_for_keys": False},
    )
    try:
        res = conn.run(command, hide=True, warn=True, timeout=timeout, in_stream=False)
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


# ================================================================================================ the run ==
@dataclass
class Options:
    keep: bool = False
    allow_tcg: bool = False
    preflight_only: bool = False
    kafka_bootstrap: str = ""
    #: seconds for the first `inv up` (TCG on a slow machine needs far more)
    up_timeout: float = 1800
    #: record every Nomad API exchange (through a proxy) into the report
    record: bool = True


class E2E:
    """Builds the plan (the README's steps, each with an automated check) and runs it."""

    def __init__(
        self,
        cfg: Config,
        invoker: Invoker,
        opts: Options,
        report: Report,
        smoke: Smoke | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.cfg = cfg
        self.inv = invoker
        self.opts = opts
        self.report = report
        self.smoke = smoke or Smoke(cfg, kafka_bootstrap=opts.kafka_bootstrap)
        self.recorder = recorder

    def _up_first(self) -> InvResult:
        result = self.inv(["up"], timeout=self.opts.up_timeout)
        self.report.timings.extend((f"inv up: {name}", s) for name, s in result.phases())
        return result

    def _up_again(self) -> str:
        """A second `inv up` changes nothing (same qemu, same seed ISO, same job versions, deployments and
        allocations), says every acting step had nothing to do, and finishes within the limit."""
        before = self.snapshot()
        result = self.inv(["up"], timeout=IDEMPOTENT_UP_LIMIT * 3)
        after = self.snapshot()
        self.report.timings.extend((f"inv up (again): {name}", s) for name, s in result.phases())
        changed = [
            f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
        ]
        if changed:
            raise SmokeFailed(
                "the second `inv up` changed the running setup", details=changed, log=result.log
            )
        if not result.phases():
            raise SmokeFailed(
                "the second `inv up` announced no steps (==> lines): cannot tell what it skipped"
            )
        busy = result.busy_steps()
        if busy:
            raise SmokeFailed(
                f"the second `inv up` did not report as skipped: {', '.join(busy)}", log=result.log
            )
        if result.seconds >= IDEMPOTENT_UP_LIMIT:
            raise SmokeFailed(
                f"the second `inv up` took {result.seconds:.1f}s (limit {IDEMPOTENT_UP_LIMIT:.0f}s)"
            )
        return f"{len(result.phases())} steps, nothing changed, {result.seconds:.1f}s"

    def snapshot(self) -> dict[str, Any]:
        """What a no-op `inv up` must leave alone."""
        paths = StatePaths(self.cfg.project.state_dir)
        snap: dict[str, Any] = {
            "qemu pid": paths.pidfile.read_text().strip() if paths.pidfile.exists() else None,
            "seed ISO": (
                (file_digest(paths.seed_iso, "sha256"), paths.seed_iso.stat().st_mtime_ns)
                if paths.seed_iso.exists()
                else None
            ),
        }
        client = self.smoke.nomad()
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

    def _down_leaves_nothing(self) -> str:
        paths = StatePaths(self.cfg.project.state_dir)
        if paths.pidfile.exists():
            pid = paths.pidfile.read_text().strip()
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                raise SmokeFailed(f"qemu (pid {pid}) still runs after `inv down`", log=paths.pidfile)
        ports = check_ports(self.cfg)
        if not ports.ok:
            raise SmokeFailed(f"after `inv down` ports are still {ports.detail}")
        return "no qemu process, every forwarded port free"

    def _booted_the_bake(self) -> str:
        """`inv up` booted the bake the first step made (vm.baked auto), not the base image."""
        path = StatePaths(self.cfg.project.state_dir).vm_record
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SmokeFailed(f"no launch record of the VM after `inv up`: {path}: {exc}") from exc
        if not record.get("baked"):
            raise SmokeFailed(f"`inv up` booted {record.get('image')}, not a baked image")
        return f"booted baked image {record['baked']}"

    def plan(self) -> tuple[list[Step], list[Step]]:
        s, inv = self.smoke, self.inv
        steps = [
            Step("inv image.bake (once; cached by its key)", lambda: inv(["image.bake"], timeout=self.opts.up_timeout),
                 "bake", "image.bake"),
            Step("inv up (from nothing)", self._up_first, "bring-up", "inv up (total)"),
            Step("inv up booted the baked image", self._booted_the_bake, "bring-up"),
            Step("Nomad API and UI answer", s.nomad_answers, "smoke"),
            Step("every job running and healthy", s.jobs_healthy, "smoke"),
            Step("first app deployment without retries", s.first_deploy_clean, "smoke"),
            Step("app /healthz on 127.0.0.1:app", s.app_healthz, "smoke"),
            Step(f"app through Traefik (Host: {INGRESS_HOST})", s.ingress_healthz, "smoke"),
            Step("POST /events stored", s.post_event, "smoke"),
            Step("GET /events reads it back", s.event_readable, "smoke"),
            Step("event on the Kafka topic", s.event_on_kafka, "smoke"),
            Step("second inv up changes nothing, in seconds", self._up_again, "idempotency", "inv up (again)"),
            Step("inv purge -j datastorage", lambda: inv(["purge", "-j", job_ids(self.cfg)[0]], timeout=600),
                 "persistence"),
            Step("inv deploy.data", lambda: inv(["deploy.data"], timeout=self.cfg.deploy.timeout + 60), "persistence"),
            Step("jobs healthy after redeploying data", s.jobs_healthy, "persistence"),
            Step("event survives purge + deploy.data (Postgres)", s.event_readable, "persistence"),
            Step("event survives purge + deploy.data (Kafka)", s.event_on_kafka, "persistence"),
            Step("inv vm.stop", lambda: inv(["vm.stop"], timeout=self.cfg.vm.stop_timeout + 120), "reboot"),
            Step("inv vm.run", lambda: inv(["vm.run"], timeout=self.cfg.vm.ssh_timeout + 120), "reboot", "reboot: boot"),
            Step("inv nomad.wait", lambda: inv(["nomad.wait"], timeout=self.cfg.nomad.wait_timeout + 60), "reboot",
                 "reboot: Nomad ready"),
            Step("jobs healthy after reboot", s.jobs_healthy, "reboot"),
            Step("event survives reboot (Postgres)", s.event_readable, "reboot"),
            Step("event survives reboot (Kafka)", s.event_on_kafka, "reboot"),
        ]  # fmt: skip
        teardown = [
            Step("inv down", lambda: inv(["down"], timeout=900), "teardown"),
            Step("nothing left after inv down", self._down_leaves_nothing, "teardown"),
        ]
        return steps, teardown

    def run(self) -> bool:
        steps, teardown = self.plan()
        return run_plan(
            [self._tagged(s) for s in steps],
            [self._tagged(s) for s in teardown],
            self.report,
            keep=self.opts.keep,
            on_failure=self._tagged(Step("diagnostics", self.collect_diagnostics)).run,
        )

    def _tagged(self, step: Step) -> Step:
        """The step, with the Nomad API exchanges it causes recorded under its name (one step at a time)."""
        recorder = self.recorder
        if recorder is None:
            return step

        def run() -> Any:
            recorder.scenario = step.name
            return step.run()

        return dataclasses.replace(step, run=run)

    def collect_diagnostics(self) -> Path:
        """Evidence for a failed run, gathered while the VM still runs: serial console, qemu log, cloud-init
        logs and the journal (over SSH), Nomad jobs/allocations/deployments with task events (API)."""
        out = self.cfg.e2e.report_dir / "diagnostics"
        out.mkdir(parents=True, exist_ok=True)
        ui.step(f"e2e: collecting diagnostics into {out}")
        paths = StatePaths(self.cfg.project.state_dir)
        for f in (paths.serial_log, paths.qemu_log, paths.vm_record, paths.user_data):
            if f.is_file():
                shutil.copy2(f, out / f.name)
        guest = {
            "cloud-init-status.txt": "cloud-init status --long || true",
            "cloud-init-output.log": "sudo -n cat /var/log/cloud-init-output.log",
            "cloud-init.log": "sudo -n tail -n 3000 /var/log/cloud-init.log",
            "journal-nomad-docker.txt": "sudo -n journalctl -u nomad -u docker --no-pager -n 1000",
            "docker-ps.txt": "sudo -n docker ps -a",
        }
        for name, cmd in guest.items():
            try:
                (out / name).write_text(guest_run(self.cfg, cmd, timeout=60))
            except Exception as exc:
                (out / name).write_text(f"could not collect: {type(exc).__name__}: {exc}\n")
        try:
            client = self.smoke.nomad()
            nomad: dict[str, Any] = {"jobs": client.get("/v1/jobs")}
            for job in job_ids(self.cfg):
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
    from infra import nomad  # the same resolution as every task's client

    s = nomad.settings(cfg)
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


# ==================================================================================================== main ==
def load_config() -> Config:
    """The same merged configuration `inv` sees (invoke.yaml, ~/.invoke.yaml, /etc/invoke.yaml, INVOKE_*)."""
    from invoke.config import Config as InvokeConfig

    from infra.config import from_invoke

    c = InvokeConfig(project_location=ROOT)
    c.load_project()
    c.load_shell_env()
    return from_invoke(cast(Mapping[str, Any], c))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=("run", "image-cache", "bake-cache"),
                        help="run: the e2e (default); image-cache / bake-cache: print the base / baked image "
                        "cache path and key (CI)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="leave the VM and jobs running (no `inv down`)")
    parser.add_argument("--allow-tcg", action="store_true", help="accept TCG (software) acceleration")
    parser.add_argument("--preflight-only", action="store_true", help="check the prerequisites and stop")
    parser.add_argument("--kafka-bootstrap", default="", help="bootstrap server inside the Kafka container")
    parser.add_argument("--up-timeout", type=float, default=1800, help="seconds for the first `inv up`")
    parser.add_argument("--no-record", action="store_true",
                        help=f"talk to Nomad directly, without recording the API exchanges ({RECORDING_NAME})")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        cfg = load_config()
    except InfraError as exc:
        ui.console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    if args.command == "image-cache":
        try:
            src = image_source(cfg)
        except InfraError as exc:
            ui.console.print(f"[red]error:[/red] {escape(str(exc))}")
            return 1
        ui.out(f"path={src.path.parent}")  # the directory holding the file and its .verified marker
        ui.out(f"key={src.cache_key}")
        return 0
    if args.command == "bake-cache":
        from infra import bake

        try:
            key, _inputs = bake.current_key(cfg)
        except InfraError as exc:
            ui.console.print(f"[red]error:[/red] {escape(str(exc))}")
            return 1
        ui.out(f"path={bake.bakes_dir(cfg)}")
        ui.out(f"key=vm-bake-{key}")
        return 0

    opts = Options(
        args.keep,
        args.allow_tcg,
        args.preflight_only,
        args.kafka_bootstrap,
        args.up_timeout,
        not args.no_record,
    )
    report = Report()
    report_dir = cfg.e2e.report_dir
    started = time.monotonic()
    proxy: RecordingProxy | None = None
    try:
        ui.step("e2e: preflight")
        try:
            findings = preflight(cfg, allow_tcg=opts.allow_tcg)
        except PreflightFailed as exc:
            report.add_findings(exc.findings)
            ui.console.print(f"[red]error:[/red] {escape(str(exc))}")
            return 1
        report.add_findings(findings)
        report.timings.append(("preflight", time.monotonic() - started))
        if opts.preflight_only:
            ui.ok("preflight passed (--preflight-only: nothing started)")
            return 0
        env = {}
        accel = next(f for f in findings if f.name == "acceleration")
        if cfg.vm.accel == "auto" and accel.detail.startswith("kvm"):
            # the preflight proved KVM: pin it, so a failing probe boot cannot quietly fall back to TCG
            env["INVOKE_VM_ACCEL"] = "kvm"
            ui.info("e2e: running inv with vm.accel=kvm (INVOKE_VM_ACCEL)")
        for stale in ("logs", "diagnostics"):  # of an earlier run: this report must not mix them in
            shutil.rmtree(report_dir / stale, ignore_errors=True)
        (report_dir / RECORDING_NAME).unlink(missing_ok=True)
        smoke_cfg = cfg
        if opts.record:
            try:
                proxy, smoke_cfg = start_recording(cfg)
            except InfraError as exc:
                ui.console.print(f"[red]error:[/red] {escape(str(exc))}")
                return 1
            # config beats NOMAD_ADDR (infra/nomad.py settings), so INVOKE_NOMAD_ADDR reaches every task
            env["INVOKE_NOMAD_ADDR"] = proxy.url
            ui.info(
                f"e2e: Nomad API {proxy.upstream} recorded through {proxy.url} into {proxy.recorder.path}"
            )
        invoker = SubprocessInvoker(cfg.root, report_dir / "logs", env=env)
        smoke = Smoke(smoke_cfg, kafka_bootstrap=opts.kafka_bootstrap)
        ok = E2E(cfg, invoker, opts, report, smoke, proxy.recorder if proxy else None).run()
    except (KeyboardInterrupt, Interrupted) as exc:
        ui.warn(f"interrupted ({exc or 'SIGINT'}); teardown ran unless --keep")
        return 130
    finally:
        if proxy is not None:
            proxy.stop()
            ui.info(f"Nomad API recording: {proxy.recorder.count} exchange(s) in {proxy.recorder.path}")
        report.timings.append(("e2e total", time.monotonic() - started))
        junit, table = report.write(report_dir)
        ui.info(escape(report.timing_table()))
        ui.info(f"report: {junit}, {table}")
    failed = [r for r in report.records if r.status in ("failed", "error")]
    if not ok or failed:
        names = ", ".join(r.name for r in failed) or "see above"
        ui.console.print(f"[red]e2e failed:[/red] {escape(names)}")
        for r in failed:
            ui.info(escape(f"--- {r.name}\n{r.output or r.message}"))
        return 1
    ui.ok(f"e2e passed: {len(report.records)} checks in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

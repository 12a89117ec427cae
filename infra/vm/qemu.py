"""The QEMU command line, per guest architecture, acceleration and host platform.

`build_command(spec)` is pure: a `LaunchSpec` in, an argument list out (unit-tested per platform). The
impure parts sit beside it, each small: finding the qemu binary and the aarch64 UEFI firmware, and choosing
the accelerator (`resolve_accel`), which for KVM means proving it works with a short probe boot.

Why a probe: on our CI machines `/dev/kvm` exists and opens, SeaBIOS even runs under it, but a stock Linux
kernel hangs before printing its first line (and `-cpu host` aborts on an MSR write). So `auto` picks KVM
only when a probe boot under `-accel kvm` reaches the kernel's "Run /init" line on the serial console
within seconds; otherwise TCG with a visible warning. The verdict is cached per host boot.
"""

from __future__ import annotations

import json
import os
import platform as platform_mod
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from infra.core import files, ui
from infra.core.config import Port
from infra.core.errors import VMError

ARCHES = ("x86_64", "aarch64")
_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}

#: Serial-console lines that prove a guest kernel is making progress (printed within ~2 s under a
#: working KVM; never printed under the broken KVM of our CI hosts, which hangs before "Linux version").
KVM_PROBE_MARKERS = re.compile(r"Run /init as init process|Freeing unused kernel|systemd\[1\]")
KVM_PROBE_TIMEOUT = 20.0
#: The KVM probe's verdict, cached per host boot in the cache directory (project.cache_dir).


@dataclass(frozen=True)
class Platform:
    """The host: operating system (`platform.system()`) and normalized machine architecture."""

    system: str  # "Linux" | "Darwin" | ...
    machine: str  # "x86_64" | "aarch64"

    @classmethod
    def current(cls) -> Platform:
        return cls(platform_mod.system(), normalize_arch(platform_mod.machine()))


@dataclass(frozen=True)
class Firmware:
    """UEFI code for aarch64 `virt`: a 64 MiB pflash image, or a plain `-bios` ROM (Debian's QEMU_EFI.fd)."""

    path: Path
    pflash: bool


@dataclass(frozen=True)
class ClusterNIC:
    """A second NIC on a host-local L2: a port of the vde_switch whose socket directory is `switch`."""

    switch: Path
    mac: str
    primary_mac: str  # the user-mode NIC's, set with it: the guest's network-config tells them apart


@dataclass(frozen=True)
class LaunchSpec:
    """Everything the command line depends on; paths are absolute."""

    qemu: str
    arch: str
    accel: str  # resolved: kvm | hvf | tcg
    cpus: int
    memory_mb: int
    disk: Path
    seed_iso: Path | None
    pidfile: Path
    serial_log: Path
    qmp_socket: Path
    forwards: Mapping[str, Port] = field(default_factory=dict)
    name: str = "infra-lab"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    firmware: Firmware | None = None
    daemonize: bool = True
    offline: bool = False  # no route out of the guest (user networking's restrict=on); forwards still work
    cluster_nic: ClusterNIC | None = None  # a local cluster's private network (vm.nodes >= 3)
    cpu: str = "auto"  # vm.cpu: a qemu CPU model, or auto (cpu_model)


def normalize_arch(machine: str) -> str:
    try:
        return _ARCH_ALIASES[machine.lower()]
    except KeyError:
        raise VMError(f"unsupported architecture {machine!r}; supported: {', '.join(ARCHES)}") from None


def guest_arch(configured: str, host: Platform) -> str:
    return host.machine if configured == "auto" else normalize_arch(configured)


def netdev(forwards: Mapping[str, Port], offline: bool = False) -> str:
    """One user-mode netdev with every forward. The host address is always 127.0.0.1: an empty host
    address would bind every interface. The guest address stays empty (= the guest's DHCP address,
    10.0.2.15), so guest services must listen on it, not only on the guest's loopback. `offline`:
    restrict=on isolates the guest (no packet leaves for the host or beyond; DHCP and the forwards,
    which the host opens, keep working)."""
    rules = [f"hostfwd=tcp:127.0.0.1:{p.host}-:{p.guest}" for p in forwards.values()]
    return ",".join(["user", "id=net0", *(["restrict=on"] if offline else []), *rules])


#: vm.cpu auto under TCG, per guest architecture. x86_64: qemu64 (x86-64 baseline, which Debian and Ubuntu
#: require) is the cheapest model to emulate; with `max` (every feature TCG implements) the same guest boot took
#: more qemu CPU: test image, launch to cloud-init done, booted side by side, here: qemu64 56.2 / max 67.5 s,
#: 49.5 / 54.3, 42.8 / 49.3 (max,-xsave 52.4 and max,-la57 46.4 against qemu64's 47.3 and 40.1 in two more
#: pairs). An image that needs x86-64-v2 or later (e.g. RHEL 9) sets vm.cpu: max. aarch64: max (not measured).
TCG_CPU = {"x86_64": "qemu64", "aarch64": "max"}


def cpu_model(configured: str, accel: str, arch: str) -> str:
    """`-cpu`: vm.cpu as given, or for auto the host's CPU with hardware acceleration and TCG_CPU under TCG.
    vm.cpu `host` under TCG (vm.accel auto that found no KVM) is refused with the key to change, not with
    qemu's own error (config.py refuses it with vm.accel tcg before anything runs)."""
    hardware = accel in ("kvm", "hvf")
    if configured == "host" and not hardware:
        raise VMError(
            f"vm.cpu is host, but the guest runs under {accel} (-cpu host needs KVM or HVF)",
            hint="set vm.cpu: auto (the host's CPU where KVM/HVF is used, an emulated one under TCG) or a model "
            "such as max",
        )
    if configured != "auto":
        return configured
    return "host" if hardware else TCG_CPU[arch]


def build_command(spec: LaunchSpec) -> list[str]:
    """The argument list that boots `spec` (pure: no filesystem or process access)."""
    if spec.arch not in ARCHES:
        raise VMError(f"unsupported guest architecture {spec.arch!r}")
    if spec.accel not in ("kvm", "hvf", "tcg"):
        raise VMError(f"acceleration must be resolved to kvm, hvf or tcg, got {spec.accel!r}")
    cmd = [spec.qemu, "-name", spec.name]
    if spec.arch == "x86_64":
        cmd += ["-machine", "q35"]
    else:
        # gic-version=max: GICv3 under TCG/KVM (more than 8 vCPUs); HVF keeps the default GIC it supports.
        cmd += ["-machine", "virt" if spec.accel == "hvf" else "virt,gic-version=max"]
    cmd += ["-accel", spec.accel]
    cmd += ["-cpu", cpu_model(spec.cpu, spec.accel, spec.arch)]
    cmd += ["-smp", str(spec.cpus), "-m", str(spec.memory_mb)]
    if spec.arch == "aarch64" and spec.kernel is None:
        if spec.firmware is None:
            raise VMError("an aarch64 guest without direct kernel boot needs UEFI firmware")
        if spec.firmware.pflash:
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={spec.firmware.path}"]
        else:
            cmd += ["-bios", str(spec.firmware.path)]
    cmd += ["-drive", f"file={spec.disk},if=virtio,format=qcow2,discard=unmap"]
    if spec.seed_iso is not None:
        # Read-only CD on virtio-scsi: the same on q35 and virt (virt has no IDE/AHCI).
        cmd += [
            "-device", "virtio-scsi-pci,id=scsi0",
            "-drive", f"file={spec.seed_iso},if=none,id=cidata,format=raw,media=cdrom,readonly=on",
            "-device", "scsi-cd,bus=scsi0.0,drive=cidata",
        ]  # fmt: skip
    nic0 = "virtio-net-pci,netdev=net0" + (f",mac={spec.cluster_nic.primary_mac}" if spec.cluster_nic else "")
    cmd += ["-netdev", netdev(spec.forwards, spec.offline), "-device", nic0]
    if spec.cluster_nic is not None:
        # The cluster NIC: a port of the vde_switch (unix sockets in the state dir; no tap, no bridge, no
        # host address on it). The MAC is the one the seed's network-config matches for the static address.
        cmd += [
            "-netdev", f"vde,id=net1,sock={spec.cluster_nic.switch}",
            "-device", f"virtio-net-pci,netdev=net1,mac={spec.cluster_nic.mac}",
        ]  # fmt: skip
    # Entropy for the guest: sshd host-key generation and Python start-up otherwise stall under TCG.
    cmd += ["-device", "virtio-rng-pci"]
    if spec.kernel is not None:
        cmd += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            cmd += ["-initrd", str(spec.initrd)]
        if spec.append:
            cmd += ["-append", spec.append]
    cmd += ["-display", "none", "-vga", "none", "-monitor", "none"]
    cmd += ["-serial", f"file:{spec.serial_log}"]
    cmd += ["-qmp", f"unix:{spec.qmp_socket},server=on,wait=off"]
    cmd += ["-pidfile", str(spec.pidfile)]
    if spec.daemonize:
        cmd += ["-daemonize"]
    return cmd


# ------------------------------------------------------------------------------------ binary, firmware --


def find_qemu(configured: str, arch: str, which: Callable[[str], str | None] = shutil.which) -> str:
    name = configured or f"qemu-system-{arch}"
    found = which(name)
    if found is None:
        hint = (
            "install QEMU: apt-get install qemu-system-x86 qemu-utils (Debian/Ubuntu), "
            "apt-get install qemu-system-arm (arm64), brew install qemu (macOS); or set vm.qemu"
        )
        raise VMError(f"qemu binary {name!r} not found on PATH", hint=hint)
    return found


def firmware_candidates(qemu: str) -> list[Firmware]:
    """Where aarch64 UEFI code lives: qemu's own data dir first (Homebrew, upstream builds), then distros."""
    share = Path(qemu).resolve().parent.parent / "share" / "qemu"
    paths = [
        Firmware(share / "edk2-aarch64-code.fd", True),
        Firmware(Path("/opt/homebrew/share/qemu/edk2-aarch64-code.fd"), True),
        Firmware(Path("/usr/local/share/qemu/edk2-aarch64-code.fd"), True),
        Firmware(Path("/usr/share/qemu/edk2-aarch64-code.fd"), True),
        Firmware(Path("/usr/share/AAVMF/AAVMF_CODE.fd"), True),  # Debian/Ubuntu qemu-efi-aarch64
        Firmware(Path("/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw"), True),  # Fedora edk2-aarch64
        Firmware(Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"), False),
        Firmware(Path("/usr/share/edk2/aarch64/QEMU_EFI.fd"), False),
    ]
    seen: set[Path] = set()
    out = []
    for fw in paths:
        if fw.path not in seen:
            seen.add(fw.path)
            out.append(fw)
    return out


def find_firmware(qemu: str, exists: Callable[[Path], bool] = Path.is_file) -> Firmware:
    candidates = firmware_candidates(qemu)
    for fw in candidates:
        if exists(fw.path):
            return fw
    raise VMError(
        "no aarch64 UEFI firmware found",
        details=[f"looked for {fw.path}" for fw in candidates],
        hint="apt-get install qemu-efi-aarch64 (Debian/Ubuntu); Homebrew's qemu ships edk2-aarch64-code.fd; "
        "or use direct kernel boot (vm.kernel/vm.initrd/vm.append)",
    )


# ------------------------------------------------------------------------------------------ acceleration --


def hvf_supported(run: Callable[[list[str]], str] | None = None) -> bool:
    """macOS Hypervisor.framework: `sysctl kern.hv_support` is 1."""
    try:
        output = (run or _check_output)(["sysctl", "-n", "kern.hv_support"])
    except (OSError, subprocess.SubprocessError):
        return False
    return output.strip() == "1"


def _check_output(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout


@dataclass(frozen=True)
class ProbeBoot:
    """What the KVM probe boots: the VM's own disk (read-only, `-snapshot`) and kernel if direct-booting."""

    qemu: str
    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    cpu: str = "host"  # the CPU model the real launch would use under KVM


def kvm_probe(boot: ProbeBoot, timeout: float = KVM_PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot under `-accel kvm` for at most `timeout` seconds; True when the guest kernel reaches user space.

    Returns (works, reason). Nothing is written to the disk (`-snapshot`); the probe qemu is always killed.
    """
    with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        cmd = [
            boot.qemu, "-machine", "q35", "-accel", "kvm", "-cpu", boot.cpu, "-smp", "1", "-m", "1024",
            "-snapshot", "-drive", f"file={boot.disk},if=virtio,format=qcow2",
            "-display", "none", "-vga", "none", "-monitor", "none", "-nodefaults",
            "-serial", f"file:{serial}", "-no-reboot",
        ]  # fmt: skip
        if boot.kernel is not None:
            cmd += ["-kernel", str(boot.kernel)]
            if boot.initrd is not None:
                cmd += ["-initrd", str(boot.initrd)]
            cmd += ["-append", boot.append or "console=ttyS0"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = time.monotonic()
        try:
            while time.monotonic() - start < timeout:
                text = serial.read_text(errors="replace") if serial.exists() else ""
                if KVM_PROBE_MARKERS.search(text):
                    return True, f"guest kernel reached user space in {time.monotonic() - start:.1f}s"
                if proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
                    err = [line[-120:] for line in err[-1:]]  # qemu's last word, shortened
                    return (
                        False,
                        f"qemu -accel kvm exited ({proc.returncode}): {err[-1] if err else 'no output'}",
                    )
                time.sleep(0.25)
            lines = len(text.splitlines())
            return (
                False,
                f"no guest kernel progress within {timeout:.0f}s under -accel kvm ({lines} serial lines)",
            )
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def resolve_accel(
    requested: str,
    arch: str,
    host: Platform,
    *,
    probe: Callable[[], tuple[bool, str]],
    cache: Path | None = None,
    kvm_device: Path = Path("/dev/kvm"),
    hvf: Callable[[], bool] = hvf_supported,
) -> tuple[str, str]:
    """(accel, reason). `requested` kvm/hvf/tcg is used as given; `auto` chooses, warning on TCG."""
    if requested != "auto":
        return requested, "configured (vm.accel)"
    if arch != host.machine:
        accel, reason = "tcg", f"guest {arch} differs from host {host.machine}: emulation"
    elif host.system == "Darwin":
        accel, reason = ("hvf", "kern.hv_support=1") if hvf() else ("tcg", "Hypervisor.framework unavailable")
    elif host.system == "Linux":
        accel, reason = _auto_kvm(kvm_device, probe, cache)
    else:
        accel, reason = "tcg", f"no accelerator support for {host.system}"
    if accel == "tcg":
        ui.warn(f"using TCG software emulation ({reason}): boots are several times slower than with KVM/HVF")
    return accel, reason


def cached_kvm_verdict(cache: Path) -> tuple[bool, str] | None:
    """(works, reason) of the KVM probe cached in `cache` for this host boot; None when there is none."""
    boot_id = _boot_id()
    if not boot_id or not cache.is_file():
        return None
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id:
            return bool(cached["works"]), str(cached["reason"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _auto_kvm(kvm_device: Path, probe: Callable[[], tuple[bool, str]], cache: Path | None) -> tuple[str, str]:
    if not kvm_device.exists():
        return "tcg", f"{kvm_device} does not exist"
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return "tcg", f"{kvm_device} is not readable and writable by this user (add yourself to group kvm)"
    boot_id = _boot_id()
    cached = cached_kvm_verdict(cache) if cache is not None else None
    if cached is not None:
        works, reason = cached
        return ("kvm" if works else "tcg"), f"KVM probe (cached for this host boot): {reason}"
    with ui.live(f"probing KVM (a short boot under -accel kvm, at most {KVM_PROBE_TIMEOUT:.0f}s)"):
        works, reason = probe()
    if cache is not None and boot_id:
        text = json.dumps({"boot_id": boot_id, "works": works, "reason": reason}) + "\n"
        files.write_atomic(cache, text.encode(), "KVM probe verdict")
    return ("kvm" if works else "tcg"), f"KVM probe: {reason}"

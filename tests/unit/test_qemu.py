"""infra.vm.qemu: the command line per guest arch / accelerator / host platform, and the accelerator choice.

The command line is pure, so most tests read it; `test_command_line_is_accepted_by_real_qemu` hands one to
the real qemu-system-x86_64 to prove the options exist and combine (it exits at once via `-S` + QMP quit).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.launchspec import spec

from infra.core.errors import VMError
from infra.vm import qemu

LINUX_X86 = qemu.Platform("Linux", "x86_64")

MAC_ARM = qemu.Platform("Darwin", "aarch64")


def option(cmd: list[str], name: str) -> list[str]:
    """Every value given to option `name`."""
    return [cmd[i + 1] for i, arg in enumerate(cmd[:-1]) if arg == name]


def no_probe() -> tuple[bool, str]:
    raise AssertionError("the KVM probe must not run here")


def test_x86_64_tcg(tmp_path: Path) -> None:
    cmd = qemu.build_command(spec(tmp_path))
    assert cmd[0] == "/usr/bin/qemu-system-x86_64"
    assert option(cmd, "-machine") == ["q35"]
    assert option(cmd, "-accel") == ["tcg"]
    assert option(cmd, "-cpu") == ["qemu64"]  # vm.cpu auto: never -cpu host under TCG (qemu.TCG_CPU)
    assert option(cmd, "-smp") == ["2"] and option(cmd, "-m") == ["2048"]
    assert f"file={tmp_path / 'disk.qcow2'},if=virtio,format=qcow2,discard=unmap" in option(cmd, "-drive")
    seed = [d for d in option(cmd, "-drive") if "seed.iso" in d]
    assert seed == [f"file={tmp_path / 'seed.iso'},if=none,id=cidata,format=raw,media=cdrom,readonly=on"]
    assert "scsi-cd,bus=scsi0.0,drive=cidata" in option(cmd, "-device")
    assert option(cmd, "-serial") == [f"file:{tmp_path / 'serial.log'}"]
    assert option(cmd, "-qmp") == [f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off"]
    assert option(cmd, "-pidfile") == [str(tmp_path / "qemu.pid")]
    assert cmd[-1] == "-daemonize"
    assert "-kernel" not in cmd and "-bios" not in cmd and "if=pflash" not in " ".join(cmd)


def test_one_netdev_with_every_forward_on_loopback_only(tmp_path: Path) -> None:
    cmd = qemu.build_command(spec(tmp_path))
    netdevs = option(cmd, "-netdev")
    assert len(netdevs) == 1
    parts = netdevs[0].split(",")
    assert parts[:2] == ["user", "id=net0"]
    rules = parts[2:]
    assert rules == [
        "hostfwd=tcp:127.0.0.1:2222-:22",
        "hostfwd=tcp:127.0.0.1:4646-:4646",
        "hostfwd=tcp:127.0.0.1:3000-:3000",
        "hostfwd=tcp:127.0.0.1:8080-:8080",
    ]
    # an empty host address ("tcp::2222-:22") would bind every interface
    assert not any(r.startswith("hostfwd=tcp::") for r in rules)
    assert "virtio-net-pci,netdev=net0" in option(cmd, "-device")


def test_offline_isolates_the_guest_and_keeps_the_forwards(tmp_path: Path) -> None:
    """vm.offline: user networking's restrict=on (no packet out of the guest); the forwards stay."""
    (online,) = option(qemu.build_command(spec(tmp_path)), "-netdev")
    (offline,) = option(qemu.build_command(spec(tmp_path, offline=True)), "-netdev")
    assert "restrict=on" not in online.split(",")
    assert offline.split(",") == ["user", "id=net0", "restrict=on", *online.split(",")[2:]]


def test_kvm_uses_host_cpu(tmp_path: Path) -> None:
    cmd = qemu.build_command(spec(tmp_path, accel="kvm"))
    assert option(cmd, "-accel") == ["kvm"] and option(cmd, "-cpu") == ["host"]


def test_direct_kernel_boot(tmp_path: Path) -> None:
    cmd = qemu.build_command(
        spec(
            tmp_path,
            kernel=tmp_path / "vmlinuz",
            initrd=tmp_path / "initrd.img",
            append="root=LABEL=rootfs rw console=ttyS0",
        )
    )
    assert option(cmd, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert option(cmd, "-initrd") == [str(tmp_path / "initrd.img")]
    assert option(cmd, "-append") == ["root=LABEL=rootfs rw console=ttyS0"]


def test_aarch64_on_apple_silicon_with_hvf(tmp_path: Path) -> None:
    fw = qemu.Firmware(Path("/opt/homebrew/share/qemu/edk2-aarch64-code.fd"), pflash=True)
    cmd = qemu.build_command(
        spec(tmp_path, qemu="/opt/homebrew/bin/qemu-system-aarch64", arch="aarch64", accel="hvf", firmware=fw)
    )
    assert option(cmd, "-machine") == ["virt"]
    assert option(cmd, "-accel") == ["hvf"] and option(cmd, "-cpu") == ["host"]
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={fw.path}" in option(cmd, "-drive")
    # virt has no IDE: the seed is a read-only CD on virtio-scsi, as on x86
    assert "scsi-cd,bus=scsi0.0,drive=cidata" in option(cmd, "-device")
    assert all(r.startswith("hostfwd=tcp:127.0.0.1:") for r in option(cmd, "-netdev")[0].split(",")[2:])


def test_aarch64_tcg_with_plain_bios_rom(tmp_path: Path) -> None:
    fw = qemu.Firmware(Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"), pflash=False)
    cmd = qemu.build_command(
        spec(tmp_path, qemu="qemu-system-aarch64", arch="aarch64", accel="tcg", firmware=fw)
    )
    assert option(cmd, "-machine") == ["virt,gic-version=max"]
    assert option(cmd, "-cpu") == ["max"]
    assert option(cmd, "-bios") == [str(fw.path)]


@pytest.mark.parametrize(
    ("configured", "accel", "arch", "expected"),
    [
        ("auto", "kvm", "x86_64", "host"),
        ("auto", "hvf", "aarch64", "host"),
        ("auto", "tcg", "x86_64", "qemu64"),
        ("auto", "tcg", "aarch64", "max"),
        ("max", "tcg", "x86_64", "max"),  # an image that needs x86-64-v2 or later
        ("Nehalem-v2,-la57", "kvm", "x86_64", "Nehalem-v2,-la57"),  # as given, with any accelerator
    ],
)
def test_cpu_model_is_vm_cpu_or_chosen_for_the_accelerator(
    tmp_path: Path, configured: str, accel: str, arch: str, expected: str
) -> None:
    kernel = {"kernel": tmp_path / "Image", "append": "console=ttyAMA0"} if arch == "aarch64" else {}
    cmd = qemu.build_command(spec(tmp_path, cpu=configured, accel=accel, arch=arch, **kernel))
    assert option(cmd, "-cpu") == [expected]


def test_cpu_host_without_hardware_acceleration_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(VMError, match=r"vm\.cpu is host, but the guest runs under tcg") as err:
        qemu.build_command(spec(tmp_path, cpu="host", accel="tcg"))
    assert "vm.cpu: auto" in (err.value.hint or "")
    assert option(qemu.build_command(spec(tmp_path, cpu="host", accel="kvm")), "-cpu") == ["host"]


def test_aarch64_direct_boot_needs_no_firmware(tmp_path: Path) -> None:
    cmd = qemu.build_command(
        spec(
            tmp_path,
            arch="aarch64",
            accel="kvm",
            kernel=tmp_path / "Image",
            initrd=None,
            append="console=ttyAMA0",
        )
    )
    assert "-bios" not in cmd and "pflash" not in " ".join(cmd)
    assert option(cmd, "-cpu") == ["host"]


def test_aarch64_without_firmware_or_kernel_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VMError, match="UEFI firmware"):
        qemu.build_command(spec(tmp_path, arch="aarch64"))


def test_unresolved_accel_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(VMError, match="resolved"):
        qemu.build_command(spec(tmp_path, accel="auto"))


def test_arch_names() -> None:
    assert qemu.normalize_arch("amd64") == "x86_64"
    assert qemu.normalize_arch("arm64") == "aarch64"
    assert qemu.guest_arch("auto", MAC_ARM) == "aarch64"
    assert qemu.guest_arch("x86_64", MAC_ARM) == "x86_64"
    with pytest.raises(VMError, match="riscv64"):
        qemu.normalize_arch("riscv64")


def test_firmware_prefers_qemu_data_dir(tmp_path: Path) -> None:
    prefix = tmp_path / "homebrew"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "share" / "qemu").mkdir(parents=True)
    binary = prefix / "bin" / "qemu-system-aarch64"
    binary.touch()
    code = prefix / "share" / "qemu" / "edk2-aarch64-code.fd"
    code.touch()
    fw = qemu.find_firmware(str(binary), exists=lambda p: p in {code, Path("/usr/share/AAVMF/AAVMF_CODE.fd")})
    assert fw == qemu.Firmware(code, pflash=True)


def test_firmware_falls_back_to_distro_paths() -> None:
    aavmf = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
    assert qemu.find_firmware("/usr/bin/qemu-system-aarch64", exists=lambda p: p == aavmf).path == aavmf
    efi = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")
    fw = qemu.find_firmware("/usr/bin/qemu-system-aarch64", exists=lambda p: p == efi)
    assert fw == qemu.Firmware(efi, pflash=False)


def test_missing_firmware_lists_where_it_looked() -> None:
    with pytest.raises(VMError) as err:
        qemu.find_firmware("/usr/bin/qemu-system-aarch64", exists=lambda p: False)
    text = str(err.value)
    assert "/usr/share/AAVMF/AAVMF_CODE.fd" in text and "qemu-efi-aarch64" in text


def test_missing_qemu_binary_names_it_and_how_to_install() -> None:
    with pytest.raises(VMError) as err:
        qemu.find_qemu("", "x86_64", which=lambda name: None)
    assert "qemu-system-x86_64" in str(err.value) and "apt-get install qemu-system-x86" in str(err.value)


def test_configured_accel_is_used_as_given() -> None:
    assert qemu.resolve_accel("tcg", "x86_64", LINUX_X86, probe=no_probe)[0] == "tcg"
    assert qemu.resolve_accel("kvm", "x86_64", LINUX_X86, probe=no_probe)[0] == "kvm"


def test_auto_on_macos_uses_hvf_when_supported(capsys: pytest.CaptureFixture[str]) -> None:
    assert qemu.resolve_accel("auto", "aarch64", MAC_ARM, probe=no_probe, hvf=lambda: True)[0] == "hvf"
    accel, reason = qemu.resolve_accel("auto", "aarch64", MAC_ARM, probe=no_probe, hvf=lambda: False)
    assert accel == "tcg" and "Hypervisor.framework" in reason
    assert "TCG" in capsys.readouterr().err  # the visible warning


def test_hvf_support_reads_sysctl() -> None:
    assert qemu.hvf_supported(run=lambda cmd: "1\n") is True
    assert qemu.hvf_supported(run=lambda cmd: "0\n") is False

    def missing(cmd: list[str]) -> str:
        raise FileNotFoundError(cmd[0])

    assert qemu.hvf_supported(run=missing) is False


def test_auto_cross_arch_is_tcg_without_probing() -> None:
    accel, reason = qemu.resolve_accel("auto", "x86_64", MAC_ARM, probe=no_probe, hvf=lambda: True)
    assert accel == "tcg" and "differs" in reason


def test_auto_without_dev_kvm_is_tcg(tmp_path: Path) -> None:
    accel, reason = qemu.resolve_accel(
        "auto", "x86_64", LINUX_X86, probe=no_probe, kvm_device=tmp_path / "kvm"
    )
    assert accel == "tcg" and "does not exist" in reason


def test_auto_does_not_trust_dev_kvm_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/kvm present but the probe boot shows no progress (our CI hosts): TCG, with a warning."""
    device = tmp_path / "kvm"
    device.touch()
    calls = []

    def hanging() -> tuple[bool, str]:
        calls.append(1)
        return False, "no guest kernel progress within 20s under -accel kvm (0 serial lines)"

    accel, reason = qemu.resolve_accel("auto", "x86_64", LINUX_X86, probe=hanging, kvm_device=device)
    assert (accel, len(calls)) == ("tcg", 1)
    assert "no guest kernel progress" in reason
    assert "TCG" in capsys.readouterr().err


def test_auto_uses_kvm_when_the_probe_boots(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.touch()
    accel, _ = qemu.resolve_accel(
        "auto", "x86_64", LINUX_X86, probe=lambda: (True, "user space in 1.2s"), kvm_device=device
    )
    assert accel == "kvm"


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").exists(), reason="needs Linux boot_id")
def test_probe_verdict_is_cached_per_host_boot(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.touch()
    cache = tmp_path / "cache" / "kvm-probe.json"
    first = qemu.resolve_accel(
        "auto", "x86_64", LINUX_X86, probe=lambda: (False, "hung"), kvm_device=device, cache=cache
    )
    assert first[0] == "tcg"
    again = qemu.resolve_accel("auto", "x86_64", LINUX_X86, probe=no_probe, kvm_device=device, cache=cache)
    assert again[0] == "tcg" and "cached" in again[1]
    data = json.loads(cache.read_text())
    data["boot_id"] = "another-boot"
    cache.write_text(json.dumps(data))
    third = qemu.resolve_accel(
        "auto", "x86_64", LINUX_X86, probe=lambda: (True, "ok"), kvm_device=device, cache=cache
    )
    assert third[0] == "kvm"  # a new host boot probes again

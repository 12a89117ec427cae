"""infra.vm.lifecycle (through infra.vm.verbs, which makes the seed): pidfile handling, and the lifecycle against the
real qemu.

The lifecycle tests start the real qemu-system-x86_64 on a blank disk (no OS: the VM halts in its boot
sector, support/servers/common.py), which is enough to exercise launch, the pidfile, QMP, idempotent `run`,
`stop` falling back to a kill when the guest ignores ACPI, and `destroy`. Booting a real guest is tests/vm.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support.servers.common import listening, vm_ports

from infra.core import config
from infra.core.errors import VMError
from infra.core.state import StatePaths
from infra.vm import host, instance, lifecycle, qemuimg, qmp, verbs

pytestmark = pytest.mark.tools("qemu-system-x86_64", "qemu-img")


def _overrides(cfg: config.Config) -> dict[str, dict[str, object]]:
    d = config.as_dict(cfg)
    return {
        "project": {"state_dir": d["project"]["state_dir"], "cache_dir": d["project"]["cache_dir"]},
        "provision": {"nomad": False, "docker": False},
        "vm": {k: d["vm"][k] for k in ("image", "accel", "cpus", "memory_mb", "disk_gb")}
        | {"ports": {n: dict(p) for n, p in d["vm"]["ports"].items()}},
    }


def test_inv_vm_run_refuses_a_taken_port(
    run_inv: Callable[..., subprocess.CompletedProcess[str]],
    port_holder: Callable[..., tuple[int, int]],
    tmp_path: Path,
) -> None:
    port, pid = port_holder()
    cfg_file = tmp_path / "vm.yaml"
    cfg_file.write_text(json.dumps({"vm": {"accel": "tcg", "ports": vm_ports(nomad=port)}}))
    result = run_inv("-f", str(cfg_file), "vm.run")
    assert result.returncode == 1, result.stderr
    assert f"host port {port} (vm.ports.nomad) is taken by pid {pid}" in result.stderr
    assert "nothing was started" in result.stderr
    state = StatePaths(tmp_path / "state")
    assert not state.pidfile.exists() and not state.disk.exists()


def test_stale_pidfile_is_not_a_running_vm(tmp_path: Path) -> None:
    state = StatePaths(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    state.pidfile.write_text(f"{dead.pid}\n")
    state.qmp_socket.touch()
    assert instance.running_pid(state) is None
    assert instance.clear_stale(state) is True
    assert not state.pidfile.exists() and not state.qmp_socket.exists()


def test_direct_boot_needs_all_three(make_cfg: Callable[..., config.Config], tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.touch()
    cfg = make_cfg(vm={"kernel": str(kernel), "accel": "tcg", "ports": vm_ports()})
    with pytest.raises(VMError, match=r"missing: vm\.initrd, vm\.append"):
        verbs.run(cfg)


def test_missing_qemu_is_a_clear_error(make_cfg: Callable[..., config.Config]) -> None:
    cfg = make_cfg(vm={"qemu": "qemu-system-nonexistent", "accel": "tcg", "ports": vm_ports()})
    with pytest.raises(VMError, match="'qemu-system-nonexistent' not found on PATH"):
        verbs.run(cfg)
    assert not StatePaths.of(cfg).root.exists()


def test_overlay_on_base_resized_and_guarded(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    disk = tmp_path / "state" / "disk.qcow2"
    assert qemuimg.ensure_overlay(disk, base, 3) is True
    info = qemuimg.image_info(disk)
    assert info["virtual-size"] == 3 * qemuimg.GIB
    assert Path(info["full-backing-filename"]) == base.resolve()
    assert info["backing-filename-format"] == "qcow2"
    assert qemuimg.ensure_overlay(disk, base, 3) is False  # kept
    assert qemuimg.ensure_overlay(disk, base, 5) is False
    assert qemuimg.image_info(disk)["virtual-size"] == 5 * qemuimg.GIB  # grown, never shrunk
    other = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "1G"], check=True)
    with pytest.raises(VMError, match=r"vm\.destroy"):
        qemuimg.ensure_overlay(disk, other, 5)


def test_lifecycle_with_real_qemu(blank_vm: config.Config, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = blank_vm
    state = StatePaths.of(cfg)
    booted = verbs.run(cfg)
    first = booted.launch
    assert first.started and booted.seed is not None and booted.seed.path == state.seed_iso
    pid = first.record["pid"]
    assert instance.running_pid(state) == pid
    assert state.pidfile.read_text().strip() == str(pid)
    assert state.qmp_socket.exists() and state.seed_iso.exists() and state.disk.exists()
    assert json.loads(state.vm_record.read_text())["accel"] == "tcg"
    assert "-cpu" in first.record["command"] and "host" not in first.record["command"]
    expected = {("127.0.0.1", p.host) for p in cfg.vm.ports.values()}
    assert listening(pid) == expected  # every forward, loopback only
    assert qmp.execute(state.qmp_socket, "query-status")["running"] is True

    again = verbs.run(cfg)  # idempotent: reported, nothing changed (the seed of a running VM neither)
    assert not again.launch.started and again.launch.record["pid"] == pid and again.seed is None
    assert "already running" in capsys.readouterr().err
    assert lifecycle.facts(cfg)["pid"] == pid

    assert lifecycle.stop(cfg, timeout=2) is True  # the halted guest ignores ACPI: killed after 2 s
    err = capsys.readouterr().err
    # the power-off wait ran on the 2 s given (not vm.stop_timeout's default), then the kill: by what it
    # printed, not by a stopwatch
    assert re.search(r"waiting for VM \(pid \d+\) to power off \(ACPI\): .*\(\d+s/2s\)", err), err
    assert f"VM stopped (killed, pid {pid})" in err, err
    assert instance.running_pid(state) is None
    assert not host.alive(pid)
    assert not state.pidfile.exists() and not state.qmp_socket.exists()
    assert "stopped_at" in json.loads(state.vm_record.read_text())

    removed = lifecycle.destroy(cfg)
    assert state.disk in removed and state.seed_iso in removed
    assert not state.root.exists()
    assert Path(cfg.vm.image).exists()  # the base image is never touched


def test_qemu_failing_to_start_leaves_nothing(blank_vm: config.Config, tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'qemu-system-x86_64: -accel tcg: simulated failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    cfg = config.load({**_overrides(blank_vm), "vm": {**_overrides(blank_vm)["vm"], "qemu": str(fake)}})
    state = StatePaths.of(cfg)
    with pytest.raises(VMError) as err:
        verbs.run(cfg)
    assert "qemu failed to start (exit 1)" in str(err.value)
    assert "simulated failure" in str(err.value)
    assert not state.disk.exists() and not state.pidfile.exists()  # the fresh overlay was removed

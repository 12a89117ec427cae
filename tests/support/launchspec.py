"""A qemu LaunchSpec for tests of the command line (tests/unit/test_qemu.py builds it, tests/component/
test_qemu.py hands it to the real qemu): the fields every test shares, overridable one by one."""

from __future__ import annotations

from pathlib import Path

from infra.core.config import Port
from infra.vm import qemu

FORWARDS = {
    "ssh": Port(2222, 22),
    "nomad": Port(4646, 4646),
    "app": Port(3000, 3000),
    "ingress": Port(8080, 8080),
}


def spec(tmp_path: Path, **kw: object) -> qemu.LaunchSpec:
    values: dict[str, object] = {
        "qemu": "/usr/bin/qemu-system-x86_64",
        "arch": "x86_64",
        "accel": "tcg",
        "cpus": 2,
        "memory_mb": 2048,
        "disk": tmp_path / "disk.qcow2",
        "seed_iso": tmp_path / "seed.iso",
        "pidfile": tmp_path / "qemu.pid",
        "serial_log": tmp_path / "serial.log",
        "qmp_socket": tmp_path / "qmp.sock",
        "forwards": FORWARDS,
    }
    values.update(kw)
    return qemu.LaunchSpec(**values)  # type: ignore[arg-type]

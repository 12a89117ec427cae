"""qemu-img on the VM's disks: an image's facts, the overlay disk on a base image, the check that refuses a
corrupt image before a boot.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from infra.core import ui
from infra.core.errors import VMError

GIB = 1024**3


def _qemu_img(*args: str) -> str:
    tool = shutil.which("qemu-img")
    if tool is None:
        raise VMError(
            "qemu-img not found on PATH", hint="apt-get install qemu-utils (macOS: brew install qemu)"
        )
    proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise VMError(f"qemu-img {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def image_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(_qemu_img("info", "-U", "--output=json", str(path)))
    return info


def ensure_overlay(disk: Path, base: Path, size_gb: int) -> bool:
    """A qcow2 overlay on `base` of at least `size_gb`; True when it was created now."""
    if disk.exists():
        info = image_info(disk)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if backing and Path(backing).resolve() != base.resolve():
            raise VMError(
                f"{disk} is an overlay on {backing}, but the configured base image is {base}",
                hint="`inv vm.destroy` to start over on the new image (the guest's disk is lost)",
            )
        if int(info.get("virtual-size", 0)) < size_gb * GIB:
            _qemu_img("resize", str(disk), f"{size_gb}G")
            ui.info(f"grew {disk.name} to {size_gb} GiB")
        return False
    base_format = image_info(base).get("format", "raw")
    if int(image_info(base).get("virtual-size", 0)) > size_gb * GIB:
        raise VMError(f"vm.disk_gb={size_gb} is smaller than the base image {base}", hint="raise vm.disk_gb")
    disk.parent.mkdir(parents=True, exist_ok=True)
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base.resolve()), str(disk), f"{size_gb}G"
    )
    return True


#: `qemu-img check` exit codes: 0 clean, 3 leaked clusters only (harmless), 63 format without checks (raw).
_CHECK_OK = (0, 3, 63)


def check_image(path: Path, what: str, fmt: str | None = None) -> None:
    """Refuse to boot an image that `qemu-img check` finds corrupt or cannot read (names the file)."""
    tool = shutil.which("qemu-img")
    if tool is None:
        raise VMError(
            "qemu-img not found on PATH", hint="apt-get install qemu-utils (macOS: brew install qemu)"
        )
    args = [tool, "check", "-q", *(["-f", fmt] if fmt else []), str(path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode in _CHECK_OK:
        return
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    if 'Failed to get shared "write" lock' in proc.stderr:
        raise VMError(
            f"{what} {path} is in use by another process (qemu-img check could not lock it)",
            details=lines,
            hint="a qemu or qemu-img that this project did not start has it open; stop that process first",
        )
    overlay = fmt == "qcow2"
    raise VMError(
        f"{what} {path} is corrupt or unreadable (qemu-img check exit {proc.returncode}): "
        + (lines[0] if lines else "no details"),
        details=lines[1:10],
        hint="`inv vm.destroy` discards the VM's disk (the guest's data is lost), then `inv vm.run`"
        if overlay
        else "delete it (a cached image is downloaded and verified again by the next `inv vm.run`) "
        "or point vm.image at a good one; nothing was started",
    )


def backing(disk: Path) -> Path | None:
    """The image an existing overlay disk sits on (None: no disk, or no backing file)."""
    if not disk.exists():
        return None
    info = image_info(disk)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    return Path(backing) if backing else None


__all__ = ["GIB", "backing", "check_image", "ensure_overlay", "image_info"]

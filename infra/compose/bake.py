"""Baked images: the VM's disk after provisioning, generalized and compressed, so the next VM boots
provisioned — fast, identical, and without the network.

`inv image.bake` (`bake`):
1. boot the base image with the full user-data in a throwaway VM (its own state dir `<state>/bake`, a
   throwaway SSH key, only an SSH forward on a free port) — or, with `--from-vm`, take the project's
   running VM as it is — and wait until cloud-init is done, the services are active and (with
   provision.nomad) Nomad's node is ready;
2. with provision.nomad: `docker pull` every image the job specs pin by digest (read with infra.nomad.speclint)
   and carry the app image (loaded from the host's Docker when it was built there, else built in the guest
   like the first `inv up` does);
3. record what is installed (`dpkg-query`) and which images are there (`docker image ls --digests`);
4. generalize the guest: Nomad stopped and its state cleared (each VM gets its own node ID and cluster),
   apt's cache emptied, `cloud-init clean` (the next boot runs the per-instance modules with its own
   seed), machine-id emptied, SSH host keys and authorized keys removed, logs truncated;
5. power off, `qemu-img convert -c -O qcow2` (a standalone, compressed image) into
   `<cache>/bakes/<key>.qcow2` with the manifest `<key>.json` beside it.

The key (infra/vm/bakecache.py, which also decides what `vm.run` boots) is a content hash of everything that
went into the bake (`key_inputs`): the base image's digest,
the rendered user-data minus its per-instance parts (host name, login key), the Nomad version and the
pinned job images. A changed input gives another key, so a stale bake never boots (`vm.baked`: auto
boots a matching bake, off never, require refuses to boot without one). A VM booted from a bake gets a
seed without `packages` (infra.guest.seed.BAKED_KEYS): cloud-init installs nothing and needs no network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.core import files, ui
from infra.core.config import Config, Port
from infra.core.errors import ImageError, InfraError, VMError
from infra.core.state import StatePaths
from infra.core.waits import Probe, wait_until
from infra.guest.seed import SeedResult
from infra.vm import bakecache, baseimages, qemu
from infra.vm.bakecache import Bake, bakes_dir, content_key, find, key_inputs, locate

CONVERT_TIMEOUT = 1800
PULL_TIMEOUT = 1800
NOMAD_READY_TIMEOUT = 300

GENERALIZE = r"""
set -eu
# Nomad: stopped, its state cleared, so every VM made from the bake gets its own node ID and cluster.
if systemctl cat nomad.service >/dev/null 2>&1; then systemctl stop nomad.service; fi
data_dir=$(sed -n 's/^[[:space:]]*data_dir[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' /etc/nomad.d/*.hcl \
    2>/dev/null | tail -n 1)
for dir in ${data_dir:+"$data_dir"} /var/lib/nomad; do
    if [ -d "$dir" ]; then find "$dir" -mindepth 1 -delete; fi
done
# The .debs are installed; their copies in apt's cache are dead weight.
apt-get clean
# cloud-init forgets this instance: the next boot runs the per-instance modules with its own seed.
cloud-init clean --logs --seed
# Identity: systemd makes a new machine-id at the next boot, cloud-init new SSH host keys.
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*
rm -f /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys
# Logs of the bake are not the next VM's.
journalctl --rotate >/dev/null 2>&1 || true
journalctl --vacuum-time=1s >/dev/null 2>&1 || true
find /var/log -type f -exec truncate -s 0 {} +
rm -rf /tmp/* /var/tmp/*
fstrim -a >/dev/null 2>&1 || true
sync
echo generalized
"""


# ------------------------------------------------------------------------------------------------ bake --
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def work_config(cfg: Config) -> Config:
    """The throwaway VM of a bake: its own state dir and SSH key, only an SSH forward, never a bake."""
    return dataclasses.replace(
        cfg,
        project=dataclasses.replace(cfg.project, state_dir=cfg.project.state_dir / "bake"),
        ssh=dataclasses.replace(cfg.ssh, public_key="", private_key=""),
        vm=dataclasses.replace(cfg.vm, ports={"ssh": Port(_free_port(), 22)}, baked="off"),
    )


def _sh(conn: Any, command: str, what: str, timeout: float = 120) -> str:
    from infra.guest import ssh

    result = ssh.sh(conn, command, timeout=timeout)
    if result.exited != 0:
        raise VMError(
            f"bake: {what} failed in the guest (exit {result.exited})",
            details=(result.stderr or result.stdout).strip().splitlines()[-15:],
            hint="`inv image.bake --keep` leaves the bake VM running to look around (inv vm.ssh with "
            "-f a config whose project.state_dir is <state>/bake)",
        )
    return str(result.stdout)


def _wait_nomad(conn: Any) -> None:
    from infra.guest import ssh

    def probe(_d: object) -> Probe[None]:
        out = ssh.sh(conn, "nomad node status -self -short 2>&1 | sed -n 's/^Status *= *//p'", timeout=30)
        state = out.stdout.strip() or "no answer"
        return Probe(state == "ready", f"node {state}")

    wait_until(probe, what="Nomad node ready (in the bake VM)", timeout=NOMAD_READY_TIMEOUT, interval=2.0,
               hint="journalctl -u nomad in the guest")  # fmt: skip


def _app_image(cfg: Config, conn: Any) -> str | None:
    """The app image, in the guest's Docker: already there, loaded from the host's Docker, or built."""
    from infra.compose import appimage

    engine = appimage.RemoteDocker(conn, where="the bake VM's Docker", network=cfg.app.build_network)
    host = appimage.LocalDocker()
    ref = f"{cfg.app.image}:{appimage.source(cfg.root).tag}"
    if not engine.has_image(ref) and shutil.which("docker"):
        with contextlib.suppress(InfraError):
            if host.has_image(ref):
                appimage.build(cfg, engine, builder=host)
    if not engine.has_image(ref):
        appimage.build(cfg, engine)  # what the first `inv up` would do
    return ref


def _inventory(conn: Any, docker: bool) -> tuple[dict[str, str], list[str]]:
    """Installed packages (dpkg-query) and Docker images (with their registry digests)."""
    out = _sh(conn, "dpkg-query -W -f '${Package}\\t${Version}\\n'", "dpkg-query")
    packages = dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    pulled: list[str] = []
    if docker:
        fmt = "{{.Repository}}:{{.Tag}}@{{.Digest}} {{.ID}}"
        pulled = sorted(_sh(conn, f"sudo -n docker image ls --digests --no-trunc --format '{fmt}'", "docker image ls")
                        .split("\n"))  # fmt: skip
        pulled = [line for line in pulled if line.strip()]
    return packages, pulled


def _convert(disk: Path, dest: Path) -> None:
    """A standalone compressed qcow2 (the backing chain flattened), published by rename."""
    tool = shutil.which("qemu-img")
    if tool is None:
        raise VMError(
            "qemu-img not found on PATH", hint="apt-get install qemu-utils (macOS: brew install qemu)"
        )
    tmp = dest.with_name(f".{dest.name}.part")
    # zstd compresses about 10x faster than qcow2's default zlib (measured here: 2.5 s vs 27 s for the
    # 479 MiB test image, 172 vs 176 MiB); a qemu built without zstd gets zlib.
    error = ""
    for extra in (["-o", "compression_type=zstd"], []):
        tmp.unlink(missing_ok=True)
        command = [tool, "convert", "-c", "-O", "qcow2", *extra, str(disk), str(tmp)]
        try:
            with ui.live(f"compressing the baked disk into {dest.name} (qemu-img convert -c)"):
                proc = subprocess.run(
                    command, capture_output=True, text=True, timeout=CONVERT_TIMEOUT, check=False
                )
        except subprocess.TimeoutExpired as exc:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"qemu-img convert did not finish within {CONVERT_TIMEOUT}s") from exc
        if proc.returncode == 0:
            tmp.replace(dest)
            return
        error = proc.stderr.strip() or proc.stdout.strip()
    tmp.unlink(missing_ok=True)
    raise ImageError(f"qemu-img convert failed: {error}")


@contextlib.contextmanager
def _work_vm(cfg: Config, from_vm: bool, keep: bool) -> Iterator[tuple[Config, SeedResult | None]]:
    """The VM to bake and the seed made for it: the project's running VM (`from_vm`; no seed made), or a
    throwaway one, destroyed afterwards."""
    from infra.vm import instance, lifecycle, verbs

    if from_vm:
        p = StatePaths.of(cfg)
        if instance.running_pid(p) is None:
            raise VMError("--from-vm: the VM is not running", hint="`inv vm.run` (or bake without --from-vm)")
        record = instance.load_record(p)
        if record.get("baked"):
            raise VMError(
                f"--from-vm: the VM was booted from the baked image {record['baked']}, not the base image",
                hint="bake without --from-vm (a throwaway VM), or `inv vm.destroy` first",
            )
        yield cfg, None
        return
    work = work_config(cfg)
    if instance.running_pid(StatePaths.of(work)) is not None or StatePaths.of(work).disk.exists():
        lifecycle.destroy(work)  # left over by an interrupted bake
    try:
        yield work, verbs.run(work).seed
    finally:
        if not keep:
            lifecycle.destroy(work)


@dataclass(frozen=True)
class Baked:
    """What `bake` did: the bake, whether it was made now (False: the existing one is up to date), and the
    seed of the throwaway VM it was made in (None: none was booted). tasks.py prints both on stdout."""

    bake: Bake
    made: bool
    seed: SeedResult | None = None


def bake(cfg: Config, *, from_vm: bool = False, force: bool = False, keep: bool = False) -> Baked:
    """`inv image.bake`: make (or find) the bake for the current configuration; see the module doc."""
    from infra.guest import ssh
    from infra.vm import instance, lifecycle, qemuimg

    started = time.monotonic()
    arch = qemu.guest_arch(cfg.vm.arch, qemu.Platform.current())
    base = baseimages.ensure(cfg, arch)
    inputs = key_inputs(cfg, arch, bakecache.base_digest(cfg, arch))
    key = content_key(inputs)
    existing = find(cfg, key)
    if existing is not None and not force:
        ui.skip(f"baked image {key} is up to date: {existing.path} (--force to bake again)")
        return Baked(existing, made=False)
    target = locate(cfg, key)
    ui.step(f"baking {key} from {'the running VM' if from_vm else 'a throwaway VM'} (base {base.name})")
    with _work_vm(cfg, from_vm, keep) as (work, seed):
        p = StatePaths.of(work)
        ssh.check(work, alive=lambda: instance.running_pid(p) is not None,
                              started_at=instance.load_record(p).get("started_at"))  # fmt: skip
        provisioned = time.monotonic()
        conn = ssh.wait_ssh(work)
        try:
            app_ref = None
            if cfg.provision.nomad:
                _wait_nomad(conn)
                for ref in inputs["images"]:
                    with ui.live(f"pulling {ref}"):
                        _sh(conn, f"sudo -n docker pull --quiet {shlex.quote(ref)}", f"docker pull {ref}",
                            timeout=PULL_TIMEOUT)  # fmt: skip
                    ui.ok(f"pulled {ref}")
                app_ref = _app_image(cfg, conn)
            packages, docker_images = _inventory(conn, cfg.provision.docker)
            _sh(conn, f"sudo -n sh -c {shlex.quote(GENERALIZE)}", "generalizing", timeout=300)
            ui.ok(
                "guest generalized: cloud-init clean, machine-id and SSH host keys reset, Nomad state and logs cleared"
            )
        finally:
            conn.close()
        lifecycle.stop(work)
        target.path.parent.mkdir(parents=True, exist_ok=True)
        converting = time.monotonic()
        _convert(p.disk, target.path)
        if from_vm:
            lifecycle.destroy(cfg)  # its disk is generalized now: the next `inv vm.run` boots the bake
    info = qemuimg.image_info(target.path)
    size = target.path.stat().st_size
    total = round(time.monotonic() - started, 1)
    manifest: dict[str, Any] = {
        "key": key,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": inputs,
        "image": target.path.name,
        "size_bytes": size,
        "virtual_size_bytes": int(info.get("virtual-size", 0)),
        "base_image": str(base),
        "source": "the project's VM (--from-vm)" if from_vm else "a throwaway VM",
        "packages": packages,
        "docker_images": docker_images,
        "app_image": app_ref,
        "seconds": {
            "provision": round(provisioned - started, 1),
            "prepare": round(converting - provisioned, 1),
            "compress": round(time.monotonic() - converting, 1),
            "total": total,
        },
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    files.write_atomic(target.manifest, text.encode(), "bake manifest")
    ui.ok(
        f"baked image {key}: {target.path} ({_size(size)}, {len(packages)} packages, "
        f"{len(docker_images)} container images, {total:.0f}s)"
    )
    return Baked(target, made=True, seed=seed)


# ------------------------------------------------------------------------------------------ list / prune --
def _size(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB" if n < 1024**3 else f"{n / 1024**3:.2f} GiB"


def entries(cfg: Config) -> list[dict[str, Any]]:
    """Every bake in the cache, newest first, with `current` set on the one matching the configuration."""
    directory = bakes_dir(cfg)
    if not directory.is_dir():
        return []
    current, _inputs = bakecache.current_key(cfg)
    found = []
    for image in sorted(directory.glob("*.qcow2")):
        bake = locate(cfg, image.stem)
        manifest = bake.read_manifest()
        found.append({
            "key": bake.key, "path": str(bake.path), "size_bytes": image.stat().st_size,
            "created_at": manifest.get("created_at", "?"), "current": bake.key == current,
            "complete": bool(manifest), "packages": len(manifest.get("packages", {})),
            "docker_images": len(manifest.get("docker_images", [])),
        })  # fmt: skip
    return sorted(found, key=lambda e: str(e["created_at"]), reverse=True)


def show(cfg: Config, found: list[dict[str, Any]]) -> None:
    """`inv image.list` on stderr: `entries` as lines (`--json`: tasks.py prints them on stdout)."""
    if not found:
        ui.info(f"no baked images in {bakes_dir(cfg)} (`inv image.bake` makes one)")
    for e in found:
        mark = "current" if e["current"] else "stale  "
        ui.info(f"{mark} {e['key']}  {_size(e['size_bytes']):>9}  {e['created_at']}  {e['packages']} packages, "
                f"{e['docker_images']} container images  {e['path']}")  # fmt: skip


def prune(cfg: Config, *, everything: bool = False) -> list[Path]:
    """`inv image.prune`: delete every bake but the current one (`everything`: that one too), and leftovers
    of interrupted bakes. Returns what was removed."""
    directory = bakes_dir(cfg)
    if not directory.is_dir():
        ui.skip(f"no baked images in {directory}")
        return []
    current, _inputs = bakecache.current_key(cfg)
    removed: list[Path] = []
    for path in sorted(directory.iterdir()):
        is_bake = (
            path.suffix in (".qcow2", ".json")
            and path.name != bakecache.DIGESTS
            and not path.name.startswith(".")
        )
        leftover = path.name.startswith(".") and path.name.endswith((".part", ".tmp"))
        if leftover or (is_bake and (everything or path.stem != current)):
            path.unlink()
            removed.append(path)
    kept = "" if everything else f"; kept the current bake {current}" if find(cfg, current) else ""
    ui.ok(f"pruned {len(removed)} file(s) from {directory}{kept}")
    return removed


__all__ = ["bake", "entries", "prune", "show", "work_config"]  # fmt: skip

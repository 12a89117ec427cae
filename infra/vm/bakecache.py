"""The bake cache: where baked images live, their content key, and which image `vm.run` boots.

A bake is `<cache>/bakes/<key>.qcow2` with its manifest `<key>.json` (made by infra/compose/bake.py). The key is a
content hash of everything that went into it (`key_inputs`): the base image's digest, the rendered
user-data minus its per-instance parts (host name, login key), the Nomad version and the pinned job images.
A changed input gives another key, so a stale bake never boots. `choose` is `vm.run`'s decision
(`vm.baked`: auto boots a matching bake, off never, require refuses to boot without one).

Kept apart from infra/compose/bake.py (which provisions, builds and converts) so that infra/vm/lifecycle.py can ask which
image to boot without importing the bake's machinery.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.core import files, ui
from infra.core.config import Config
from infra.core.errors import ImageError, VMError
from infra.guest import seed
from infra.vm import baseimages, qemu

#: Bump when what a bake contains changes in a way its inputs do not show (e.g. the generalization).
FORMAT = 1
BAKES_DIR = "bakes"
DIGESTS = "digests.json"  # local base images without a pinned digest: hashed once per size + mtime


@dataclass(frozen=True)
class Bake:
    key: str
    path: Path  # <cache>/bakes/<key>.qcow2
    manifest: Path  # <cache>/bakes/<key>.json

    def read_manifest(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return {}
        return data


@dataclass(frozen=True)
class Choice:
    """The image `vm.run` boots: a bake (key set) or the base image (key None), and why."""

    image: Path
    key: str | None
    reason: str


# ------------------------------------------------------------------------------------------------- key --
def bakes_dir(cfg: Config) -> Path:
    return cfg.project.cache_dir / BAKES_DIR


def locate(cfg: Config, key: str) -> Bake:
    """Where the bake for `key` lives (whether or not it exists)."""
    directory = bakes_dir(cfg)
    return Bake(key, directory / f"{key}.qcow2", directory / f"{key}.json")


def find(cfg: Config, key: str) -> Bake | None:
    """The bake for `key` when the cache holds it (image and manifest)."""
    bake = locate(cfg, key)
    return bake if bake.path.is_file() and bake.manifest.is_file() else None


def base_digest(cfg: Config, arch: str) -> str:
    """'sha256:<hex>' of the base image: the pinned digest, else (a local file) its hash, remembered."""
    source = baseimages.source_for(cfg, arch)
    if source.digest:
        return f"{source.algo}:{source.digest}"
    if source.path is None:  # pragma: no cover - source_for pins every download
        raise ImageError(f"image {source.name} has neither a digest nor a local path")
    path = source.path.resolve()
    store = bakes_dir(cfg) / DIGESTS
    try:
        known: dict[str, Any] = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = known.get(str(path))
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and entry.get("sha256"):
        return f"sha256:{entry['sha256']}"
    with ui.live(f"hashing {path.name} (the base image's digest is part of the bake key)"):
        digest = baseimages.file_digest(path, "sha256")
    known[str(path)] = {**stamp, "sha256": digest}
    text = json.dumps(known, indent=2, sort_keys=True) + "\n"
    files.write_atomic(store, text.encode(), "record of local image digests")
    return f"sha256:{digest}"


def job_images(cfg: Config) -> list[str]:
    """The images the job specs pin by digest (pre-pulled by the bake when Nomad is provisioned).

    Nomad's docker driver starts a task from a local image without pulling when force_pull is off and
    the tag is not "latest" (hashicorp/nomad drivers/docker/driver.go, createImage: ImageInspect first),
    so a pre-pulled pin deploys without Docker Hub."""
    if not (cfg.provision.nomad and cfg.provision.docker):
        return []  # without Nomad no job runs in the guest: nothing to pre-pull
    from infra.core import hcl  # python-hcl2 (~0.1 s of CPU to import) only where a job spec is read

    refs: set[str] = set()
    for path in (cfg.deploy.data_job, cfg.deploy.app_job, cfg.deploy.ingress_job):
        refs.update(ref for ref in hcl.spec_images(path) if "@sha256:" in ref)
    return sorted(refs)


def key_inputs(cfg: Config, arch: str, base: str) -> dict[str, Any]:
    """Everything a bake is made of, as data (the manifest records it; `content_key` hashes it)."""
    user_data = seed.dump(seed.instance_neutral(cfg)).encode()
    return {
        "format": FORMAT,
        "arch": arch,
        "base_image": base,
        "user_data_sha256": hashlib.sha256(user_data).hexdigest(),
        "nomad_version": cfg.provision.nomad_version if cfg.provision.nomad else None,
        "images": job_images(cfg),
    }


def content_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def current_key(cfg: Config, arch: str | None = None) -> tuple[str, dict[str, Any]]:
    arch = arch or qemu.guest_arch(cfg.vm.arch, qemu.Platform.current())
    inputs = key_inputs(cfg, arch, base_digest(cfg, arch))
    return content_key(inputs), inputs


# ----------------------------------------------------------------------------------------- vm.run's choice --
def choose(cfg: Config, arch: str, base: Path, backing: Path | None, *, baked: bool | None = None) -> Choice:
    """Which image `vm.run` boots, by `vm.baked`; `backing`: what an existing disk overlays (None: no disk).
    `baked`: the answer the caller chose before (`inv up` makes the seed first, for `vm/lifecycle.boots_baked`),
    kept: a bake made since is not taken; one removed since is an error."""
    choice = _choose(cfg, arch, base, backing)
    if baked is None or (choice.key is not None) == baked:
        return choice
    if baked:
        raise VMError(
            f"the baked image this boot was prepared for is gone ({choice.reason})",
            hint="run the command again: it makes the seed for the image the VM boots now",
        )
    return Choice(base, None, "base image (chosen before a bake for this configuration appeared)")


def _choose(cfg: Config, arch: str, base: Path, backing: Path | None) -> Choice:
    if cfg.vm.baked == "off":
        return Choice(base, None, "base image (vm.baked is off)")
    key, _inputs = current_key(cfg, arch)
    bake = find(cfg, key)
    if backing is not None:  # an existing disk keeps the image it was made on
        backing = backing.resolve()
        if bake is not None and backing == bake.path.resolve():
            return Choice(bake.path, key, f"baked image {key}")
        if backing.parent == bakes_dir(cfg).resolve():
            raise VMError(
                f"the VM's disk is an overlay on the baked image {backing.name}, which the current "
                f"configuration no longer matches (its key is {key})",
                hint="`inv vm.destroy` to boot the current configuration (the guest's disk is lost)",
            )
        if cfg.vm.baked == "require":
            raise VMError(
                "vm.baked is require, but the VM's disk is an overlay on the base image",
                hint="`inv vm.destroy`, then `inv vm.run` boots the bake (the guest's disk is lost)",
            )
        return Choice(base, None, "base image (the VM's existing disk was made on it)")
    if bake is not None:
        return Choice(bake.path, key, f"baked image {key}")
    if cfg.vm.baked == "require":
        raise VMError(
            f"vm.baked is require, but no baked image matches this configuration (key {key})",
            hint="`inv image.bake` makes one; `inv image.list` shows the cache",
        )
    return Choice(base, None, f"base image (no bake for key {key}: `inv image.bake` makes one)")


__all__ = [
    "Bake",
    "Choice",
    "bakes_dir",
    "base_digest",
    "choose",
    "content_key",
    "current_key",
    "find",
    "job_images",
    "key_inputs",
    "locate",
]  # fmt: skip

"""infra/vm/bakecache.py: the content key of a baked image, and which image vm.run boots (vm.baked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from infra import ROOT
from infra.core import config
from infra.core.errors import TemplateError, VMError
from infra.guest import seed
from infra.vm import bakecache

ARCH = "x86_64"
DIGEST = "sha256:" + "ab" * 32
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBPkFsOzBkaGc663XawP6l6Ir0RQXYvFAyRrdwGFAdIT test@example"
#: the image pin of the postgres variable in nomad/datastorage.nomad.hcl
POSTGRES_PIN = "051f7b7b3abdd564d5d1bd1e8c4b9c1b6e77087d1dd22020ede611c096a272e0"


def cfg(tmp_path: Path, **sections: dict[str, Any]) -> config.Config:
    overrides: dict[str, Any] = {"project": {"cache_dir": str(tmp_path / "cache")}}
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    return config.load(overrides)


def key(c: config.Config, base: str = DIGEST) -> str:
    return bakecache.content_key(bakecache.key_inputs(c, ARCH, base))


# ----------------------------------------------------------------------------------------------- the key --
def test_the_key_covers_the_inputs_and_is_stable(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    inputs = bakecache.key_inputs(c, ARCH, DIGEST)
    assert inputs["base_image"] == DIGEST and inputs["nomad_version"] == c.provision.nomad_version
    assert f"postgres:17.11-bookworm@sha256:{POSTGRES_PIN}" in inputs["images"]
    assert all("@sha256:" in ref for ref in inputs["images"])  # the app's local image is not pulled
    assert len(inputs["images"]) == 3  # postgres, kafka, traefik (each once, though two specs use two)
    assert key(c) == key(cfg(tmp_path)) and len(key(c)) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"provision": {"nomad_version": "2.0.6"}},
        {"provision": {"packages": ["jq"]}},
        {"provision": {"docker": False}},
        {"provision": {"registry_mirror": "https://mirror.gcr.io"}},
        {"ssh": {"user": "admin"}},
    ],
    ids=["nomad-version", "packages", "docker-part", "registry-mirror", "login-user"],
)
def test_a_changed_input_changes_the_key(tmp_path: Path, change: dict[str, dict[str, Any]]) -> None:
    assert key(cfg(tmp_path, **change)) != key(cfg(tmp_path))


def test_another_base_image_changes_the_key(tmp_path: Path) -> None:
    assert key(cfg(tmp_path), base="sha256:" + "cd" * 32) != key(cfg(tmp_path))


def test_another_image_pin_in_a_job_spec_changes_the_key(tmp_path: Path) -> None:
    spec = tmp_path / "datastorage.nomad.hcl"
    text = (ROOT / "nomad" / "datastorage.nomad.hcl").read_text()
    assert POSTGRES_PIN in text
    spec.write_text(text.replace(POSTGRES_PIN, "0" * 64))
    moved = cfg(tmp_path, deploy={"data_job": str(spec)})
    assert f"postgres:17.11-bookworm@sha256:{'0' * 64}" in bakecache.key_inputs(moved, ARCH, DIGEST)["images"]
    assert key(moved) != key(cfg(tmp_path))


def test_per_instance_parts_do_not_change_the_key(tmp_path: Path) -> None:
    """Host name and login key differ between VMs made from one bake; they are applied at each boot."""
    other = cfg(tmp_path, provision={"hostname": "elsewhere-7"}, ssh={"public_key": KEY})
    assert key(other) == key(cfg(tmp_path))
    neutral = seed.dump(seed.instance_neutral(other))
    assert "elsewhere-7" not in neutral and "AAAAC3Nza" not in neutral


def test_without_nomad_nothing_is_pulled_and_the_version_does_not_count(tmp_path: Path) -> None:
    off = {"nomad": False, "docker": True}
    inputs = bakecache.key_inputs(cfg(tmp_path, provision=off), ARCH, DIGEST)
    assert inputs["images"] == [] and inputs["nomad_version"] is None
    other_version = cfg(tmp_path, provision={**off, "nomad_version": "1.9.9"})
    assert key(other_version) == key(cfg(tmp_path, provision=off))


def test_a_catalogue_base_is_keyed_by_its_pinned_digest(tmp_path: Path) -> None:
    c = cfg(tmp_path, vm={"distro": "debian-12"})
    pinned = yaml.safe_load((ROOT / "vm" / "images.yaml").read_text())["images"]["debian-12"][ARCH]
    algo = next(a for a in ("sha256", "sha512") if a in pinned)
    assert bakecache.base_digest(c, ARCH) == f"{algo}:{pinned[algo]}"


def test_a_local_base_without_digest_is_hashed_once_per_change(tmp_path: Path) -> None:
    image = tmp_path / "base.qcow2"
    image.write_bytes(b"one")
    c = cfg(tmp_path, vm={"image": str(image)})
    first = bakecache.base_digest(c, ARCH)
    assert first == "sha256:7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
    assert bakecache.base_digest(c, ARCH) == first  # remembered (size + mtime)
    image.write_bytes(b"two")
    assert bakecache.base_digest(c, ARCH) != first


def test_the_baked_seed_installs_nothing(tmp_path: Path) -> None:
    c = cfg(tmp_path, provision={"packages": ["jq"]})
    full = yaml.safe_load(seed.render(c, KEY).user_data)
    baked = yaml.safe_load(seed.render(c, KEY, baked=True).user_data)
    assert "docker.io" in full["packages"] and full["package_update"] is True
    assert not set(seed.BAKED_KEYS) & set(baked)
    assert baked["runcmd"] == full["runcmd"] and baked["users"] == full["users"]  # per-instance parts stay


# ------------------------------------------------------------------------------------------ vm.run's choice --
def make_bake(c: config.Config) -> bakecache.Bake:
    k, _inputs = bakecache.current_key(c, ARCH)
    directory = bakecache.bakes_dir(c)
    directory.mkdir(parents=True, exist_ok=True)
    made = bakecache.Bake(k, directory / f"{k}.qcow2", directory / f"{k}.json")
    made.path.write_bytes(b"qcow2")
    made.manifest.write_text("{}")
    return made


def test_auto_boots_the_matching_bake(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    base = tmp_path / "base.img"
    choice = bakecache.choose(c, ARCH, base, None)
    assert choice.image == base and choice.key is None and "inv image.bake" in choice.reason
    made = make_bake(c)
    choice = bakecache.choose(c, ARCH, base, None)
    assert choice.image == made.path and choice.key == made.key
    assert choice.reason == f"baked image {made.key}"


def test_a_stale_bake_never_boots(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    make_bake(c)
    newer = cfg(tmp_path, provision={"nomad_version": "2.0.8"})
    assert bakecache.choose(newer, ARCH, tmp_path / "base.img", None).key is None
    with pytest.raises(VMError, match=r"vm\.baked is require, but no baked image matches"):
        bakecache.choose(cfg(tmp_path, provision={"nomad_version": "2.0.8"}, vm={"baked": "require"}),
                    ARCH, tmp_path / "base.img", None)  # fmt: skip


def test_an_existing_disk_keeps_its_image(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    made = make_bake(c)
    base = tmp_path / "base.img"
    assert bakecache.choose(c, ARCH, base, base).image == base  # a disk made on the base stays on it
    assert bakecache.choose(c, ARCH, base, made.path).key == made.key
    newer = cfg(tmp_path, provision={"nomad_version": "2.0.8"})
    with pytest.raises(VMError, match="no longer matches") as err:
        bakecache.choose(newer, ARCH, base, made.path)
    assert "inv vm.destroy" in str(err.value)


def test_off_and_require(tmp_path: Path) -> None:
    c = cfg(tmp_path, vm={"baked": "off"})
    make_bake(cfg(tmp_path))
    base = tmp_path / "base.img"
    assert bakecache.choose(c, ARCH, base, None) == bakecache.Choice(
        base, None, "base image (vm.baked is off)"
    )
    with pytest.raises(VMError, match="overlay on the base image"):
        bakecache.choose(cfg(tmp_path, vm={"baked": "require"}), ARCH, base, base)


def test_vm_baked_is_validated(tmp_path: Path) -> None:
    with pytest.raises(
        config.ConfigError, match=r"vm\.baked is 'always'; expected one of: auto, off, require"
    ):
        cfg(tmp_path, vm={"baked": "always"})


def test_an_image_the_key_cannot_resolve_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    spec = tmp_path / "ingress.nomad.hcl"
    text = (ROOT / "nomad" / "ingress.nomad.hcl").read_text()
    assert "image              = var.traefik_image" in text
    spec.write_text(text.replace("image              = var.traefik_image", 'image = "${var.nowhere}"'))
    line = next(i for i, ln in enumerate(spec.read_text().splitlines(), 1) if "var.nowhere" in ln)
    with pytest.raises(
        TemplateError, match=rf'ingress\.nomad\.hcl:{line}: ingress/traefik/traefik: image .*"nowhere"'
    ):
        bakecache.key_inputs(cfg(tmp_path, deploy={"ingress_job": str(spec)}), ARCH, DIGEST)


def test_the_image_chosen_before_is_the_one_booted(tmp_path: Path) -> None:
    """`inv up` chooses once (`lifecycle.boots_baked`) and makes the seed for it; `preparing` passes that
    answer down: a bake that appeared since is not taken, one that vanished since is an error."""
    c = cfg(tmp_path)
    base = tmp_path / "base.img"
    made = make_bake(c)
    assert bakecache.choose(c, ARCH, base, None, baked=True).key == made.key
    chosen = bakecache.choose(c, ARCH, base, None, baked=False)
    assert chosen.image == base and chosen.key is None
    made.path.unlink()
    assert bakecache.choose(c, ARCH, base, None, baked=False).image == base
    with pytest.raises(VMError, match="this boot was prepared for is gone"):
        bakecache.choose(c, ARCH, base, None, baked=True)

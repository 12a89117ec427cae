"""infra/vm/bakecache.py + infra/vm/lifecycle.py with real qemu-img / qemu (no OS boots): vm.run picks the bake by key, its seed installs
nothing, a stale bake is refused; `inv image.list` / `inv image.prune` / `vm.baked: require` via the CLI.
The bake itself (boot, generalize, compress) is proven in the VM tier (tests/vm/test_vm_guest.py)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from support.servers.common import vm_ports

from infra.core import config
from infra.core.errors import VMError
from infra.core.state import StatePaths
from infra.vm import bakecache, instance, lifecycle, qemuimg, verbs

Inv = Callable[..., subprocess.CompletedProcess[str]]


def qcow2(path: Path, size: str = "1G") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def settings(tmp_path: Path, **provision: object) -> dict[str, object]:
    """A blank-disk VM (qemu starts, no OS boots) with the docker part on, so the full seed has packages."""
    return {
        "project": {"state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache")},
        "provision": {"nomad": False, "docker": True, **provision},
        "vm": {"image": str(tmp_path / "base.qcow2"), "accel": "tcg", "cpus": 1, "memory_mb": 128,
               "disk_gb": 2, "ports": vm_ports()},
    }  # fmt: skip


def fake_bake(cfg: config.Config) -> bakecache.Bake:
    """A bake in the cache for the configuration's current key (a blank qcow2 stands in for the image)."""
    key, inputs = bakecache.current_key(cfg)
    made = bakecache.Bake(
        key, qcow2(bakecache.bakes_dir(cfg) / f"{key}.qcow2"), bakecache.bakes_dir(cfg) / f"{key}.json"
    )
    made.manifest.write_text(json.dumps({"key": key, "inputs": inputs, "created_at": "2026-11-30T00:00:00Z"}))
    return made


@pytest.fixture
def blank(tmp_path: Path) -> Iterator[config.Config]:
    qcow2(tmp_path / "base.qcow2")
    cfg = config.load(settings(tmp_path))
    yield cfg
    pid = instance.running_pid(StatePaths.of(cfg))
    if pid is not None:
        os.kill(pid, 9)


def test_vm_run_boots_the_matching_bake_with_a_seed_that_installs_nothing(
    blank: config.Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = fake_bake(blank)
    booted = verbs.run(blank)
    launch = booted.launch
    assert booted.seed is not None  # the seed made for the bake is the one the VM was launched with
    assert (launch.record["seed_iso"], launch.record["instance_id"]) == (
        str(booted.seed.path),
        booted.seed.instance_id,
    )
    assert launch.record["baked"] == made.key and launch.record["image"] == str(made.path)
    assert launch.record["base_image"] == str(tmp_path / "base.qcow2")
    assert f"image: baked image {made.key}" in capsys.readouterr().err
    p = StatePaths.of(blank)
    assert qemuimg.image_info(p.disk)["full-backing-filename"] == str(made.path.resolve())
    user_data = yaml.safe_load(p.user_data.read_text())
    assert "packages" not in user_data and "package_update" not in user_data  # nothing to install
    assert "/usr/local/lib/infra-lab/10-docker.sh" in user_data["runcmd"]  # the idempotent script stays
    assert lifecycle.facts(blank)["baked"] == made.key
    lifecycle.stop(blank, timeout=0)

    # the configuration moves on: the disk made on the old bake is refused, never booted
    moved = config.load(settings(tmp_path, packages=["jq"]))
    with pytest.raises(VMError, match="no longer matches") as err:
        verbs.run(moved)
    assert "inv vm.destroy" in str(err.value) and instance.running_pid(p) is None
    lifecycle.destroy(moved)
    launch = verbs.run(moved).launch  # a fresh disk on the base image: the full seed, packages and all
    assert launch.record["baked"] is None and launch.record["image"] == str(tmp_path / "base.qcow2")
    assert "docker.io" in yaml.safe_load(p.user_data.read_text())["packages"]
    lifecycle.stop(blank, timeout=0)


def test_require_without_a_bake_is_an_error_that_starts_nothing(run_inv: Inv, tmp_path: Path) -> None:
    qcow2(tmp_path / "base.qcow2")
    cfg_file = tmp_path / "vm.yaml"
    data = settings(tmp_path)
    data["vm"] = {**data["vm"], "baked": "require"}  # type: ignore[dict-item]
    cfg_file.write_text(yaml.safe_dump(data))
    result = run_inv("-f", str(cfg_file), "vm.run")
    assert result.returncode == 1, result.stderr
    assert "error: vm.baked is require, but no baked image matches this configuration (key " in result.stderr
    assert "hint: `inv image.bake` makes one" in result.stderr and "Traceback" not in result.stderr
    state = tmp_path / "state"
    assert not (state / "disk.qcow2").exists() and not (state / "qemu.pid").exists()


def test_image_list_and_prune(run_inv: Inv, tmp_path: Path) -> None:
    qcow2(tmp_path / "base.qcow2")
    cfg_file = tmp_path / "vm.yaml"
    cfg_file.write_text(yaml.safe_dump(settings(tmp_path)))
    current = fake_bake(config.load(settings(tmp_path)))
    stale = fake_bake(config.load(settings(tmp_path, packages=["jq"])))
    leftover = qcow2(bakecache.bakes_dir(config.load(settings(tmp_path))) / ".0123456789abcdef.qcow2.part")
    assert current.key != stale.key

    listed = run_inv("-f", str(cfg_file), "image.list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_key = {e["key"]: e for e in json.loads(listed.stdout)}
    assert set(by_key) == {current.key, stale.key}
    assert by_key[current.key]["current"] is True and by_key[stale.key]["current"] is False
    shown = run_inv("-f", str(cfg_file), "image.list")
    assert f"current {current.key}" in shown.stderr and f"stale   {stale.key}" in shown.stderr

    pruned = run_inv("-f", str(cfg_file), "image.prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 3 file(s)" in pruned.stderr and f"kept the current bake {current.key}" in pruned.stderr
    assert current.path.exists() and current.manifest.exists()
    assert not stale.path.exists() and not stale.manifest.exists() and not leftover.exists()

    everything = run_inv("-f", str(cfg_file), "image.prune", "--all")
    assert everything.returncode == 0, everything.stderr
    assert not current.path.exists() and not current.manifest.exists()

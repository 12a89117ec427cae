"""infra.vm.baseimages: catalogue, download cache, resume, retries and checksum failures.

Downloads go to a real HTTP server on 127.0.0.1 (started by the `image_server` fixture, stopped after
each test) that can serve a corrupt body, cut the connection mid-body, ignore Range, or answer 404/503 —
the failures a mirror or a flaky network produce. The image is random bytes with a known sha256.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from infra.core import config
from infra.core.errors import ConfigError, ImageError
from infra.vm import baseimages

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)

SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


def test_url_without_digest_is_refused(make_cfg: Callable[..., config.Config]) -> None:
    cfg = make_cfg(vm={"image": "https://example.invalid/x.img"})
    with pytest.raises(ConfigError, match=r"vm\.image_sha256"):
        baseimages.ensure(cfg, "x86_64")


def test_local_image_path(make_cfg: Callable[..., config.Config], tmp_path: Path) -> None:
    local = tmp_path / "local.qcow2"
    local.write_bytes(PAYLOAD)
    assert baseimages.ensure(make_cfg(vm={"image": str(local)}), "x86_64") == local
    assert baseimages.ensure(make_cfg(vm={"image": str(local), "image_sha256": SHA256}), "x86_64") == local
    with pytest.raises(ImageError, match=r"does not match vm\.image_sha256"):
        baseimages.ensure(make_cfg(vm={"image": str(local), "image_sha256": "0" * 64}), "x86_64")
    with pytest.raises(ConfigError, match="no such file"):
        baseimages.ensure(make_cfg(vm={"image": str(tmp_path / "missing.qcow2")}), "x86_64")


def test_catalogue_pins_every_image_by_digest() -> None:
    data = yaml.safe_load(baseimages.CATALOGUE.read_text())
    assert data["default"] in data["images"]
    assert {"ubuntu-24.04", "debian-12"} <= set(data["images"])
    for distro, arches in data["images"].items():
        assert set(arches) == {"x86_64", "aarch64"}, distro
        for arch in arches:
            src = baseimages.catalogue_source(distro, arch)
            assert all(u.startswith("https://") for u in src.urls)
            assert len(src.digest) == {"sha256": 64, "sha512": 128}[src.algo]


def test_default_config_uses_the_catalogue(make_cfg: Callable[..., config.Config]) -> None:
    src = baseimages.source_for(make_cfg(), "aarch64")
    assert src.name == "ubuntu-24.04/aarch64" and src.urls[0].endswith("-arm64.img")
    assert src.digest == "1d6bffe64b848468ac97f821d369a4846d983de1800ccf6b5ec8853e85cefc55"


def test_unknown_distro_names_the_key(make_cfg: Callable[..., config.Config]) -> None:
    with pytest.raises(ConfigError, match=r"vm\.distro"):
        baseimages.source_for(make_cfg(vm={"distro": "fedora-40"}), "x86_64")


def test_malformed_digest_in_catalogue(tmp_path: Path) -> None:
    bad = tmp_path / "images.yaml"
    bad.write_text("images:\n  x:\n    x86_64: {url: 'https://e.invalid/x', sha256: 'abc'}\n")
    with pytest.raises(Exception, match="64 hex characters"):
        baseimages.catalogue_source("x", "x86_64", path=bad)

"""infra/guest/seed.py: user-data composition, validation, and the ISO read back with pycdlib."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from infra.core import config
from infra.core.errors import SSHKeyError, TemplateError, ValidationError
from infra.guest import pgp, seed

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBPkFsOzBkaGc663XawP6l6Ir0RQXYvFAyRrdwGFAdIT test@example"


def userdata(cfg: config.Config) -> dict[str, Any]:
    doc = yaml.safe_load(seed.render(cfg, KEY).user_data)
    assert isinstance(doc, dict)
    return doc


def files_by_path(doc: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {f["path"]: f for f in doc["write_files"]}


# ------------------------------------------------------------------------------------------------- ISO --
def read_iso(data: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    return iso


def get(iso: pycdlib.PyCdlib, **path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue()


def test_user_key_hostname_land_where_they_should(make_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg = make_cfg(ssh={"user": "deploy"}, provision={"hostname": "lab-7"})
    raw = seed.render(cfg, KEY).user_data
    assert raw.startswith(b"#cloud-config\n")
    doc = yaml.safe_load(raw)
    assert doc["hostname"] == "lab-7"
    assert doc["manage_etc_hosts"] is True
    user = doc["users"][0]
    assert user["name"] == "deploy"
    assert user["ssh_authorized_keys"] == [KEY]
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["lock_passwd"] is True
    assert doc["ssh_pwauth"] is False


def test_full_install_pins_nomad_and_ships_agent_config_and_volumes(make_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg = make_cfg(provision={"nomad_version": "2.0.7"})
    doc = userdata(cfg)
    files = files_by_path(doc)
    env = files["/etc/infra-lab/provision.env"]["content"]
    assert "NOMAD_VERSION=2.0.7\n" in env
    assert f"HASHICORP_KEY_FPR={pgp.HASHICORP_KEY_FPR}\n" in env
    agent = files["/etc/nomad.d/zz-infra-lab.hcl"]
    assert agent["defer"] is True
    shipped = (seed.FILES_DIR / "nomad" / "zz-infra-lab.hcl").read_text()
    assert agent["content"] == shipped
    assert 'host_volume "postgres-data"' in shipped and "bootstrap_expect = 1" in shipped
    assert (
        "After=docker.service" in files["/etc/systemd/system/nomad.service.d/10-after-docker.conf"]["content"]
    )
    installer = files["/usr/local/lib/infra-lab/20-nomad-install.sh"]["content"]
    assert 'apt-get install -y --no-install-recommends "nomad=${NOMAD_VERSION}-1"' in installer
    assert "/opt/nomad/volumes/kafka 1000 1000" in files["/etc/infra-lab/host-volumes"]["content"]
    assert "docker.io" in doc["packages"] and "gnupg" in doc["packages"]
    assert doc["package_update"] is True
    # Docker is started (and awaited) before Nomad is installed and started; the marker comes last.
    assert doc["runcmd"][:4] == [
        "/usr/local/lib/infra-lab/10-docker.sh",
        "/usr/local/lib/infra-lab/20-nomad-install.sh",
        "/usr/local/lib/infra-lab/30-nomad-volumes.sh",
        "/usr/local/lib/infra-lab/40-nomad-start.sh",
    ]
    assert "/etc/infra-lab/provisioned" in doc["runcmd"][-1][-1]


def test_parts_switch_off(make_cfg) -> None:  # type: ignore[no-untyped-def]
    doc = userdata(make_cfg(provision={"nomad": False, "docker": False}))
    files = files_by_path(doc)
    assert not any("nomad" in p for p in files)
    assert "packages" not in doc and "package_update" not in doc
    assert "NOMAD_VERSION" not in files["/etc/infra-lab/provision.env"]["content"]
    assert len(doc["runcmd"]) == 1  # only the completion marker


def test_instance_id_follows_content(make_cfg) -> None:  # type: ignore[no-untyped-def]
    a = seed.render(make_cfg(), KEY)
    b = seed.render(make_cfg(), KEY)
    c = seed.render(make_cfg(provision={"hostname": "other"}), KEY)
    assert a.instance_id == b.instance_id
    assert a.instance_id != c.instance_id
    assert yaml.safe_load(a.meta_data) == {"instance-id": a.instance_id, "local-hostname": "nomad-1"}


def test_iso_label_names_and_exact_bytes(make_cfg) -> None:  # type: ignore[no-untyped-def]
    s = seed.render(make_cfg(), KEY)
    iso = read_iso(seed.iso_bytes(s))
    assert iso.pvd.volume_identifier.decode().strip() == "cidata"
    assert iso.has_rock_ridge() and iso.has_joliet()
    for iso_name, long_name, expected in (
        ("USERDATA.;1", "user-data", s.user_data),
        ("METADATA.;1", "meta-data", s.meta_data),
        ("NETWORKC.;1", "network-config", s.network_config),
    ):
        assert get(iso, iso_path=f"/{iso_name}") == expected
        assert get(iso, rr_path=f"/{long_name}") == expected
        assert get(iso, joliet_path=f"/{long_name}") == expected
    names = sorted(
        child.rock_ridge.name().decode() for child in iso.list_children(iso_path="/") if child.is_file()
    )
    assert names == ["meta-data", "network-config", "user-data"]
    iso.close()


def test_iso_bytes_do_not_depend_on_wall_clock_or_timezone(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    s = seed.render(make_cfg(), KEY)
    a = seed.iso_bytes(s)
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    import time

    time.tzset()
    try:
        b = seed.iso_bytes(s)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert a == b
    assert seed.iso_bytes(s, epoch=0) != a  # the epoch really is what is stamped


# ----------------------------------------------------------------------------------------- bad input --
def test_malformed_template_names_file_line_column(make_cfg, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    parts = tmp_path / "parts"
    shutil.copytree(seed.PARTS_DIR, parts)
    (parts / "docker.yaml").write_text("packages:\n  - docker.io\n write_files: [\n")
    monkeypatch.setattr(seed, "PARTS_DIR", parts)
    cfg = make_cfg()
    with pytest.raises(TemplateError) as err:
        seed.write_iso(cfg)
    assert f"{parts / 'docker.yaml'}:3:" in str(err.value)
    assert "malformed YAML" in str(err.value)
    assert not (cfg.project.state_dir / "seed.iso").exists()


def test_schema_error_names_the_field_path(make_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg = make_cfg()
    doc = seed.compose(cfg, KEY)
    doc["write_files"][1]["permissions"] = 644  # must be a string
    doc["packages"] = "docker.io"  # must be a list
    doc["runcmdd"] = []
    with pytest.raises(ValidationError) as err:
        seed.validate(doc, cfg)
    text = str(err.value)
    assert "packages: 'docker.io' is not of type 'array'" in text
    assert "write_files[1].permissions: 644 is not of type 'string'" in text
    assert "runcmdd: not a cloud-config key known to cloud-init's schema" in text


@pytest.mark.parametrize(
    ("provision", "message"),
    [
        ({"nomad_version": "2.0.7\n"}, r"provision\.nomad_version: '2\.0\.7\\n' is not a pinned X\.Y\.Z"),
        (
            {"registry_mirror": "https://mirror.gcr.io\n"},
            r"provision\.registry_mirror: .* is not an https://",
        ),
    ],
)
def test_a_trailing_newline_is_not_a_valid_value(make_cfg, provision, message) -> None:  # type: ignore[no-untyped-def]
    """Issue 23, item 5: full matches (re.fullmatch), not re.match + `$`, which accepts a trailing newline."""
    with pytest.raises(ValidationError, match=message):
        seed.render(make_cfg(provision=provision), KEY)


def test_project_rules(make_cfg, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = make_cfg(provision={"nomad_version": "latest"})
    with pytest.raises(ValidationError, match=r"provision\.nomad_version: 'latest' is not a pinned X\.Y\.Z"):
        seed.render(cfg, KEY)
    files = tmp_path / "files"
    shutil.copytree(seed.FILES_DIR, files)
    hv = files / "nomad" / "host-volumes"
    hv.write_text("\n".join(line for line in hv.read_text().splitlines() if "kafka" not in line) + "\n")
    monkeypatch.setattr(seed, "FILES_DIR", files)
    with pytest.raises(
        ValidationError, match=r"host_volume 'kafka-data' path /opt/nomad/volumes/kafka has no entry"
    ):
        seed.render(make_cfg(), KEY)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("ssh-ed25519", "not an SSH public key"),
        ("ssh-ed25519 !!!notbase64", "not valid base64"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "unsupported SSH key type 'ssh-dss'"),
        (
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIBPkFsOzBkaGc663XawP6l6Ir0RQXYvFAyRrdwGFAdIT",
            "encodes 'ssh-ed25519'",
        ),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBPk", "corrupt"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "this is a private key"),
    ],
)
def test_invalid_public_key_is_refused_and_nothing_written(make_cfg, key: str, message: str) -> None:  # type: ignore[no-untyped-def]
    cfg = make_cfg(ssh={"public_key": key})
    with pytest.raises(SSHKeyError, match=message):
        seed.write_iso(cfg)
    assert not (cfg.project.state_dir / "seed.iso").exists()


def test_not_a_key_block() -> None:
    with pytest.raises(ValidationError, match="not an ASCII-armored OpenPGP public key block"):
        pgp.dearmor("hello", "x.asc")


def test_registry_mirror_goes_to_docker_daemon_json(make_cfg) -> None:  # type: ignore[no-untyped-def]
    doc = userdata(make_cfg(provision={"registry_mirror": "https://mirror.gcr.io"}))
    daemon = files_by_path(doc)["/etc/docker/daemon.json"]
    assert yaml.safe_load(daemon["content"]) == {"registry-mirrors": ["https://mirror.gcr.io"]}
    assert "/etc/docker/daemon.json" not in files_by_path(userdata(make_cfg()))
    with pytest.raises(
        ValidationError, match=r"provision\.registry_mirror: 'mirror\.gcr\.io' is not an https://"
    ):
        seed.render(make_cfg(provision={"registry_mirror": "mirror.gcr.io"}), KEY)


def test_refresh_follows_config_but_keeps_the_key_given_to_inv_iso(make_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pub = tmp_path / "mine.pub"
    pub.write_text(KEY + "\n")
    first = seed.write_iso(make_cfg(), ssh_key=str(pub))  # inv iso --ssh-key mine.pub
    again = seed.refresh(make_cfg())  # inv vm.run, config unchanged: same bytes
    assert again.sha256 == first.sha256 and again.changed is False
    changed = seed.refresh(make_cfg(provision={"hostname": "renamed"}))  # config changed since inv iso
    assert changed.changed is True and changed.instance_id != first.instance_id
    doc = yaml.safe_load(changed.path.with_name("user-data").read_bytes())
    assert doc["hostname"] == "renamed"
    assert doc["users"][0]["ssh_authorized_keys"] == [KEY]  # not replaced by a generated key
    assert not (tmp_path / "state" / "ssh" / "id_ed25519").exists()

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infra import ROOT, config
from infra.errors import ConfigError


def test_defaults_load_and_are_typed() -> None:
    cfg = config.load()
    assert cfg.vm.ports["ssh"] == config.Port(host=2222, guest=22)
    assert cfg.vm.accel == "auto"
    assert cfg.provision.nomad is True
    assert cfg.project.state_dir == ROOT / ".state"
    assert cfg.deploy.data_job == ROOT / "nomad" / "datastorage.nomad.hcl"


def test_every_declared_key_is_documented() -> None:
    # invoke.yaml is the one place keys are declared: each leaf key carries a trailing comment or sits in a
    # run of keys introduced by a comment line.
    lines = (ROOT / "invoke.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":") or "#" in line:
            continue
        j = i - 1
        while (
            j >= 0
            and lines[j].strip()
            and not lines[j].strip().startswith("#")
            and not lines[j].endswith(":")
        ):
            j -= 1
        if j >= 0 and lines[j].endswith(":") and lines[j].startswith(" "):  # a documented nested mapping
            j -= 1
        if j < 0 or not lines[j].strip().startswith("#"):
            undocumented.append(stripped)
    assert undocumented == []


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown configuration key vm\.acel \(did you mean vm\.accel\?\)"):
        config.load({"vm": {"acel": "tcg"}})


def test_unknown_top_level_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown configuration key vmm \(did you mean vm\?\)"):
        config.load({"vmm": {}})


def test_wrong_type_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"vm\.ports\.ssh\.host must be a number, got 'x'"):
        config.load({"vm": {"ports": {"ssh": {"host": "x", "guest": 22}}}})
    with pytest.raises(ConfigError, match=r"provision\.nomad must be true/false, got 'yes'"):
        config.load({"provision": {"nomad": "yes"}})


def test_enum_and_port_range_and_duplicate_host_ports() -> None:
    with pytest.raises(ConfigError, match=r"vm\.accel is 'fast'; expected one of: auto, kvm, hvf, tcg"):
        config.load({"vm": {"accel": "fast"}})
    with pytest.raises(ConfigError, match=r"vm\.ports\.nomad\.host must be a port 1-65535, got 70000"):
        config.load({"vm": {"ports": {"nomad": {"host": 70000, "guest": 4646}}}})
    with pytest.raises(ConfigError, match=r"both use host port 2222"):
        config.load({"vm": {"ports": {"nomad": {"host": 2222, "guest": 4646}}}})


def test_extra_port_forward_may_be_added() -> None:
    cfg = config.load({"vm": {"ports": {"grafana": {"host": 3001, "guest": 3001}}}})
    assert cfg.vm.ports["grafana"].guest == 3001


def test_cli_rejects_unknown_key_in_a_config_file(tmp_path: Path, run_inv) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"vm": {"acel": "tcg"}}))
    result = run_inv("-f", str(bad), "iso")
    assert result.returncode != 0
    assert "unknown configuration key vm.acel (did you mean vm.accel?)" in result.stderr
    assert not (tmp_path / "state" / "seed.iso").exists()


def test_cli_env_override_is_typed(run_inv, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # invoke casts INVOKE_* values to the declared default's type; a non-number fails loudly.
    result = run_inv("iso", env={"INVOKE_VM_CPUS": "many"})
    assert result.returncode != 0
    assert "vm.cpus" in result.stderr or "many" in result.stderr


def test_false_in_a_boolean_env_var_is_refused_not_read_as_true(run_inv, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_inv("iso", env={"INVOKE_PROVISION_NOMAD": "false"})
    assert result.returncode != 0
    assert "INVOKE_PROVISION_NOMAD='false' would mean true" in result.stderr
    assert not (tmp_path / "state" / "seed.iso").exists()
    off = run_inv("iso", env={"INVOKE_PROVISION_NOMAD": "0"})
    assert off.returncode == 0, off.stderr
    assert b"NOMAD_VERSION" not in (tmp_path / "state" / "user-data").read_bytes()

from __future__ import annotations

import pytest

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

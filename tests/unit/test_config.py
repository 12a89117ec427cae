from __future__ import annotations

from pathlib import Path

import pytest

from infra import ROOT
from infra.core import config
from infra.core.errors import ConfigError


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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vm": {"cpus": 0}}, r"vm\.cpus must be a whole number >= 1, got 0"),
        ({"vm": {"memory_mb": -1}}, r"vm\.memory_mb must be a whole number >= 1, got -1"),
        ({"vm": {"disk_gb": 2.5}}, r"vm\.disk_gb must be a whole number >= 1, got 2\.5"),
        ({"nomad": {"retries": -1}}, r"nomad\.retries must be a whole number, got -1"),
        ({"nomad": {"connect_timeout": 0}}, r"nomad\.connect_timeout must be a number of seconds > 0"),
        (
            {"vm": {"ports": {"kafka": {"host": 19093, "guest": 19092}}}},
            r"vm\.ports\.kafka\.host \(19093\) and",
        ),
        ({"ssh": {"user": "ops; rm"}}, r"ssh\.user is 'ops; rm': not a valid user name"),
        (
            {"provision": {"hostname": "nomad-1;x"}},
            r"provision\.hostname is 'nomad-1;x': not a valid host name",
        ),
        ({"provision": {"hostname": "-lead"}}, r"provision\.hostname is '-lead'"),
        ({"project": {"state_dir": "/tmp/a,b"}}, r"project\.state_dir is '/tmp/a,b': a comma is not allowed"),
        ({"vm": {"cpu": "max -s"}}, r"vm\.cpu is 'max -s': not a qemu CPU model"),
        ({"vm": {"cpu": ""}}, r"vm\.cpu is '': not a qemu CPU model"),
        ({"vm": {"cpu": "max,,x"}}, r"vm\.cpu is 'max,,x'"),
        (
            {"vm": {"cpu": "host", "accel": "tcg"}},
            r"vm\.cpu \(host\) and vm\.accel \(tcg\) do not go together",
        ),
    ],
)
def test_values_out_of_range_or_malformed_name_their_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(overrides)


def test_values_at_the_edges_are_accepted() -> None:
    cfg = config.load(
        {
            "vm": {
                "cpus": 1,
                "memory_mb": 1,
                "disk_gb": 1,
                "ports": {"kafka": {"host": 29092, "guest": 29092}},
            },
            "nomad": {"retries": 0},
            "ssh": {"user": "_svc-1"},
            "provision": {"hostname": "a.b-c.example"},
        }
    )
    assert cfg.vm.cpus == 1 and cfg.nomad.retries == 0
    model = "Nehalem-v2,-la57,+pdpe1gb,l3-cache=on"
    assert config.load({"vm": {"cpu": model}}).vm.cpu == model
    # Kafka's forward only matters where Kafka runs (on Nomad)
    assert config.load({"provision": {"nomad": False}, "vm": {"ports": {"kafka": {"host": 1, "guest": 2}}}})


def test_a_config_layer_is_checked_before_invoke_merges_it(tmp_path: Path) -> None:
    layer = tmp_path / "my.yaml"
    layer.write_text("vm:\n  ports: [2222]\n")
    with pytest.raises(ConfigError, match=r"configuration key vm\.ports must be a mapping, got a list"):
        config.read_layer(layer)
    layer.write_text("")
    assert config.read_layer(layer) == {}
    layer.write_text("run: {echo: true}\nvm: {accel: tcg}\n")  # invoke's own keys pass through
    assert config.read_layer(layer) == {"run": {"echo": True}, "vm": {"accel": "tcg"}}
    assert config.read_layer(config.DEFAULTS_FILE)["vm"]["cpus"] == 2

from __future__ import annotations

from pathlib import Path

import yaml


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

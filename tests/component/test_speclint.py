"""infra/nomad/speclint.py: the real specs pass; every rule fires, with its exact message, on a broken copy.

Broken copies are made from the real specs by targeted text edits (each edit must match exactly once,
so a test cannot silently stop testing anything when a spec changes) and written into tmp_path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import ROOT
from infra.core import hcl
from infra.nomad import speclint

SPECS = ROOT / "nomad"

APP = "service.nomad.hcl"

INGRESS = "ingress.nomad.hcl"

AGENT = "cloud-init/files/nomad/zz-infra-lab.hcl"


# ------------------------------------------------------------------------------ nomad fmt / validate --
@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Findings name files relative to the working directory: work in tmp_path."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _fake_nomad(
    directory: Path, fmt_exit: int, validate_exit: int, config_exit: int = 0, job_warning: str = ""
) -> Path:
    """A stand-in `nomad` executable (a test double: the real binary cannot be obtained here) that records
    its arguments and answers fmt / job validate / config validate with the given exit codes. With
    `job_warning`, a passing `job validate` prints it the way Nomad prints warnings (command/meta.go
    FormatWarnings, then "Job validation successful")."""
    script = directory / "nomad"
    warn = (
        f"if [ {validate_exit} = 0 ]; then printf 'Job Warnings:\\n1 warning:\\n\\n* {job_warning}\\n\\n"
        "Job validation successful\\n'; exit 0; fi\n"
        if job_warning
        else ""
    )
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{directory}/calls"\n'
        f'if [ "$1" = fmt ]; then echo "$3"; exit {fmt_exit}; fi\n'
        f'if [ "$1" = job ]; then {warn}echo "Job validation errors:" >&2; echo "1 error occurred" >&2; exit {validate_exit}; fi\n'
        f'if [ "$1" = config ]; then echo "Configuration is valid!"; exit {config_exit}; fi\n'
        "exit 64\n",
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_nomad_fmt_and_validate_run_per_file_when_nomad_is_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_nomad(bin_dir, fmt_exit=3, validate_exit=1)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    spec = SPECS / INGRESS

    assert speclint.main([str(spec)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"nomad/{INGRESS}: nomad-fmt: nomad fmt -check exited 3 (reformat with: nomad fmt nomad/{INGRESS}): "
        f"{spec}",
        f"nomad/{INGRESS}: nomad-validate: nomad job validate exited 1: Job validation errors: | "
        "1 error occurred",
        f"{AGENT}: nomad-fmt: nomad fmt -check exited 3 (reformat with: nomad fmt {AGENT}): "
        f"{hcl.AGENT_CONFIG}",
    ]
    assert speclint.NOMAD_SKIPPED not in err
    agent = hcl.AGENT_CONFIG
    assert (bin_dir / "calls").read_text().splitlines() == [
        f"fmt -check {spec}",
        f"job validate {spec}",
        f"fmt -check {agent}",
        f"config validate {agent}",
    ]


def test_nomad_checks_report_success(tmp_path: Path) -> None:
    _fake_nomad(tmp_path, fmt_exit=0, validate_exit=0)
    findings, notes = speclint.nomad_checks(
        [SPECS / APP], nomad=str(tmp_path / "nomad"), agent_config=hcl.AGENT_CONFIG
    )
    assert findings == []
    assert notes == [
        f"ok: nomad fmt -check and nomad job validate ran on {hcl.display_path(SPECS / APP)}",
        f"ok: nomad fmt -check and nomad config validate ran on {hcl.display_path(hcl.AGENT_CONFIG)}",
    ]


def test_nomad_warnings_are_findings_although_nomad_exits_0(tmp_path: Path) -> None:
    # Nomad's own wording for a group with services and no shutdown_delay (nomad/structs/structs.go).
    warning = (
        'group "app" defines services, but neither the group nor any of its tasks have shutdown_delay set'
    )
    _fake_nomad(tmp_path, fmt_exit=0, validate_exit=0, job_warning=warning)
    findings, _ = speclint.nomad_checks([SPECS / APP], nomad=str(tmp_path / "nomad"))
    assert [str(f) for f in findings] == [
        f"nomad/{APP}: nomad-validate: nomad job validate passed with warnings: 1 warning: | * {warning}"
    ]


def test_an_invalid_agent_config_is_reported(tmp_path: Path) -> None:
    _fake_nomad(tmp_path, fmt_exit=0, validate_exit=0, config_exit=1)
    findings, _ = speclint.nomad_checks([], nomad=str(tmp_path / "nomad"), agent_config=hcl.AGENT_CONFIG)
    agent = hcl.display_path(hcl.AGENT_CONFIG)
    assert [str(f) for f in findings] == [
        f"{agent}: nomad-validate: nomad config validate exited 1: Configuration is valid!"
    ]

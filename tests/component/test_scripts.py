"""Every script under scripts/ runs as the README writes it: started by the SYSTEM interpreter (not a
virtualenv, as `python3 scripts/x` or the `#!/usr/bin/env python3` shebang start it) or by bash, `--help`
prints its usage; where it needs the repository's .venv it re-executes itself on it, and without .venv it
stops with one line saying to run ./scripts/setup first (no traceback)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra import ROOT

SCRIPTS = ROOT / "scripts"
#: The interpreter this test's virtualenv was made from: not a virtualenv itself.
SYSTEM_PYTHON = getattr(sys, "_base_executable", "") or "/usr/bin/python3"

#: script -> how it starts, and whether it needs .venv (then, without one, it says so in one line)
TABLE = {
    "bench-bake": ("python", True),
    "bench-noop": ("python", True),
    "bench-nomad-wait": ("python", True),
    "bench-vm": ("python", True),
    "build-test-image": ("python", False),  # standard library only
    "recording-to-replay": ("python", True),
    "test": ("python", False),  # standard library; runs .venv/bin/nox, or says to run setup
    "lock": ("bash", False),  # makes a throwaway virtualenv of its own
    "setup": ("bash", False),  # makes .venv
}


def command(script: Path, kind: str) -> list[str]:
    return [SYSTEM_PYTHON if kind == "python" else "bash", str(script)]


def test_the_table_names_every_script() -> None:
    on_disk = {p.name for p in SCRIPTS.iterdir() if p.is_file() and not p.name.endswith(".py")}
    assert on_disk == set(TABLE)
    for name, (kind, _) in TABLE.items():
        first = (SCRIPTS / name).read_text().splitlines()[0]
        assert first == ("#!/usr/bin/env python3" if kind == "python" else "#!/usr/bin/env bash"), name


def test_the_interpreter_is_not_a_virtualenv() -> None:
    prefixes = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.prefix == sys.base_prefix)"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert prefixes.stdout.strip() == "True", SYSTEM_PYTHON


@pytest.mark.parametrize("name", sorted(TABLE))
def test_help_with_the_system_interpreter(name: str) -> None:
    kind, _ = TABLE[name]
    result = subprocess.run(
        [*command(SCRIPTS / name, kind), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Traceback" not in out and "Error" not in out, out
    if kind == "python":
        assert result.stdout.startswith(f"usage: {'scripts/' if name == 'recording-to-replay' else ''}"), out
    else:
        assert result.stdout.strip(), out


@pytest.mark.parametrize("name", sorted(TABLE))
def test_without_venv_one_line_says_to_run_setup(name: str, tmp_path: Path) -> None:
    """A copy of scripts/ in a directory with no .venv: what needs it says so, what does not still works."""
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    kind, needs_venv = TABLE[name]
    args = ["--help"] if name != "test" else []  # the test command itself: it looks for .venv's nox
    result = subprocess.run(
        [*command(tmp_path / "scripts" / name, kind), *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    if name == "test":
        assert result.returncode == 2, result.stderr
        assert result.stderr == (
            f"test: {tmp_path}/.venv/bin/nox not found: run ./scripts/setup --system --dev first\n"
        )
    elif needs_venv:
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert result.stderr == f"{name}: {tmp_path}/.venv not found: run ./scripts/setup first\n"
    else:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / ".venv").exists()

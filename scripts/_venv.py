"""The first thing the Python scripts of scripts/ do: make sure they run on the repository's .venv.

`python3 scripts/bench-nomad-wait` (or `scripts/bench-bake`, whose shebang is `/usr/bin/env python3`) starts
the system interpreter, which has none of the pinned dependencies and no `inv` beside it. Started by an
interpreter that is not a virtualenv, a script re-executes itself with .venv/bin/python; without .venv it
stops with one line saying to run ./scripts/setup first (exit 2). A virtualenv already active (.venv
itself, a nox session's) is kept. Standard library only: it runs before any dependency is importable.

Importing it does this (`import _venv` before any third-party import; Python puts the script's directory
first on sys.path, so the import finds this file).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure(script: str) -> None:
    """Run `script` (this process's) on .venv's python, or stop with one line."""
    if sys.prefix != sys.base_prefix:  # a virtualenv: .venv, or one the caller chose
        return
    python = ROOT / ".venv" / "bin" / "python"
    if not python.is_file():
        name = Path(script).name
        sys.stderr.write(f"{name}: {ROOT / '.venv'} not found: run ./scripts/setup first\n")
        raise SystemExit(2)
    os.execv(python, [str(python), script, *sys.argv[1:]])  # noqa: S606 - the same script, on .venv's python


ensure(str(getattr(sys.modules["__main__"], "__file__", None) or sys.argv[0]))

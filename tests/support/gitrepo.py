"""A real git repository shaped like this one (app/ with a Dockerfile, something outside it), for the tests
of the app image's tag and context (infra/compose/appimage.py) and of `release.ship`."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


def make_repo(root: Path) -> Path:
    """A real git repository shaped like ours at `root`: app/ (Dockerfile, code) and something outside it."""
    (root / "app").mkdir(parents=True)
    (root / "infra").mkdir()
    (root / "app" / "Dockerfile").write_text("FROM scratch\nCOPY events_service.py /\n")
    (root / "app" / "events_service.py").write_text("print('v1')\n")
    (root / "app" / "run.sh").write_text("#!/bin/sh\nexec python3 events_service.py\n")
    (root / "app" / "run.sh").chmod(0o755)
    (root / "infra" / "other.py").write_text("x = 1\n")
    (root / ".gitignore").write_text("*.log\n__pycache__/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.invalid")
    git(root, "config", "user.name", "test")
    commit_all(root, "first")
    return root


def app_commit(repo: Path) -> str:
    return git(repo, "log", "-1", "--format=%H", "--", "app").strip()

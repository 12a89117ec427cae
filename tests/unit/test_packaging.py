"""pyproject.toml's package list is the tree: a package missing from it (or a name that is no directory)
breaks `pip install -e .` on a fresh clone, which the checkouts made before the change never notice."""

from __future__ import annotations

import tomllib

from infra import ROOT


def test_every_infra_package_is_listed_and_every_listed_one_exists() -> None:
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = sorted(
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "infra").rglob("__init__.py")
        if "__pycache__" not in init.parts
    )
    assert sorted(listed) == found

"""Reading the project's YAML data files (invoke.yaml, vm/images.yaml, cloud-init/parts/*.yaml).

One loader, so every malformed file is reported the same way: file:line:column and what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from infra.errors import TemplateError


def load_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error names file:line:column, nothing else is returned."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise TemplateError(
            f"{where}: malformed YAML: {exc.problem}" + (f" ({exc.context})" if exc.context else ""),
            hint="fix the file; nothing was written",
        ) from exc

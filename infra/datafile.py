"""Reading the project's YAML data files (invoke.yaml, vm/images.yaml, cloud-init/parts/*.yaml).

One loader, so every malformed file is reported the same way: file:line:column and what is wrong.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from infra import files
from infra.errors import InfraError, TemplateError

#: What each file parsed to in this process, by (path, mtime, size): invoke and the configuration layer read
#: invoke.yaml several times per command, and PyYAML's pure-Python parser is slow. Callers get copies.
_parsed: dict[tuple[str, int, int], Any] = {}


def load_yaml(path: Path, *, error: type[InfraError] = TemplateError) -> Any:
    """Parse a YAML file (read bounded, UTF-8 text only); a syntax error names file:line:column."""
    try:
        st = path.stat()
        key: tuple[str, int, int] | None = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None  # read_text names the problem
    if key in _parsed:
        return copy.deepcopy(_parsed[key])
    data = _parse(path, error)
    if key is not None:
        _parsed[key] = copy.deepcopy(data)
    return data


def _parse(path: Path, error: type[InfraError]) -> Any:
    text = files.read_text(path, "YAML file", error=error)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise error(
            f"{where}: malformed YAML: {exc.problem}" + (f" ({exc.context})" if exc.context else ""),
            hint="fix the file; nothing was written",
        ) from None
    except RecursionError:
        raise error(f"{path}: malformed YAML: nested too deeply") from None
    except yaml.YAMLError as exc:  # e.g. a reader error on a control character, without a mark
        raise error(f"{path}: malformed YAML: {' '.join(str(exc).split())}") from None

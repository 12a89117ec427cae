"""Reading the project's YAML data files (invoke.yaml, vm/images.yaml, cloud-init/parts/*.yaml).

One loader, so every malformed file is reported the same way: file:line:column and what is wrong.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from infra.core import files
from infra.core.errors import InfraError, TemplateError

#: At most this many nodes in a document once its aliases are expanded. PyYAML shares an aliased node, but
#: whatever walks or copies the result (invoke merges and deep-copies configuration) expands it: a 472-byte
#: "billion laughs" of nested aliases grew to 4.1 GB. Every data file here is a few hundred nodes.
MAX_NODES = 100_000


class _AliasBombError(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand beyond MAX_NODES (or refer to themselves),
    counted on the composed node graph before anything is constructed."""

    def compose_document(self) -> yaml.Node | None:
        node: yaml.Node | None = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """Nodes under `node` with every alias expanded (a shared node counts at each use), without expanding."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise _AliasBombError("an alias refers to a node that contains it (a recursive structure)")
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, open_) + _expanded_size(v, memo, open_) for k, v in node.value)
    open_.discard(key)
    if size > MAX_NODES:
        raise _AliasBombError(f"its aliases expand to more than {MAX_NODES} nodes")
    memo[key] = size
    return size


#: What each file parsed to in this process, by (path, mtime, size): invoke and the configuration layer read
#: invoke.yaml several times per command, and PyYAML's pure-Python parser is slow. Callers get copies.
_parsed: dict[tuple[str, int, int], Any] = {}


def load_yaml(path: Path, *, error: type[InfraError] = TemplateError) -> Any:
    """Parse a YAML file (read bounded, UTF-8 text only, aliases bounded); a syntax error names
    file:line:column."""
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
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a yaml.SafeLoader
    except _AliasBombError as exc:
        raise error(f"{path}: refused YAML: {exc}", hint="expand the aliases by hand") from None
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

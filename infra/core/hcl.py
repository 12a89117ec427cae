"""The project's HCL reader (python-hcl2): the Nomad job specs (nomad/*.nomad.hcl) and the agent config
cloud-init ships (cloud-init/files/nomad/zz-infra-lab.hcl) as a block tree with line numbers.

Read by the seed (the agent config's host volumes), the bake cache (a spec's images) and the job-spec rules
(infra/nomad/speclint.py, which adds the rules and the CLI).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
from hcl2.rules.base import AttributeRule, BlockRule
from hcl2.utils import SerializationOptions
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from infra import ROOT
from infra.core.errors import TemplateError

#: The agent config shipped by cloud-init: the host volumes jobs may mount.
AGENT_CONFIG = ROOT / "cloud-init" / "files" / "nomad" / "zz-infra-lab.hcl"

_VAR_REF = re.compile(r"\$\{\s*var\.([A-Za-z_][A-Za-z0-9_-]*)\s*\}")
_INTERPOLATION = re.compile(r"\$\{[^}]*\}")
_OPTIONS = SerializationOptions(with_comments=False, strip_string_quotes=True, explicit_blocks=False)
#: Lark terminal names in syntax errors, as a reader of the spec sees them.
_TERMINALS = {
    "DBLQUOTE": '"',
    "LBRACE": "{",
    "RBRACE": "}",
    "LSQB": "[",
    "RSQB": "]",
    "LPAR": "(",
    "RPAR": ")",
    "EQ": "=",
    "COMMA": ",",
    "NAME": "a name",
    "INT_LITERAL": "a number",
    "FLOAT_LITERAL": "a number",
    "HEREDOC_TEMPLATE": "<<EOT",
    "HEREDOC_TEMPLATE_TRIM": "<<-EOT",
    "NL_OR_COMMENT": "a new line",
    "TEMPLATE_STRING": "a string",
    "MINUS": "-",
    "NOT": "!",
    "TRUE": "true",
    "FALSE": "false",
    "NULL": "null",
}


@dataclass
class Attr:
    value: Any
    line: int | None


@dataclass
class Block:
    """An HCL block with its line: python-hcl2's dict output has no positions, its rule tree has."""

    type: str
    labels: list[str]
    line: int | None
    attrs: dict[str, Attr] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.labels[0] if self.labels else ""

    def children(self, block_type: str) -> list[Block]:
        return [b for b in self.blocks if b.type == block_type]

    def child(self, block_type: str) -> Block | None:
        found = self.children(block_type)
        return found[0] if found else None

    def get(self, name: str, default: Any = None) -> Any:
        attr = self.attrs.get(name)
        return attr.value if attr is not None else default

    def line_of(self, name: str) -> int | None:
        attr = self.attrs.get(name)
        return attr.line if attr is not None and attr.line else self.line


class SpecSyntaxError(Exception):
    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _line(node: Any) -> int | None:
    meta = getattr(node, "_meta", None)
    if meta is None or getattr(meta, "empty", True):
        return None
    line = getattr(meta, "line", None)
    return line if isinstance(line, int) else None


def _build(body: Any, block_type: str, labels: list[str], line: int | None) -> Block:
    block = Block(block_type, labels, line)
    for child in body.children:
        if isinstance(child, BlockRule):
            names = [str(label.serialize(_OPTIONS)) for label in child.labels]
            block.blocks.append(_build(child.body, names[0], names[1:], _line(child)))
        elif isinstance(child, AttributeRule):
            name = str(child.identifier.serialize(_OPTIONS))
            block.attrs[name] = Attr(child.expression.serialize(_OPTIONS), _line(child))
    return block


def parse(text: str) -> Block:
    """Parse HCL2 text into a Block tree; SpecSyntaxError carries the line of a syntax error."""
    try:
        tree = hcl2.parses(text)
    except UnexpectedInput as exc:
        raise SpecSyntaxError(exc.line if exc.line > 0 else None, _describe_syntax_error(exc)) from None
    return _build(tree.body, "", [], None)


def _describe_syntax_error(exc: UnexpectedInput) -> str:
    where = f"column {exc.column}" if exc.column and exc.column > 0 else "end of file"
    if isinstance(exc, UnexpectedToken):
        if exc.token.type == "$END":
            return "unexpected end of file (an unclosed block or string?)"
        expected = ", ".join(sorted({_TERMINALS.get(name, name.lower()) for name in exc.expected}))
        return f"unexpected {exc.token.value!r} at {where} (expected one of: {expected})"
    if isinstance(exc, UnexpectedCharacters):
        return f"unexpected character {exc.char!r} at {where}"
    if isinstance(exc, UnexpectedEOF):
        return "unexpected end of file (an unclosed block or string?)"
    return f"syntax error at {where}"


def agent_host_volume_paths(agent_config: Path = AGENT_CONFIG) -> dict[str, str]:
    """The host volumes the Nomad client declares, name -> path (client { host_volume "NAME" { path } })."""
    root = parse(agent_config.read_text(encoding="utf-8"))
    return {
        volume.name: str(volume.get("path", ""))
        for client in root.children("client")
        for volume in client.children("host_volume")
    }


def resolve(variables: Mapping[str, Block], value: Any) -> tuple[Any, str, str]:
    """Replace ${var.NAME} with the defaults of `variables` (a spec's `variable` blocks by name): (value,
    where it came from, problem or "")."""
    if not isinstance(value, str):
        return value, "", "is not a string"
    names = _VAR_REF.findall(value)
    for name in names:
        variable = variables.get(name)
        if variable is None:
            return value, "", f'refers to variable "{name}", which this file does not declare'
        if "default" not in variable.attrs:
            return value, "", f'comes from variable "{name}", which has no default to check'
    whole = _VAR_REF.fullmatch(value.strip())
    if whole:
        resolved: Any = variables[whole.group(1)].get("default")
    else:
        resolved = _VAR_REF.sub(lambda m: str(variables[m.group(1)].get("default")), value)
    if isinstance(resolved, str) and _INTERPOLATION.search(resolved):
        return value, "", "has an interpolation that cannot be resolved before run time"
    origin = ", ".join(
        f'default of variable "{name}", line {variables[name].line_of("default")}'
        for name in dict.fromkeys(names)
    )
    return resolved, origin, ""


def spec_images(path: Path) -> list[str]:
    """Every task image of one spec, `${var.NAME}` resolved to the variable's default (what a fresh deploy
    runs). Raises TemplateError naming file:line when the file does not parse or an image cannot be resolved."""
    where_file = display_path(path)
    try:
        root = parse(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TemplateError(f"{where_file}: cannot read: {exc.strerror or exc}") from exc
    except SpecSyntaxError as exc:
        raise TemplateError(f"{where_file}:{exc.line or '?'}: {exc.message}") from exc
    variables = {v.name: v for v in root.children("variable")}
    found: list[str] = []
    for job in root.children("job"):
        for group in job.children("group"):
            for task in group.children("task"):
                config = task.child("config")
                if config is None or "image" not in config.attrs:
                    continue
                value, _origin, problem = resolve(variables, config.get("image"))
                if problem:
                    where = (
                        f"{where_file}:{config.line_of('image') or '?'}: {job.name}/{group.name}/{task.name}"
                    )
                    raise TemplateError(f"{where}: image {show(config.get('image'))} {problem}")
                found.append(str(value))
    return found


def show(value: Any) -> str:
    """A value as a finding quotes it."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def display_path(path: Path) -> str:
    """Paths relative to the working directory (else to the repo root) read best in CI logs."""
    resolved = path.resolve()
    for base in (Path.cwd(), ROOT):
        try:
            return str(resolved.relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)

"""Project rules for the Nomad job specs (nomad/*.nomad.hcl), checked on every `nox -s lint`.

Each spec is parsed with python-hcl2 and checked against named rules; every finding reads

    <file>:<line>: <job>/<group>/<task>: <rule>: <message>

so an editor or CI log jumps straight to it. When a `nomad` binary is on PATH, `nomad fmt -check` and
`nomad job validate` run as well; otherwise one line says they were skipped (never silently).

CLI: `python -m infra.speclint [FILE ...]` (default: every nomad/*.nomad.hcl); exit 1 on findings.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
from hcl2.rules.base import AttributeRule, BlockRule
from hcl2.utils import SerializationOptions
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from infra import ROOT
from infra.errors import SpecError

#: The agent config shipped by cloud-init: the host volumes jobs may mount.
AGENT_CONFIG = ROOT / "cloud-init" / "files" / "nomad" / "10-project.hcl"
SPEC_DIR = ROOT / "nomad"
SPEC_GLOB = "*.nomad.hcl"

#: Every rule, with what it protects. The names appear in findings and tests.
RULES: dict[str, str] = {
    "hcl-syntax": "the file parses as HCL2",
    "variable-description": "every `variable` block says what it is for",
    "image-pinned": "images carry a tag that is not `latest` and a sha256 digest (locally built images: the tag)",
    "service-check": "every service has at least one check",
    "service-provider": 'every service sets provider = "nomad" (the default, consul, does not run here)',
    "port-declared": "every port a service, check or task config names is declared in the group's network",
    "volume-declared": "every volume_mount names a volume the group declares",
    "host-volume-exists": "every host volume's source is a host_volume in the agent config",
    "resources-set": "every task sets resources.cpu and resources.memory",
    "update-auto-revert": "service jobs set update.auto_revert = true (job or group level)",
    "nomad-fmt": "`nomad fmt -check` accepts the file",
    "nomad-validate": "`nomad job validate` accepts the file",
}

NOMAD_SKIPPED = "skipped: nomad not found on PATH (nomad fmt/validate)"

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_VAR_REF = re.compile(r"\$\{\s*var\.([A-Za-z_][A-Za-z0-9_-]*)\s*\}")
_INTERPOLATION = re.compile(r"\$\{[^}]*\}")
_OPTIONS = SerializationOptions(with_comments=False, strip_string_quotes=True, explicit_blocks=False)
_NOMAD_TIMEOUT = 120
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


@dataclass(frozen=True)
class Finding:
    """One broken rule, printed as `file:line: where: rule: message`."""

    file: str
    line: int | None
    where: str
    rule: str
    message: str

    def __str__(self) -> str:
        location = f"{self.file}:{self.line}" if self.line else self.file
        parts = [location, self.where, self.rule, self.message]
        return ": ".join(part for part in parts if part)


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


# ------------------------------------------------------------------------------------------ agent config --
def agent_host_volumes(agent_config: Path = AGENT_CONFIG) -> set[str]:
    """Names of the host volumes the Nomad client declares (client { host_volume "NAME" { ... } })."""
    root = parse(agent_config.read_text(encoding="utf-8"))
    return {volume.name for client in root.children("client") for volume in client.children("host_volume")}


# ----------------------------------------------------------------------------------------------- checks --
class _Spec:
    """The rules applied to one parsed spec file."""

    def __init__(
        self, display: str, root: Block, host_volumes: set[str], local_images: set[str], agent: str
    ) -> None:
        self.display = display
        self.root = root
        self.host_volumes = host_volumes
        self.agent = agent
        self.local_images = local_images
        self.variables = {v.name: v for v in root.children("variable")}
        self.findings: list[Finding] = []

    def report(self, line: int | None, where: str, rule: str, message: str) -> None:
        self.findings.append(Finding(self.display, line, where, rule, message))

    def run(self) -> list[Finding]:
        for variable in self.variables.values():
            if not variable.get("description"):
                self.report(
                    variable.line,
                    f"variable {variable.name}",
                    "variable-description",
                    f'variable "{variable.name}" has no description',
                )
        for job in self.root.children("job"):
            self.check_job(job)
        return self.findings

    def check_job(self, job: Block) -> None:
        job_type = job.get("type", "service")
        for group in job.children("group"):
            where = f"{job.name}/{group.name}"
            if job_type == "service":
                self.check_auto_revert(job, group, where)
            self.check_group(group, where)

    def check_auto_revert(self, job: Block, group: Block, where: str) -> None:
        # A group's update block overrides the job's field by field.
        for update in (group.child("update"), job.child("update")):
            if update is not None and "auto_revert" in update.attrs:
                if update.get("auto_revert") is not True:
                    self.report(
                        update.line_of("auto_revert"),
                        where,
                        "update-auto-revert",
                        f"update.auto_revert = {_show(update.get('auto_revert'))}; a service job must set "
                        "auto_revert = true so a failed deployment goes back to the last good version",
                    )
                return
        self.report(
            group.line,
            where,
            "update-auto-revert",
            "no update block with auto_revert = true (job or group level); a failed deployment would "
            "stay on the broken version",
        )

    def check_group(self, group: Block, where: str) -> None:
        ports = {port.name for network in group.children("network") for port in network.children("port")}
        volumes: dict[str, Block] = {volume.name: volume for volume in group.children("volume")}

        for volume in volumes.values():
            self.check_host_volume(volume, where)
        for service in group.children("service"):
            self.check_service(service, where, ports)

        for task in group.children("task"):
            task_where = f"{where}/{task.name}"
            for service in task.children("service"):
                self.check_service(service, task_where, ports)
            self.check_resources(task, task_where)
            self.check_volume_mounts(task, task_where, volumes)
            config = task.child("config")
            if config is None:
                continue
            if "image" in config.attrs:
                self.check_image(config, task_where)
            for port in _as_list(config.get("ports")):
                if str(port) not in ports:
                    self.report(
                        config.line_of("ports"),
                        task_where,
                        "port-declared",
                        f'config.ports names port "{port}", which the group\'s network does not declare '
                        f"(declared: {_names(ports)})",
                    )

    def check_host_volume(self, volume: Block, where: str) -> None:
        if volume.get("type", "host") != "host":
            return
        source = volume.get("source")
        if source not in self.host_volumes:
            self.report(
                volume.line_of("source"),
                where,
                "host-volume-exists",
                f'host volume "{volume.name}" has source {_show(source)}, which the agent config {self.agent} does '
                f"not declare as a host_volume (declared: {_names(self.host_volumes)})",
            )

    def check_service(self, service: Block, where: str, ports: set[str]) -> None:
        name = service.get("name") or "(unnamed)"
        if service.get("provider") != "nomad":
            provider = service.get("provider")
            detail = f"has provider = {_show(provider)}" if provider is not None else "does not set provider"
            self.report(
                service.line_of("provider"),
                where,
                "service-provider",
                f'service "{name}" {detail}; set provider = "nomad" (the default, consul, does not run here)',
            )
        checks = service.children("check")
        if not checks:
            self.report(
                service.line,
                where,
                "service-check",
                f'service "{name}" has no check block; Nomad would call it healthy as soon as it is registered',
            )
        self.check_port_label(service.get("port"), service.line_of("port"), where, f'service "{name}"', ports)
        for check in checks:
            label = f'check "{check.get("name") or check.get("type") or "(unnamed)"}" of service "{name}"'
            self.check_port_label(check.get("port"), check.line_of("port"), where, label, ports)

    def check_port_label(self, port: Any, line: int | None, where: str, owner: str, ports: set[str]) -> None:
        # A number is a literal port (address_mode = "driver"/"alloc"); only labels must be declared.
        if port is None or isinstance(port, int) or str(port).isdigit():
            return
        if str(port) not in ports:
            self.report(
                line,
                where,
                "port-declared",
                f'{owner} uses port "{port}", which the group\'s network does not declare '
                f"(declared: {_names(ports)})",
            )

    def check_resources(self, task: Block, where: str) -> None:
        resources = task.child("resources")
        if resources is None:
            self.report(
                task.line,
                where,
                "resources-set",
                "task has no resources block; Nomad's defaults (100 MHz CPU, 300 MB memory) OOM-kill "
                "anything JVM-sized",
            )
            return
        missing = [name for name in ("cpu", "memory") if name not in resources.attrs]
        if "cpu" in missing and "cores" in resources.attrs:
            missing.remove("cpu")
        if missing:
            self.report(
                resources.line,
                where,
                "resources-set",
                f"resources sets no {' and no '.join(missing)}; set cpu and memory explicitly",
            )

    def check_volume_mounts(self, task: Block, where: str, volumes: dict[str, Block]) -> None:
        for mount in task.children("volume_mount"):
            name = mount.get("volume")
            if name not in volumes:
                self.report(
                    mount.line_of("volume"),
                    where,
                    "volume-declared",
                    f"volume_mount names volume {_show(name)}, which the group does not declare "
                    f"(declared: {_names(volumes)})",
                )

    def check_image(self, config: Block, where: str) -> None:
        raw = config.get("image")
        line = config.line_of("image")
        resolved, origin, problem = self.resolve(raw)
        if problem:
            self.report(line, where, "image-pinned", f"image {_show(raw)}: {problem}")
            return
        shown = f"image {_show(resolved)}" + (f" ({origin})" if origin else "")
        for message in image_problems(str(resolved), self.local_images):
            self.report(line, where, "image-pinned", f"{shown} {message}")

    def resolve(self, value: Any) -> tuple[Any, str, str]:
        """Replace ${var.NAME} with variable defaults: (value, where it came from, problem or "")."""
        if not isinstance(value, str):
            return value, "", "is not a string"
        names = _VAR_REF.findall(value)
        for name in names:
            variable = self.variables.get(name)
            if variable is None:
                return value, "", f'refers to variable "{name}", which this file does not declare'
            if "default" not in variable.attrs:
                return value, "", f'comes from variable "{name}", which has no default to check'
        whole = _VAR_REF.fullmatch(value.strip())
        if whole:
            resolved: Any = self.variables[whole.group(1)].get("default")
        else:
            resolved = _VAR_REF.sub(lambda m: str(self.variables[m.group(1)].get("default")), value)
        if isinstance(resolved, str) and _INTERPOLATION.search(resolved):
            return value, "", "has an interpolation that cannot be resolved before run time"
        origin = ", ".join(
            f'default of variable "{name}", line {self.variables[name].line_of("default")}'
            for name in dict.fromkeys(names)
        )
        return resolved, origin, ""


def image_problems(image: str, local_images: Iterable[str] = ()) -> list[str]:
    """What keeps `image` from being pinned ([] when it is). Local images need a tag, not a digest."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    repository, _, tag = name.rpartition(":") if ":" in last else (name, "", "")
    problems = []
    if not tag:
        problems.append("has no tag; pin it as name:tag@sha256:<digest>")
    elif tag == "latest":
        problems.append('uses the moving tag "latest"; pin a version tag and its digest')
    if repository in set(local_images):
        return problems
    if not digest:
        problems.append(f"has no digest; pin it as {name}@sha256:<digest> (a tag can be re-pushed)")
    elif not _DIGEST.match(digest):
        problems.append(f'has a malformed digest "{digest}"; expected sha256:<64 hex digits>')
    return problems


def spec_images(path: Path) -> list[str]:
    """Every task image of one spec, `${var.NAME}` resolved to the variable's default (what a fresh deploy
    runs). Raises SpecError naming file:line when the file does not parse or an image cannot be resolved."""
    display = _display(path)
    try:
        root = parse(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{display}: cannot read: {exc.strerror or exc}") from exc
    except SpecSyntaxError as exc:
        raise SpecError(f"{display}:{exc.line or '?'}: {exc.message}") from exc
    spec = _Spec(display, root, set(), set(), "")
    found: list[str] = []
    for job in root.children("job"):
        for group in job.children("group"):
            for task in group.children("task"):
                config = task.child("config")
                if config is None or "image" not in config.attrs:
                    continue
                value, _origin, problem = spec.resolve(config.get("image"))
                if problem:
                    where = f"{display}:{config.line_of('image') or '?'}: {job.name}/{group.name}/{task.name}"
                    raise SpecError(f"{where}: image {_show(config.get('image'))} {problem}")
                found.append(str(value))
    return found


def default_local_images() -> set[str]:
    """Repositories the project builds itself (no registry digest exists for them): app.image."""
    from infra import config

    return {config.load().app.image}


def check_file(
    path: Path,
    *,
    host_volumes: set[str] | None = None,
    local_images: Iterable[str] | None = None,
    agent_config: Path = AGENT_CONFIG,
) -> list[Finding]:
    """All rule findings for one spec file (parse errors included)."""
    display = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return [Finding(display, None, "", "hcl-syntax", f"cannot read: {exc.strerror or exc}")]
    try:
        root = parse(text)
    except SpecSyntaxError as exc:
        return [Finding(display, exc.line, "", "hcl-syntax", exc.message)]
    if not root.children("job"):
        return [Finding(display, None, "", "hcl-syntax", "no job block")]
    volumes = agent_host_volumes(agent_config) if host_volumes is None else host_volumes
    images = default_local_images() if local_images is None else set(local_images)
    return _Spec(display, root, volumes, images, _display(agent_config)).run()


def check_files(
    paths: Sequence[Path],
    *,
    agent_config: Path = AGENT_CONFIG,
    local_images: Iterable[str] | None = None,
) -> list[Finding]:
    try:
        host_volumes = agent_host_volumes(agent_config)
    except SpecSyntaxError as exc:
        return [Finding(_display(agent_config), exc.line, "", "hcl-syntax", exc.message)]
    images = default_local_images() if local_images is None else set(local_images)
    findings: list[Finding] = []
    for path in paths:
        per_file = check_file(path, host_volumes=host_volumes, local_images=images, agent_config=agent_config)
        findings.extend(sorted(per_file, key=lambda f: f.line or 0))
    return findings


# ---------------------------------------------------------------------------------------- nomad binary --
def nomad_checks(paths: Sequence[Path], nomad: str | None = None) -> tuple[list[Finding], list[str]]:
    """`nomad fmt -check` and `nomad job validate` per file: (findings, notes). No binary: one note."""
    binary = nomad or shutil.which("nomad")
    if binary is None:
        return [], [NOMAD_SKIPPED]
    findings: list[Finding] = []
    notes: list[str] = []
    for path in paths:
        display = _display(path)
        for rule, command in (("nomad-fmt", ["fmt", "-check"]), ("nomad-validate", ["job", "validate"])):
            shown = "nomad " + " ".join(command)
            try:
                done = subprocess.run(
                    [binary, *command, str(path)],
                    capture_output=True,
                    text=True,
                    timeout=_NOMAD_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                findings.append(
                    Finding(display, None, "", rule, f"{shown} timed out after {_NOMAD_TIMEOUT}s")
                )
                continue
            if done.returncode != 0:
                message = f"{shown} exited {done.returncode}"
                if rule == "nomad-fmt":
                    message += f" (reformat with: nomad fmt {display})"
                output = _tail(done.stdout + done.stderr)
                findings.append(Finding(display, None, "", rule, message + (f": {output}" if output else "")))
        notes.append(f"ok: nomad fmt -check and nomad job validate ran on {display}")
    return findings, notes


# ----------------------------------------------------------------------------------------------- helpers --
def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _tail(output: str, lines: int = 6) -> str:
    kept = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _display(path: Path) -> str:
    """Paths relative to the working directory (else to the repo root) read best in CI logs."""
    resolved = path.resolve()
    for base in (Path.cwd(), ROOT):
        try:
            return str(resolved.relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)


def default_specs() -> list[Path]:
    return sorted(SPEC_DIR.glob(SPEC_GLOB))


def _iter_paths(args: Sequence[str]) -> Iterator[Path]:
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            yield from sorted(path.glob(SPEC_GLOB))
        else:
            yield path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.speclint",
        description="Check Nomad job specs against the project rules: " + ", ".join(RULES) + ".",
    )
    parser.add_argument("files", nargs="*", help=f"spec files or directories (default: nomad/{SPEC_GLOB})")
    parser.add_argument(
        "--agent-config", type=Path, default=AGENT_CONFIG, help="Nomad agent config (host volumes)"
    )
    parser.add_argument(
        "--local-image",
        action="append",
        default=None,
        metavar="REPO",
        help="a repository built locally (tag required, no digest); default: app.image from invoke.yaml",
    )
    parser.add_argument("--no-nomad", action="store_true", help="do not run nomad fmt/validate even if found")
    args = parser.parse_args(argv)

    paths = list(_iter_paths(args.files)) if args.files else default_specs()
    if not paths:
        print(f"speclint: no {SPEC_GLOB} files found", file=sys.stderr)
        return 2
    missing = [p for p in paths if not p.is_file()]
    if missing:
        for path in missing:
            print(f"{path}: no such file", file=sys.stderr)
        return 2

    findings = check_files(paths, agent_config=args.agent_config, local_images=args.local_image)
    if args.no_nomad:
        notes = ["skipped: nomad fmt/validate (--no-nomad)"]
    else:
        nomad_findings, notes = nomad_checks(paths)
        findings += nomad_findings

    for finding in findings:
        print(finding)
    for note in notes:
        print(note, file=sys.stderr)
    files = ", ".join(_display(p) for p in paths)
    if findings:
        print(f"speclint: {len(findings)} problem(s) in {files}", file=sys.stderr)
        return 1
    print(f"speclint: ok ({len(paths)} spec(s): {files}; {len(RULES) - 2} rules)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

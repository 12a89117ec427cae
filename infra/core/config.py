"""Configuration: invoke.yaml declares every key once; this module turns it into typed objects.

Nothing else in the package reads raw configuration. Two entry points:
- `from_invoke(ctx.config)` in tasks (invoke has merged invoke.yaml, -f files, ~/.invoke.yaml, INVOKE_* env);
- `load(overrides)` for library code and tests (invoke.yaml + a nested dict of overrides).
Both validate: an undeclared key is an error naming it (with a close match), a value of the wrong type is
an error naming its dotted path.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import ItemsView, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from infra import ROOT
from infra.core import files
from infra.core.datafile import load_yaml
from infra.core.errors import ConfigError, TemplateError

DEFAULTS_FILE = ROOT / "invoke.yaml"

#: Keys invoke and fabric put into every config; they are not ours to validate.
_FOREIGN_TOP_LEVEL = frozenset(
    {
        "run", "runners", "sudo", "tasks", "timeouts",
        "authentication", "connect_kwargs", "forward_agent", "gateway", "inline_ssh_env",
        "load_ssh_configs", "port", "ssh_config_path", "user",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Port:
    host: int
    guest: int


@dataclass(frozen=True)
class ProjectConfig:
    name: str
    state_dir: Path
    cache_dir: Path


@dataclass(frozen=True)
class SSHConfig:
    user: str
    public_key: str
    private_key: str


@dataclass(frozen=True)
class ProvisionConfig:
    hostname: str
    docker: bool
    nomad: bool
    nomad_version: str
    packages: list[str]
    registry_mirror: str


@dataclass(frozen=True)
class VMConfig:
    distro: str
    arch: str
    image: str
    image_sha256: str
    cpus: int
    memory_mb: int
    disk_gb: int
    accel: str
    cpu: str
    qemu: str
    kernel: str
    initrd: str
    append: str
    ports: dict[str, Port]
    ssh_timeout: int
    cloud_init_timeout: int
    stop_timeout: int
    baked: str
    offline: bool
    lock_timeout: int
    nodes: int


@dataclass(frozen=True)
class NodeConfig:
    """One node of a local cluster (vm.nodes >= 3; infra/core/nodes.py derives it): its name, its address on the
    private network, the Nomad servers' addresses, the switch it is plugged into and its NIC's MAC."""

    name: str
    index: int  # 1-based
    address: str  # on the cluster network, without the prefix length
    prefix: int
    servers: tuple[str, ...]  # the cluster addresses of the Nomad servers (the first three nodes)
    switch: Path  # the vde_switch's socket directory
    mac: str  # the cluster NIC's
    primary_mac: str  # the user-mode NIC's (internet, 127.0.0.1 forwards)


@dataclass(frozen=True)
class NomadConfig:
    addr: str
    token: str
    cacert: str
    client_cert: str
    client_key: str
    namespace: str
    region: str
    connect_timeout: float
    read_timeout: float
    retries: int
    wait_timeout: int


@dataclass(frozen=True)
class DeployConfig:
    data_job: Path
    app_job: Path
    ingress_job: Path
    timeout: int
    secrets_path: str


@dataclass(frozen=True)
class AcmeConfig:
    email: str
    domains: list[str]
    ca_server: str
    challenge: str

    @property
    def enabled(self) -> bool:
        """Let's Encrypt is on once domains are set; until then the project CA serves."""
        return bool(self.domains)


@dataclass(frozen=True)
class IngressConfig:
    redirect_https: bool
    acme: AcmeConfig


@dataclass(frozen=True)
class AppConfig:
    image: str
    default_image: str
    base_image: str
    build_network: str


@dataclass(frozen=True)
class E2EConfig:
    report_dir: Path


@dataclass(frozen=True)
class Config:
    root: Path
    project: ProjectConfig
    ssh: SSHConfig
    provision: ProvisionConfig
    vm: VMConfig
    nomad: NomadConfig
    deploy: DeployConfig
    app: AppConfig
    e2e: E2EConfig
    ingress: IngressConfig
    node: NodeConfig | None = None  # set on a node's own configuration in a cluster (infra/core/nodes.py)


_ENUMS = {
    "vm.accel": ("auto", "kvm", "hvf", "tcg"),
    "vm.arch": ("auto", "x86_64", "aarch64"),
    "vm.baked": ("auto", "off", "require"),
}

#: ingress.acme.challenge -> the Traefik certificate resolver defined for it in nomad/ingress.nomad.hcl's
#: arguments (speclint's acme-resolver rule checks they are defined there).
ACME_RESOLVERS = {"tlsalpn": "acme-tlsalpn", "http": "acme-http"}
ACME_CHALLENGES = tuple(ACME_RESOLVERS)


def read_defaults(path: Path = DEFAULTS_FILE) -> dict[str, Any]:
    """invoke.yaml as a dict; a YAML error names file:line:column."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: expected a mapping at the top level")
    return data


def read_layer(path: Path) -> dict[str, Any]:
    """One configuration file as invoke loads it (invoke.yaml, an `inv -f` file, ~/.invoke.yaml), checked
    before invoke merges it: readable UTF-8 YAML, a mapping, and every section where invoke.yaml has a
    section (invoke cannot merge `vm: null` or `vm: [..]` into the `vm` mapping and raises)."""
    data = load_yaml(path, error=ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of configuration keys at the top level, "
            f"got {_kind(data)}",
            hint="the file has the shape of invoke.yaml, e.g. `vm: {accel: tcg}`",
        )
    defaults = data if path.resolve() == DEFAULTS_FILE.resolve() else read_defaults()
    _check_shapes(data, defaults, "", path)
    return data


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _check_shapes(data: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str, path: Path) -> None:
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"config file {path}: key {key!r} under {prefix or 'the top level'} is not a name"
            )
        if key not in defaults:
            continue  # an unknown key is reported (with a suggestion) when the config is built
        if isinstance(defaults[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"config file {path}: configuration key {prefix}{key} must be a mapping, got {_kind(value)}",
                    hint=f"leave {prefix}{key} out to keep its defaults",
                )
            _check_shapes(value, defaults[key], f"{prefix}{key}.", path)
        elif isinstance(value, Mapping):
            raise ConfigError(
                f"config file {path}: configuration key {prefix}{key} must be {_kind(defaults[key])}, "
                "got a mapping"
            )


def load(overrides: Mapping[str, Any] | None = None, *, root: Path = ROOT) -> Config:
    """Defaults from invoke.yaml merged with `overrides` (same nested shape), validated."""
    defaults = read_defaults()
    return from_raw(_merge(defaults, dict(overrides or {})), root=root, defaults=defaults)


class InvokeConfig(Protocol):
    """What `from_invoke` reads of invoke's config (a DataProxy: a mapping only at run time)."""

    def items(self) -> ItemsView[str, Any]: ...


def from_invoke(cfg: InvokeConfig) -> Config:
    """Typed config from invoke's merged config (`ctx.config`)."""
    defaults = read_defaults()
    _check_bool_env(defaults, os.environ)
    raw = {k: _plain(v) for k, v in cfg.items()}
    return from_raw(raw, root=ROOT, defaults=defaults)


def _check_bool_env(defaults: Mapping[str, Any], environ: Mapping[str, str], prefix: str = "") -> None:
    """invoke turns any non-empty INVOKE_* value but "0" into True: refuse the "false" that would be true."""
    for key, default in defaults.items():
        name = f"{prefix}_{key}".upper() if prefix else key.upper()
        if isinstance(default, dict):
            _check_bool_env(default, environ, name)
        elif isinstance(default, bool):
            value = environ.get(f"INVOKE_{name}")
            if value is not None and value.strip().lower() in ("false", "no", "off", "n", "f"):
                raise ConfigError(
                    f"INVOKE_{name}={value!r} would mean true: invoke reads every non-empty value but 0 as true",
                    hint=f"use INVOKE_{name}=0 for false and INVOKE_{name}=1 for true",
                )


def from_raw(
    raw: Mapping[str, Any], *, root: Path = ROOT, defaults: Mapping[str, Any] | None = None
) -> Config:
    """Validate a merged config tree against the declared keys (invoke.yaml, read once by the caller)."""
    defaults = defaults if defaults is not None else read_defaults()
    _check_keys(raw, defaults, prefix="", top=True)
    data = {k: raw[k] for k in defaults}
    for section in defaults:
        _check_types(data[section], defaults[section], section)
    for key, allowed in _ENUMS.items():
        section, name = key.split(".")
        if data[section][name] not in allowed:
            raise ConfigError(
                f"configuration key {key} is {data[section][name]!r}; expected one of: {', '.join(allowed)}"
            )

    def rel(p: str) -> Path:
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else root / path

    project = data["project"]
    cache = project["cache_dir"] or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), project["name"]
    )
    vm = dict(data["vm"])
    vm["ports"] = {name: Port(**spec) for name, spec in vm["ports"].items()}
    _check_ports(vm["ports"])
    if not str(project["state_dir"]).strip():
        raise ConfigError(
            "configuration key project.state_dir is empty",
            hint="the state dir holds the VM's disk and private key: name a directory of its own, e.g. .state",
        )
    _check_values(data, state_dir=rel(project["state_dir"]))
    deploy = dict(data["deploy"])
    for key in ("data_job", "app_job", "ingress_job"):
        deploy[key] = rel(deploy[key])
    return Config(
        root=root,
        project=ProjectConfig(
            name=project["name"],
            state_dir=files.trusted_dir(rel(project["state_dir"]), "project.state_dir"),
            cache_dir=files.trusted_dir(rel(cache), "project.cache_dir"),
        ),
        ssh=SSHConfig(**data["ssh"]),
        provision=ProvisionConfig(**data["provision"]),
        vm=VMConfig(**vm),
        nomad=NomadConfig(**data["nomad"]),
        deploy=DeployConfig(**deploy),
        app=AppConfig(**data["app"]),
        e2e=E2EConfig(report_dir=rel(data["e2e"]["report_dir"])),
        ingress=_ingress(data["ingress"]),
    )


#: An e-mail address as ACME accepts it (one @, a dotted domain, no spaces or commas).
_EMAIL = re.compile(r"^[^@\s,]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+$")


def _ingress(raw: Mapping[str, Any]) -> IngressConfig:
    """ingress.*: the ACME settings checked here, each error naming its key."""
    acme = raw["acme"]
    domains = acme["domains"]
    for i, name in enumerate(domains):
        if not isinstance(name, str) or not _HOST_NAME.match(name) or "." not in name:
            raise ConfigError(
                f"configuration key ingress.acme.domains[{i}] is {name!r}: not a public DNS name",
                hint="a fully qualified name such as app.example.org (no wildcard: TLS-ALPN-01 and HTTP-01 "
                "cannot prove one; no IP address)",
            )
    email = acme["email"]
    if email and not _EMAIL.match(email):
        raise ConfigError(f"configuration key ingress.acme.email is {email!r}: not an e-mail address")
    if domains and not email:
        raise ConfigError(
            "configuration key ingress.acme.email is empty, but ingress.acme.domains is set",
            hint="the ACME account needs a contact address (Let's Encrypt mails about expiring certificates)",
        )
    server = acme["ca_server"]
    if not re.match(r"^https://[^/\s]+(/\S*)?$", server):
        raise ConfigError(
            f"configuration key ingress.acme.ca_server is {server!r}: not an https:// URL",
            hint="Let's Encrypt: https://acme-v02.api.letsencrypt.org/directory "
            "(staging: https://acme-staging-v02.api.letsencrypt.org/directory)",
        )
    if acme["challenge"] not in ACME_CHALLENGES:
        raise ConfigError(
            f"configuration key ingress.acme.challenge is {acme['challenge']!r}; expected one of: "
            + ", ".join(ACME_CHALLENGES)
        )
    return IngressConfig(
        redirect_https=raw["redirect_https"],
        acme=AcmeConfig(email=email, domains=list(domains), ca_server=server, challenge=acme["challenge"]),
    )


def _plain(value: Any) -> Any:
    """invoke's DataProxy objects -> plain dicts/lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_keys(raw: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str, top: bool = False) -> None:
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if top and key in _FOREIGN_TOP_LEVEL:
            continue
        if key not in defaults:
            if prefix == "vm.ports.":  # new forwards may be added by name
                continue
            close = difflib.get_close_matches(key, list(defaults), n=1)
            suggestion = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown configuration key {path}{suggestion}",
                hint=f"every key is declared in {DEFAULTS_FILE}; check your -f file, ~/.invoke.yaml and "
                "INVOKE_* environment variables",
            )
        if isinstance(defaults[key], dict) and isinstance(value, Mapping):
            _check_keys(value, defaults[key], f"{path}.")


def _check_types(value: Any, default: Any, path: str) -> None:
    if isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"configuration key {path} must be a mapping, got {type(value).__name__}")
        for key, sub in value.items():
            if key in default:
                _check_types(sub, default[key], f"{path}.{key}")
            else:  # an extra port forward: same shape as the first one
                _check_types(sub, next(iter(default.values())), f"{path}.{key}")
        for key in default:
            if key not in value:
                raise ConfigError(f"configuration key {path}.{key} is missing")
        return
    expected: type | tuple[type, ...]
    if isinstance(default, bool):
        expected = bool
    elif isinstance(default, int | float):
        expected = (int, float)
    elif isinstance(default, list):
        expected = list
    else:
        expected = str
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"configuration key {path} must be {_type_name(expected)}, got {value!r}")


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", list: "a list", str: "a string"}
    if isinstance(t, tuple):
        return names[t[0]]
    return names[t]


def _check_ports(ports: Mapping[str, Port]) -> None:
    seen: dict[int, str] = {}
    for name, port in ports.items():
        for side in ("host", "guest"):
            number = getattr(port, side)
            if not isinstance(number, int) or not 0 < number < 65536:
                raise ConfigError(
                    f"configuration key vm.ports.{name}.{side} must be a port 1-65535, got {number!r}"
                )
        if port.host in seen:
            raise ConfigError(
                f"configuration keys vm.ports.{name}.host and vm.ports.{seen[port.host]}.host "
                f"both use host port {port.host}"
            )
        seen[port.host] = name


#: Debian's adduser/useradd default NAME_REGEX: what cloud-init can create as the login user.
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
#: A Debian package (Policy 5.6.1: at least two of [a-z0-9+.-], starting with a letter or digit), optionally
#: pinned: `=` and a version (5.6.12: [epoch:]upstream[-revision], upstream starting with a digit, of
#: [A-Za-z0-9.+~-]; the revision of [A-Za-z0-9.+~]). Never an apt option ("-s", "-oAPT::...").
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(?:=(?:[0-9]+:)?[0-9][A-Za-z0-9.+~]*(?:-[A-Za-z0-9.+~]+)*)?")
#: A qemu CPU model with optional features (`max`, `qemu64`, `Nehalem-v2`, `max,-la57`): one argument of `-cpu`.
_CPU_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(?:,[+-]?[A-Za-z0-9_.-]+(?:=[A-Za-z0-9_.-]+)?)*")
#: RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")  # fmt: skip


def _check_values(data: Mapping[str, Any], *, state_dir: Path) -> None:
    """Ranges and formats the types alone do not catch; each error names its key."""
    minimum = {
        "vm.cpus": 1, "vm.memory_mb": 1, "vm.disk_gb": 1, "vm.ssh_timeout": 1, "vm.cloud_init_timeout": 1,
        "vm.stop_timeout": 0, "nomad.retries": 0, "nomad.wait_timeout": 1, "deploy.timeout": 1,
    }  # fmt: skip
    for key, low in minimum.items():
        section, name = key.split(".")
        value = data[section][name]
        if not isinstance(value, int) or value < low:
            what = "a whole number" if low == 0 else "a whole number >= 1"
            raise ConfigError(f"configuration key {key} must be {what}, got {value!r}")
    for key in ("nomad.connect_timeout", "nomad.read_timeout"):
        section, name = key.split(".")
        if not data[section][name] > 0:
            raise ConfigError(
                f"configuration key {key} must be a number of seconds > 0, got {data[section][name]!r}"
            )
    _check_nodes(data["vm"])
    kafka = data["vm"]["ports"].get("kafka")
    if kafka and data["provision"]["nomad"] and kafka["host"] != kafka["guest"]:  # Kafka runs on Nomad
        raise ConfigError(
            f"configuration keys vm.ports.kafka.host ({kafka['host']}) and vm.ports.kafka.guest "
            f"({kafka['guest']}) must be equal",
            hint="Kafka advertises its host listener as localhost:<guest port>; clients reconnect to that port",
        )
    user = data["ssh"]["user"]
    if not _USER_NAME.fullmatch(user):
        raise ConfigError(
            f"configuration key ssh.user is {user!r}: not a valid user name",
            hint="lower-case letters, digits, '_' and '-', starting with a letter or '_', at most 32",
        )
    cpu = data["vm"]["cpu"]
    if not _CPU_MODEL.fullmatch(cpu):
        raise ConfigError(
            f"configuration key vm.cpu is {cpu!r}: not a qemu CPU model",
            hint="auto, or a model qemu lists with -cpu help (e.g. max, qemu64), optionally with ,+feature/,-feature",
        )
    if cpu == "host" and data["vm"]["accel"] == "tcg":
        raise ConfigError(
            "configuration keys vm.cpu (host) and vm.accel (tcg) do not go together: -cpu host needs KVM or HVF",
            hint="set vm.cpu: auto (an emulated CPU under TCG) or a model such as max",
        )
    host = data["provision"]["hostname"]
    if not _HOST_NAME.fullmatch(host):
        raise ConfigError(
            f"configuration key provision.hostname is {host!r}: not a valid host name",
            hint="letters, digits and '-' in dot-separated labels of at most 63 characters",
        )
    for i, package in enumerate(data["provision"]["packages"]):
        if not isinstance(package, str) or not _PACKAGE.fullmatch(package):
            raise ConfigError(
                f"configuration key provision.packages[{i}] is {package!r}: not a Debian package name "
                "(optionally =version)",
                hint="names are lower-case letters, digits and + - . (Debian Policy 5.6.1), starting with a "
                "letter or digit, e.g. jq or jq=1.6-2.1; apt options such as -s or -o are not packages",
            )
    if "," in str(state_dir):
        raise ConfigError(
            f"configuration key project.state_dir is {str(state_dir)!r}: a comma is not allowed",
            hint="qemu reads commas in file options as option separators; choose a path without one",
        )


#: Node k's forwards are node 1's host ports + NODE_PORT_STEP * (k - 1) (infra/core/nodes.py).
NODE_PORT_STEP = 100
MAX_NODES = 9


def _check_nodes(vm: Mapping[str, Any]) -> None:
    """vm.nodes: 1, or a cluster of 3..MAX_NODES whose offset forwards stay valid ports."""
    nodes = vm["nodes"]
    if not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= MAX_NODES:
        raise ConfigError(
            f"configuration key vm.nodes must be a whole number from 1 to {MAX_NODES}, got {nodes!r}"
        )
    if nodes == 2:
        raise ConfigError(
            "configuration key vm.nodes is 2: two Nomad servers cannot survive the loss of one (Raft needs a "
            "majority, 2 of 2, to elect a leader), so a second node adds a failure without adding resilience",
            hint="use vm.nodes: 1 (one VM) or 3 or more (three servers: any one may be lost)",
        )
    top = max(int(spec["host"]) for spec in vm["ports"].values()) if vm["ports"] else 0
    if nodes > 1 and top + NODE_PORT_STEP * (nodes - 1) > 65535:
        raise ConfigError(
            f"configuration key vm.nodes is {nodes}: node {nodes}'s forwards (vm.ports + "
            f"{NODE_PORT_STEP} per node) would pass port 65535",
            hint="lower vm.ports.*.host or vm.nodes",
        )


def as_dict(cfg: Config) -> dict[str, Any]:
    """A JSON-friendly view (paths as strings), for status output and reports."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return typing.cast(dict[str, Any], conv(cfg))


__all__ = [
    "AcmeConfig", "AppConfig", "Config", "ConfigError", "DeployConfig", "E2EConfig", "IngressConfig",
    "NodeConfig", "NomadConfig", "Port",
    "ProjectConfig", "ProvisionConfig", "SSHConfig", "VMConfig", "as_dict", "from_invoke", "from_raw", "load",
]  # fmt: skip

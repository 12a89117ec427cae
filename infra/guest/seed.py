"""The NoCloud seed: compose cloud-init user-data as data, validate it, pack it into an ISO (label cidata).

Flow of `inv iso`:
1. `compose()` merges the parts in cloud-init/parts/ (base, docker?, nomad?, final) as Python data and
   inserts the configured values (user, SSH key, hostname, pinned versions, shipped files) as values —
   never by splicing text — so the result is always valid YAML.
2. `validate()` checks it against cloud-init's JSON schema (vendored, Apache-2.0) and the project's rules;
   errors name the field path (or file:line:column for a malformed template).
3. `iso_bytes()` packs user-data, meta-data and network-config with pycdlib (ISO9660 + Joliet + Rock Ridge)
   with fixed timestamps, so the same inputs give the same bytes; `write_iso()` (`inv iso`; `refresh()`
   for `inv vm.run`, keeping the last seed's key) writes them atomically, only when they changed: an error
   leaves no ISO behind.
The instance-id is derived from the content: a changed configuration re-provisions, an unchanged one not.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import re
import shlex
import sys
import time as _time
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from infra import ROOT
from infra.core import files, nodes, ui
from infra.core.config import Config, NodeConfig
from infra.core.datafile import load_yaml
from infra.core.errors import TemplateError, ValidationError
from infra.core.state import StatePaths
from infra.guest import keys, pgp

CLOUD_INIT_DIR = ROOT / "cloud-init"
PARTS_DIR = CLOUD_INIT_DIR / "parts"
FILES_DIR = CLOUD_INIT_DIR / "files"
HASHICORP_KEY_FILE = CLOUD_INIT_DIR / "keys" / "hashicorp.asc"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "schema-cloud-config-v1.json"

VOLUME_LABEL = "cidata"
#: 2024-01-01T00:00:00Z; every timestamp in the ISO. Override with SOURCE_DATE_EPOCH (reproducible-builds.org).
DEFAULT_EPOCH = 1704067200
#: ISO9660 level-1 names (8.3, upper case) with their Rock Ridge / Joliet long names.
ISO_FILES = (("USERDATA.;1", "user-data"), ("METADATA.;1", "meta-data"), ("NETWORKC.;1", "network-config"))
#: Project-only keys in the parts, resolved by compose() before validation.
FROM_FILE = "from_file"
PROVISION_ENV = "/etc/infra-lab/provision.env"


@dataclass(frozen=True)
class Seed:
    user_data: bytes
    meta_data: bytes
    network_config: bytes
    instance_id: str


@dataclass(frozen=True)
class SeedResult:
    path: Path
    sha256: str
    instance_id: str
    changed: bool
    baked: bool = False  # made for a baked image (without BAKED_KEYS)

    @property
    def line(self) -> str:
        """What `inv iso` (and `vm.run`, `up` when they make the seed) print on stdout: path and digest."""
        return f"{self.path} sha256:{self.sha256}"


# ---------------------------------------------------------------------------------------------- loading --
def _parts(cfg: Config) -> list[Path]:
    names = ["base.yaml"]
    if cfg.provision.docker:
        names.append("docker.yaml")
    if cfg.provision.nomad:
        names.append("nomad.yaml")
    names.append("final.yaml")
    return [PARTS_DIR / n for n in names]


def _merge(into: dict[str, Any], part: Mapping[str, Any], source: Path) -> None:
    """Lists concatenate, mappings merge, a scalar set twice to different values is an error."""
    for key, value in part.items():
        if key not in into:
            into[key] = copy.deepcopy(value)
        elif isinstance(into[key], list) and isinstance(value, list):
            into[key].extend(copy.deepcopy(value))
        elif isinstance(into[key], dict) and isinstance(value, dict):
            _merge(into[key], value, source)
        elif into[key] != value:
            raise TemplateError(
                f"{source}: key {key!r} conflicts with an earlier part ({into[key]!r} vs {value!r})"
            )


# ---------------------------------------------------------------------------------------------- compose --
#: What a baked image already carries (infra/compose/bake.py): a seed for it leaves these out, so its first boot
#: installs nothing and needs no network. The provisioning scripts stay: each is idempotent and offline
#: once its package is installed.
BAKED_KEYS = ("packages", "package_update", "package_upgrade")
#: Per-instance parts of the user-data: they differ between VMs made from one bake, so the bake's content
#: key leaves them out (infra/vm/bakecache.py) and every boot of a bake applies them anew.
PER_INSTANCE_KEYS = ("hostname", "fqdn")


def compose(cfg: Config, public_key: str, *, baked: bool = False) -> dict[str, Any]:
    """The user-data document as Python data; `baked`: for a baked image (without BAKED_KEYS)."""
    doc: dict[str, Any] = {}
    for path in _parts(cfg):
        part = load_yaml(path)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise TemplateError(f"{path}: a part must be a mapping of cloud-config keys")
        _merge(doc, part, path)

    doc["hostname"] = cfg.provision.hostname
    doc["fqdn"] = cfg.provision.hostname
    users = doc.get("users") or []
    if not users or not isinstance(users[0], dict):
        raise TemplateError(f"{PARTS_DIR / 'base.yaml'}: users[0] must be the login user mapping")
    user = users[0]
    user["name"] = cfg.ssh.user
    user["ssh_authorized_keys"] = [public_key]

    shipped = doc.setdefault("write_files", [])
    for entry in shipped:
        if FROM_FILE in entry:
            src = FILES_DIR / entry.pop(FROM_FILE)
            entry["content"] = files.read_text(src, "file shipped by user-data", error=TemplateError)
    # Values the provisioning scripts read (they are plain files, never templated): a shell env file.
    env = {"LOGIN_USER": cfg.ssh.user}
    if cfg.provision.nomad:
        env |= {
            "NOMAD_VERSION": cfg.provision.nomad_version,
            "HASHICORP_KEY_FPR": pgp.HASHICORP_KEY_FPR,
            "HASHICORP_KEY_URL": pgp.HASHICORP_KEY_URL,
        }
    if cfg.node is not None:  # a cluster node (infra/core/nodes.py): 40-nomad-start.sh reads NOMAD_SERVER
        env["CLUSTER_ADDRESS"] = cfg.node.address
        if cfg.provision.nomad:
            env["NOMAD_SERVER"] = "true" if cfg.node.address in cfg.node.servers else "false"
    shipped.insert(
        0,
        {
            "path": PROVISION_ENV,
            "permissions": "0644",
            "content": "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()),
        },
    )
    if cfg.provision.nomad:
        key = embedded_hashicorp_key()
        if key is not None:
            shipped.append({"path": "/etc/infra-lab/hashicorp.asc", "permissions": "0644", "content": key})

    if cfg.node is not None and cfg.provision.nomad:
        shipped.append(
            {
                "path": CLUSTER_AGENT_CONFIG,
                "permissions": "0644",
                "content": json.dumps(cluster_agent_config(cfg.node), indent=2) + "\n",
                "defer": True,
            }
        )

    if cfg.provision.docker and cfg.provision.registry_mirror:
        daemon = {"registry-mirrors": [cfg.provision.registry_mirror]}
        shipped.append(
            {
                "path": "/etc/docker/daemon.json",
                "permissions": "0644",
                "content": json.dumps(daemon, indent=2),
            }
        )

    packages = [*doc.get("packages", []), *cfg.provision.packages]
    if packages:
        doc["packages"] = packages
        doc["package_update"] = True
    if baked:
        for key in BAKED_KEYS:
            doc.pop(key, None)
    return doc


def instance_neutral(cfg: Config) -> dict[str, Any]:
    """The full user-data minus its per-instance parts (host name, the login key): what a bake is made of."""
    # a cluster node's identity (its address, its agent's cluster file) is per instance too: every node of a
    # cluster boots the one bake of the configuration (40-nomad-start.sh clears a bake's pre-cluster state)
    doc = compose(dataclasses.replace(cfg, node=None), public_key="")
    for key in PER_INSTANCE_KEYS:
        doc.pop(key, None)
    for user in doc.get("users", []):
        if isinstance(user, dict):
            user.pop("ssh_authorized_keys", None)
    return doc


def embedded_hashicorp_key() -> str | None:
    """cloud-init/keys/hashicorp.asc when present, after checking it is the pinned key."""
    if not HASHICORP_KEY_FILE.exists():
        return None
    text = files.read_text(HASHICORP_KEY_FILE, "HashiCorp key file", error=ValidationError, limit=64 * 1024)
    pgp.check_fingerprint(text, pgp.HASHICORP_KEY_FPR, str(HASHICORP_KEY_FILE))
    return text


def network_config(node: NodeConfig | None = None) -> dict[str, Any]:
    """NoCloud network-config v2: DHCP on the first Ethernet device, whatever its name. A cluster node's
    second NIC (matched by the MAC its qemu command line sets) gets its static cluster address, no gateway:
    the private network leads nowhere but to the other nodes; the first NIC keeps the default route."""
    if node is None:
        return {"version": 2, "ethernets": {"primary": {"match": {"name": "e*"}, "dhcp4": True}}}
    return {
        "version": 2,
        "ethernets": {
            "primary": {"match": {"macaddress": node.primary_mac}, "dhcp4": True},
            "cluster": {
                "match": {"macaddress": node.mac},
                "dhcp4": False,
                "addresses": [f"{node.address}/{node.prefix}"],
            },
        },
    }


#: A cluster node's Nomad agent settings, as JSON (the agent reads *.json beside *.hcl). Its name sorts
#: after zz-infra-lab.hcl and the package's nomad.hcl, so it wins where they overlap (command/agent/config.go,
#: LoadConfigDir: sort.Strings(files), then result.Merge(config) per file; ServerConfig.Merge takes a
#: later bootstrap_expect > 0; ClientConfig.Merge merges `meta` key by key).
CLUSTER_AGENT_CONFIG = "/etc/nomad.d/zzz-cluster.json"
#: Node meta naming the node whose host volumes hold the stateful jobs' data (nomad/datastorage.nomad.hcl
#: is constrained to it): node 1 in a cluster; the one VM says the same in zz-infra-lab.hcl.
DATA_NODE_META = "infra_lab_data"
#: Node meta naming the entry point, the node the host's forwards of the ingress reach (nomad-1):
#: nomad/ingress.nomad.hcl is constrained to it.
ENTRY_NODE_META = "infra_lab_entry"


PUBLIC_HOST_NETWORK = nodes.PUBLIC_HOST_NETWORK


def cluster_agent_config(node: NodeConfig) -> dict[str, Any]:
    """Raft over the private network: the first three nodes are servers expecting three, joining each
    other by their cluster addresses; every agent advertises its cluster address, and jobs' ports and
    services use the cluster NIC (chosen by address, whatever the guest names it), so an allocation on one
    node reaches a service on another; the user-mode NIC is host network "public" (the forwards' side).
    Node meta names the node and says whether it holds the data.

    The shape is the agent's JSON as Nomad's own tests write it (command/agent/testdata/basic.json: every
    block a list of one object, a labelled block {label: [{...}]}), parsed by command/agent/config_parse.go
    ParseConfigFile (HCL1 decoding of JSON)."""
    network = f"{'.'.join(node.address.split('.')[:3])}.0/{node.prefix}"
    name, cidr = PUBLIC_HOST_NETWORK
    client: dict[str, Any] = {
        "enabled": True,
        # ServerJoin.RetryJoin: a client finds the servers' RPC port (4647) by these addresses
        "server_join": [{"retry_join": [f"{a}:4647" for a in node.servers]}],
        # a go-sockaddr template (config.go: parseSingleInterfaceTemplate): the NIC on the cluster network
        "network_interface": f'{{{{ GetAllInterfaces | include "network" "{network}" | attr "name" }}}}',
        "host_network": [{name: [{"cidr": cidr}]}],
        "meta": [
            {
                "infra_lab_node": node.name,
                DATA_NODE_META: "true" if node.index == 1 else "false",
                ENTRY_NODE_META: "true" if node.index == 1 else "false",
            }
        ],
    }
    config: dict[str, Any] = {
        # command/agent/config.go: AdvertiseAddrs {http, rpc, serf}
        "advertise": [{"http": node.address, "rpc": node.address, "serf": node.address}],
        "client": [client],
    }
    if node.address in node.servers:
        config["server"] = [
            {
                "enabled": True,
                "bootstrap_expect": len(node.servers),
                # the servers' Serf port (4648) on the cluster network
                "server_join": [{"retry_join": [f"{a}:4648" for a in node.servers]}],
            }
        ]
    return config


# --------------------------------------------------------------------------------------------- validate --
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())  # type: ignore[no-any-return]


def _schema_keys(schema: Mapping[str, Any]) -> set[str]:
    known: set[str] = set()
    for sub in schema.get("allOf", []):
        ref = sub.get("$ref", "")
        target = schema["$defs"].get(ref.rsplit("/", 1)[-1], {}) if ref else sub
        known.update(target.get("properties", {}))
    return known


def _path(parts: Iterator[Any] | Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate(doc: Mapping[str, Any], cfg: Config, *, schema: bool = True) -> None:
    """cloud-init's JSON schema + project rules; raise ValidationError naming every bad field path.
    `schema=False`: the project rules only (the caller knows these exact bytes passed the schema)."""
    problems: list[str] = []
    if schema:
        import jsonschema  # ~0.1 s to import: only when a user-data is new

        cloud_config = _schema()
        known = _schema_keys(cloud_config)
        for key in doc:
            if key not in known:
                problems.append(f"{key}: not a cloud-config key known to cloud-init's schema")
        validator = jsonschema.Draft4Validator(cloud_config)
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            problems.append(f"{_path(error.absolute_path)}: {error.message}")
    problems.extend(_project_rules(doc, cfg))
    if problems:
        raise ValidationError(
            f"user-data failed validation ({len(problems)} problem{'s' if len(problems) > 1 else ''})",
            details=problems,
            hint="the templates are in cloud-init/parts/; nothing was written",
        )


_VERSION = re.compile(r"\d+\.\d+\.\d+(\+ent)?")


def _project_rules(doc: Mapping[str, Any], cfg: Config) -> list[str]:
    problems = []
    users = doc.get("users", [])
    if not users or not users[0].get("ssh_authorized_keys"):
        problems.append("users[0].ssh_authorized_keys: the login user has no SSH key")
    written = {f["path"] for f in doc.get("write_files", [])}
    for i, item in enumerate(doc.get("runcmd", [])):
        if isinstance(item, str) and item.startswith("/usr/local/lib/infra-lab/") and item not in written:
            problems.append(f"runcmd[{i}]: script {item} is not written by write_files")
    mirror = cfg.provision.registry_mirror
    if mirror and not re.fullmatch(r"https://[A-Za-z0-9.-]+(:\d+)?/?", mirror):
        problems.append(f"provision.registry_mirror: {mirror!r} is not an https:// registry URL")
    if cfg.provision.nomad:
        if not _VERSION.fullmatch(cfg.provision.nomad_version):
            problems.append(
                f"provision.nomad_version: {cfg.provision.nomad_version!r} is not a pinned X.Y.Z version"
            )
        problems.extend(_host_volume_rule())
    return problems


def _host_volume_rule() -> list[str]:
    """Every host_volume path of the agent config has a directory entry in host-volumes (the agent config
    read by the project's HCL reader, infra/core/hcl.py)."""
    from infra.core import hcl

    agent = hcl.AGENT_CONFIG
    listed = FILES_DIR / "nomad" / "host-volumes"
    dirs = {
        line.split()[0]
        for line in listed.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    try:
        volumes = hcl.agent_host_volume_paths(agent)
    except hcl.SpecSyntaxError as exc:
        return [f"{agent}:{exc.line}: {exc.message}"]
    return [
        f"{agent}: host_volume {name!r} path {path} has no entry in {listed} (the client would refuse it)"
        for name, path in sorted(volumes.items())
        if path not in dirs
    ]


# ---------------------------------------------------------------------------------------------- render --
class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the rendered user-data reads like the files it ships."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def render(cfg: Config, public_key: str, *, baked: bool = False, last: Path | None = None) -> Seed:
    """`last`: the user-data written before (only ever after it validated): when these bytes are the same,
    cloud-init's schema is not asked again (a no-op `inv up` then never imports jsonschema)."""
    doc = compose(cfg, public_key, baked=baked)
    user_data = ("#cloud-config\n" + dump(doc)).encode()
    validate(doc, cfg, schema=last is None or not _same(last, user_data))
    net = dump(network_config(cfg.node)).encode()
    digest = hashlib.sha256(user_data + b"\0" + net).hexdigest()[:16]
    instance_id = f"iid-{cfg.project.name}-{digest}"
    meta = dump({"instance-id": instance_id, "local-hostname": cfg.provision.hostname}).encode()
    return Seed(user_data=user_data, meta_data=meta, network_config=net, instance_id=instance_id)


# --------------------------------------------------------------------------------------------- iso ----
def _epoch() -> float:
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return float(value) if value.isdigit() else float(DEFAULT_EPOCH)


@contextlib.contextmanager
def _frozen_clock(epoch: float) -> Iterator[None]:
    """pycdlib stamps every record with time.time() in local time; pin both inside pycdlib only."""
    fake = types.SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    fake.time = lambda: epoch
    fake.localtime = lambda secs=None: _time.gmtime(epoch if secs is None else secs)
    fake.timezone = 0
    fake.altzone = 0
    fake.daylight = 0
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("pycdlib") and getattr(module, "time", None) is _time:
            module.time = fake  # type: ignore[attr-defined]
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.time = _time  # type: ignore[attr-defined]


def iso_bytes(seed: Seed, epoch: float | None = None) -> bytes:
    iso = pycdlib.PyCdlib()
    out = io.BytesIO()
    with _frozen_clock(_epoch() if epoch is None else epoch):
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
        contents = {
            "user-data": seed.user_data,
            "meta-data": seed.meta_data,
            "network-config": seed.network_config,
        }
        for iso_name, long_name in ISO_FILES:
            data = contents[long_name]
            iso.add_fp(
                io.BytesIO(data), len(data), f"/{iso_name}", rr_name=long_name, joliet_path=f"/{long_name}"
            )
        iso.write_fp(out)
        iso.close()
    return out.getvalue()


def _same(path: Path, data: bytes) -> bool:
    """`path` is a regular file holding exactly `data`."""
    try:
        return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- build --
def write_iso(cfg: Config, ssh_key: str | None = None, *, baked: bool = False) -> SeedResult:
    """`inv iso`: render, validate, write <state>/seed.iso (+ the rendered user-data beside it).
    `baked`: the seed for a baked image (infra/compose/bake.py), which installs nothing."""
    started = _time.monotonic()
    state = StatePaths(cfg.project.state_dir).check()
    pair = keys.resolve(ssh_key if ssh_key is not None else cfg.ssh.public_key, state)
    seed = render(cfg, pair.public, baked=baked, last=state.user_data)
    data = iso_bytes(seed)
    sha = hashlib.sha256(data).hexdigest()
    # both files, so a run that failed between the two writes is not "unchanged" next time; the user-data
    # copy first, the ISO (what vm.run boots) last
    changed = not (_same(state.seed_iso, data) and _same(state.user_data, seed.user_data))
    if changed:
        state.claim()
        files.write_atomic(state.user_data, seed.user_data, "rendered user-data", mode=0o600)
        files.write_atomic(state.seed_iso, data, "seed ISO")
    if cfg.provision.nomad and not HASHICORP_KEY_FILE.exists():  # compose() checked it when present
        ui.warn(
            f"{HASHICORP_KEY_FILE.relative_to(ROOT)} is absent: the guest will fetch HashiCorp's key and "
            f"accept it only with fingerprint {pgp.HASHICORP_KEY_FPR}"
        )
    verb = "wrote" if changed else "unchanged"
    ui.ok(
        f"seed ISO {verb}: {state.seed_iso} ({len(data)} bytes, {seed.instance_id}, key from {pair.source}, "
        f"{(_time.monotonic() - started) * 1000:.0f} ms)"
    )
    return SeedResult(state.seed_iso, sha, seed.instance_id, changed, baked)


def previous_key(state: StatePaths) -> str | None:
    """The key authorized by the last seed this project wrote (from its user-data copy), if any."""
    try:
        doc = yaml.safe_load(state.user_data.read_bytes())
        key = doc["users"][0]["ssh_authorized_keys"][0]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
    return key if isinstance(key, str) else None


def refresh(cfg: Config, *, baked: bool = False) -> SeedResult:
    """`inv vm.run`'s seed: rebuilt from the current configuration (a no-op when nothing changed), keeping
    the key of the previous seed when ssh.public_key is not set — so `inv iso --ssh-key K` survives."""
    key = None if cfg.ssh.public_key else previous_key(StatePaths.of(cfg))
    return write_iso(cfg, ssh_key=key, baked=baked)

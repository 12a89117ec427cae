"""The state directory: one place for everything a running setup owns, every file a named constant.

Lima keeps each instance's files together the same way. The VM is found through its pidfile or launch record
(vm.json), accepted only when the process's command line carries our pidfile path, and spoken to over its QMP
socket — never found by searching process names (infra/vm/instance.py). `inv vm.destroy` removes this directory's VM files; the image cache
(config project.cache_dir) lives elsewhere and survives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from infra.core import files

if TYPE_CHECKING:
    from infra.core.config import Config

SEED_ISO = "seed.iso"
USER_DATA = "user-data"  # the rendered copy that went into the ISO, for inspection
DISK = "disk.qcow2"
PIDFILE = "qemu.pid"
SERIAL_LOG = "serial.log"
QMP_SOCKET = "qmp.sock"
QEMU_LOG = "qemu.log"  # qemu's own stderr
VM_RECORD = "vm.json"  # how the running VM was launched: ports, accel, start time, command line
SSH_DIR = "ssh"
SSH_KEY = "id_ed25519"
KNOWN_HOSTS = "known_hosts"
DEPLOYED = "deployed.json"  # last image tag deployed by deploy.app
BUILD_LOG = "build.log"  # the last app image build's full output
TLS_DIR = (
    "tls"  # the project CA and Traefik's certificate for *.localhost (infra/compose/tls.py); 0700, keys 0600
)
TLS_CA = "ca.pem"  # in TLS_DIR: the project CA's certificate, what clients trust (`inv tls.ca`)
VM_CHECKED = (
    "vm-checked.json"  # the last good `vm.check` of the running VM's boot (qemu pid + start, boot id)
)
LOCK = "vm.lock"  # flock'ed by VM lifecycle commands (run, stop, destroy): one at a time; names its holder
# A local cluster (vm.nodes >= 3): each node's own state dir (the names above) is <state>/nodes/<name>/;
# the private network's switch (vde_switch) keeps its unix sockets in <state>/switch/ and its pid beside.
NODES_DIR = "nodes"
SWITCH_DIR = "switch"
SWITCH_PIDFILE = "switch.pid"
SWITCH_LOG = "switch.log"
MARKER = ".infra-lab"  # written when the tool creates (or adopts) the state dir: a dir without it is not ours
BAKE_DIR = "bake"  # image.bake's own state dir (infra/compose/bake.py)
E2E_DIR = "e2e"  # the end-to-end run's reports (e2e.report_dir's default)

#: Every name the tool makes in a state dir: a dir holding anything else is not used (nor deleted from).
NAMES = (SEED_ISO, USER_DATA, DISK, PIDFILE, SERIAL_LOG, QMP_SOCKET, QEMU_LOG, VM_RECORD, SSH_DIR, DEPLOYED,
         BUILD_LOG, TLS_DIR, VM_CHECKED, LOCK, BAKE_DIR, E2E_DIR, NODES_DIR, SWITCH_DIR, SWITCH_PIDFILE,
         SWITCH_LOG)  # fmt: skip


# In the image cache (project.cache_dir), not the state dir: outlives `vm.destroy`.
KVM_PROBE_CACHE = "kvm-probe.json"  # the KVM probe's verdict for this host boot (infra/vm/qemu.py)


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @classmethod
    def of(cls, cfg: Config) -> StatePaths:
        """The state directory of a configuration (project.state_dir)."""
        return cls(cfg.project.state_dir)

    def claim(self) -> StatePaths:
        """The state dir made the tool's own right before something is written in it: writable, holding the
        marker (written now) or nothing but the tool's names (`files.own_dir`; ConfigError otherwise)."""
        files.own_dir(self.root, "project.state_dir", MARKER, NAMES)
        return self

    def check(self) -> StatePaths:
        """`claim`'s checks without writing the marker: for the start of work that may still fail (then
        nothing is left behind)."""
        files.own_dir(self.root, "project.state_dir", MARKER, NAMES, mark=False)
        return self

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def seed_iso(self) -> Path:
        return self.root / SEED_ISO

    @property
    def user_data(self) -> Path:
        return self.root / USER_DATA

    @property
    def disk(self) -> Path:
        return self.root / DISK

    @property
    def pidfile(self) -> Path:
        return self.root / PIDFILE

    @property
    def serial_log(self) -> Path:
        return self.root / SERIAL_LOG

    @property
    def qmp_socket(self) -> Path:
        return self.root / QMP_SOCKET

    @property
    def qemu_log(self) -> Path:
        return self.root / QEMU_LOG

    @property
    def vm_record(self) -> Path:
        return self.root / VM_RECORD

    @property
    def ssh_key(self) -> Path:
        return self.root / SSH_DIR / SSH_KEY

    @property
    def ssh_pubkey(self) -> Path:
        return self.root / SSH_DIR / (SSH_KEY + ".pub")

    @property
    def known_hosts(self) -> Path:
        return self.root / SSH_DIR / KNOWN_HOSTS

    @property
    def deployed(self) -> Path:
        return self.root / DEPLOYED

    @property
    def vm_checked(self) -> Path:
        return self.root / VM_CHECKED

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def build_log(self) -> Path:
        return self.root / BUILD_LOG

    @property
    def tls_dir(self) -> Path:
        return self.root / TLS_DIR

    @property
    def tls_ca(self) -> Path:
        return self.root / TLS_DIR / TLS_CA

    def node(self, name: str) -> StatePaths:
        """A cluster node's own state directory (vm.nodes >= 3): <state>/nodes/<name>."""
        return StatePaths(self.root / NODES_DIR / name)

    @property
    def nodes_dir(self) -> Path:
        return self.root / NODES_DIR

    @property
    def switch_dir(self) -> Path:
        return self.root / SWITCH_DIR

    @property
    def switch_pidfile(self) -> Path:
        return self.root / SWITCH_PIDFILE

    @property
    def switch_log(self) -> Path:
        return self.root / SWITCH_LOG

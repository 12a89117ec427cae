"""The state directory: one place for everything a running setup owns, every file a named constant.

Lima keeps each instance's files together the same way; the VM is found by its pidfile and QMP socket,
never by searching process names. `inv vm.destroy` removes this directory's VM files; the image cache
(config project.cache_dir) lives elsewhere and survives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infra.config import Config

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
TLS_DIR = "tls"  # the project CA and Traefik's certificate for *.localhost (infra/tls.py); 0700, keys 0600
TLS_CA_CERT = "ca.pem"  # in TLS_DIR: the project CA's certificate, what a browser or curl is told to trust
VM_CHECKED = (
    "vm-checked.json"  # the last good `vm.check` of the running VM's boot (qemu pid + start, boot id)
)
LOCK = "vm.lock"  # flock'ed by VM lifecycle commands (run, stop, destroy): one at a time; names its holder


# In the image cache (project.cache_dir), not the state dir: outlives `vm.destroy`.
KVM_PROBE_CACHE = "kvm-probe.json"  # the KVM probe's verdict for this host boot (infra/qemu.py)


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @classmethod
    def of(cls, cfg: Config) -> StatePaths:
        """The state directory of a configuration (project.state_dir)."""
        return cls(cfg.project.state_dir)

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

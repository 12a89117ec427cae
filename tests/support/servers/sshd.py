"""A real OpenSSH server on a free loopback port, standing in for the VM's sshd.

Own host key, config, pidfile and authorized_keys in a temporary directory; key-only login for the user
running the tests; `SetEnv` puts extra variables into every session (e.g. DOCKER_HOST pointing at the
test's private dockerd, the way the VM's login user reaches the VM's Docker). Stopped by its PID.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from . import common
from .common import ServerProcess, free_port, port_open


@dataclass
class SSHServer(ServerProcess):
    name: ClassVar[str] = "sshd"
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0

    @property
    def client_key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def user(self) -> str:
        return getpass.getuser()

    def start(self) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).exists():
            raise RuntimeError("sshd not found: apt-get install -y openssh-server")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        for name in ("host_ed25519", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / name)],
                           check=True, capture_output=True)  # fmt: skip
        authorized = self.root / "authorized_keys"
        authorized.write_text((self.root / "id_ed25519.pub").read_text())
        authorized.chmod(0o600)
        self.port = self.port or free_port()
        set_env = " ".join(f"{k}={v}" for k, v in self.env.items())
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.root / 'host_ed25519'}\n"
            f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {authorized}\nStrictModes no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nUsePAM no\nSubsystem sftp internal-sftp\n"
            + (f"SetEnv {set_env}\n" if set_env else "")
        )
        check = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"sshd config rejected: {check.stderr}")
        self.launch([sshd, "-D", "-e", "-f", str(config)], ready=lambda: port_open(self.port),
                    what=f"sshd on 127.0.0.1:{self.port}", timeout=20)  # fmt: skip


def started(env: dict[str, str] | None = None) -> SSHServer:
    return common.started(SSHServer, lambda root: SSHServer(root, env=dict(env or {})))

"""A real OpenSSH server on a free loopback port, standing in for the VM's sshd.

Own host key, config, pidfile and authorized_keys in a temporary directory; key-only login for the user
running the tests; `SetEnv` puts extra variables into every session (e.g. DOCKER_HOST pointing at the
test's private dockerd, the way the VM's login user reaches the VM's Docker). Stopped by its PID.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .common import free_port, port_open, stop_process, wait_for


@dataclass
class SSHServer:
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def user(self) -> str:
        return getpass.getuser()

    @property
    def log(self) -> Path:
        return self.root / "sshd.log"

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
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)], stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        wait_for(lambda: port_open(self.port), f"sshd on 127.0.0.1:{self.port}", 20, self.log, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def started(env: dict[str, str] | None = None) -> SSHServer:
    root = Path(tempfile.mkdtemp(prefix="sshd-"))
    os.chmod(root, 0o700)
    server = SSHServer(root, env=dict(env or {}))
    try:
        server.start()
    except BaseException:
        cleanup(server)
        raise
    return server


def cleanup(server: SSHServer) -> None:
    try:
        server.stop()
    finally:
        shutil.rmtree(server.root, ignore_errors=True)

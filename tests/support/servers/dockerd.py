"""A private Docker engine (Debian's `docker.io`): `dockerd` with its own data-root, exec-root, pidfile and
socket under a temporary directory, so it neither needs nor touches a system Docker.

It runs without the default bridge and without iptables rules (`--bridge=none --iptables=false`): nothing
on the host's firewall changes; builds and containers use `--network host`. Started as root (dockerd needs
it), stopped by its PID (SIGTERM, then SIGKILL), and the mounts it leaves under its directories (e.g.
exec-root/netns/default) are unmounted before the directory is removed.

Also: `python_base()` makes the app's base image from Debian's packages (no Docker Hub here): mmdebstrap
--variant=minbase bookworm + python3, python3-venv, ca-certificates -> a rootfs tarball -> `docker
import` as local/python-base:bookworm. The tarball is cached (by a key over the mmdebstrap arguments and the
extra CA certificates copied in) under $XDG_CACHE_HOME/infra-lab/test-images/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import common
from .common import ServerProcess, tail

BASE_TAG = "local/python-base:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
LOCAL_CAS = Path("/usr/local/share/ca-certificates")


def docker_cli() -> str:
    """Debian's CLI matches Debian's daemon; any other `docker` on PATH works too (API negotiation)."""
    for candidate in ("/usr/bin/docker", shutil.which("docker") or ""):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("no docker CLI found: apt-get install -y docker.io")


@dataclass
class DockerEngine(ServerProcess):
    name: ClassVar[str] = "dockerd"
    stop_timeout: ClassVar[float] = 30

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [docker_cli(), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} failed ({result.returncode}):\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")  # fmt: skip
        return result

    def start(self) -> None:
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if not Path(dockerd).exists():
            raise RuntimeError("dockerd not found: apt-get install -y docker.io")
        if os.geteuid() != 0:
            raise RuntimeError(f"dockerd needs root; running as uid {os.geteuid()}")
        try:
            self.launch(
                [
                    dockerd,
                    "--data-root", str(self.root / "data"),
                    "--exec-root", str(self.root / "exec"),
                    "--pidfile", str(self.root / "docker.pid"),
                    "--host", self.host,
                    "--bridge=none", "--iptables=false", "--ip6tables=false",
                    "--storage-driver=overlay2",
                ],
                ready=self.answers, what=f"dockerd at {self.host}", timeout=60,
            )  # fmt: skip
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(
                f"the Docker engine did not start: {exc}\n--- {self.log}:\n{tail(self.log, 60)}"
            ) from exc

    def answers(self) -> bool:
        if not self.socket.exists():
            return False
        return (
            self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20).returncode == 0
        )

    def stop(self) -> int | None:
        code = super().stop()
        self._unmount()
        return code

    def _unmount(self) -> None:
        root = str(self.root.resolve())
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f if line.split()[4].startswith(root + "/")]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def started() -> DockerEngine:
    return common.started(DockerEngine)


# ---------------------------------------------------------------------------------------- base image --
def _mmdebstrap_args(out: Path, cas: list[Path]) -> list[str]:
    args = [
        "mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--aptopt=Acquire::Retries \"3\"",
    ]  # fmt: skip
    if cas:
        # The host's extra CAs (e.g. a TLS-inspecting egress proxy's) go into the base, so that pip in
        # `docker build` verifies TLS exactly as the host does.
        args.append(
            "--customize-hook=copy-in " + " ".join(str(c) for c in cas) + " /usr/local/share/ca-certificates/"
        )
        args.append('--customize-hook=chroot "$1" update-ca-certificates')
    return [*args, "bookworm", str(out)]


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "infra-lab" / "test-images"


def python_base(engine: DockerEngine) -> tuple[str, dict[str, float]]:
    """Import local/python-base:bookworm into `engine`; returns the tag and timings (seconds)."""
    if not shutil.which("mmdebstrap"):
        raise RuntimeError("mmdebstrap not found: apt-get install -y mmdebstrap")
    cas = sorted(LOCAL_CAS.glob("*.crt"))
    key_src = json.dumps({"args": _mmdebstrap_args(Path("OUT"), cas),
                          "cas": [hashlib.sha256(c.read_bytes()).hexdigest() for c in cas]})  # fmt: skip
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cached = cache_dir() / f"python-base-bookworm-{key}.tar"
    timings: dict[str, float] = {}
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        # per process: two test workers building at once each publish a whole file (os.replace is atomic)
        partial = cached.with_name(f".{cached.stem}.{os.getpid()}.partial.tar")
        started = time.monotonic()
        result = subprocess.run(_mmdebstrap_args(partial, cas), capture_output=True, text=True, timeout=900,
                                check=False)  # fmt: skip
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-4000:]}")
        os.replace(partial, cached)
        timings["mmdebstrap"] = time.monotonic() - started
    started = time.monotonic()
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["python3"]']
    if cas:
        changes.append("ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
    args = ["import"]
    for change in changes:
        args += ["--change", change]
    engine.docker(*args, str(cached), BASE_TAG, timeout=600)
    timings["import"] = time.monotonic() - started
    return BASE_TAG, timings

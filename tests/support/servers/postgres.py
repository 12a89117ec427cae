"""A real PostgreSQL (Debian's packages, /usr/lib/postgresql/<major>/bin) in a temporary directory.

initdb refuses to run as root, so when the tests run as root (CI does) the cluster belongs to the
unprivileged `nobody` user: the data and socket directories are made in a fresh 0700 directory chowned to
it (pytest's tmp_path is not reachable for other users) and initdb/postgres run with that uid via
subprocess' user=/group=. Postgres listens on 127.0.0.1:<free port> and on a unix socket in that directory;
it is stopped by the PID it was started with (SIGINT = fast shutdown) and the directory is removed.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import psycopg

from . import common
from .common import ServerProcess, free_port, tail

PG_BINDIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
USER = "postgres"  # the cluster's superuser (a database role, not a system user)
PASSWORD = "test-password"  # the fixture cluster's own, random-free on purpose: it lives for one test run


def find_bindir() -> Path:
    for bindir in PG_BINDIRS:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise RuntimeError(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install Debian's "
        "postgresql package (apt-get install -y postgresql)"
    )


@dataclass
class PostgresServer(ServerProcess):
    name: ClassVar[str] = "postgres"
    stop_signal: ClassVar[int] = signal.SIGINT  # fast shutdown
    port: int = 0
    bindir: Path = field(default_factory=find_bindir)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/postgres"

    def env(self) -> dict[str, str]:
        """libpq environment for a client (the app reads these when DATABASE_URL is unset)."""
        return {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": USER,
            "PGPASSWORD": PASSWORD,
            "PGDATABASE": "postgres",
        }

    def _ids(self) -> tuple[int, int] | None:
        """(uid, gid) of `nobody` when running as root (initdb refuses root), else None: as we are."""
        if os.geteuid() != 0:
            return None
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid

    def create(self) -> None:
        self.init()
        self.start()

    def init(self) -> None:
        ids = self._ids()
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if ids:
            for path in (self.root, pwfile):
                os.chown(path, *ids)
        result = subprocess.run(
            [
                str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
            ],
            capture_output=True, text=True, timeout=120, check=False, cwd=self.root,
            user=ids[0] if ids else None, group=ids[1] if ids else None, extra_groups=[] if ids else None,
        )  # fmt: skip
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        self.launch(
            [
                str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
            ],
            ids=self._ids(), ready=self.answers, what=f"postgres on 127.0.0.1:{self.port}", timeout=30,
        )  # fmt: skip

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> int | None:
        """Fast shutdown by PID; the port stays this server's for a later start()."""
        code = super().stop()
        if code not in (0, None):
            raise RuntimeError(f"postgres exited with {code}:\n{tail(self.log)}")
        return code


def started() -> PostgresServer:
    """A fresh, running cluster in its own directory (cleanup(): stop + remove)."""
    return common.started(PostgresServer)

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
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from .common import free_port, stop_process, tail, wait_for

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
class PostgresServer:
    root: Path
    port: int = 0
    bindir: Path = field(default_factory=find_bindir)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

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

    def _ids(self) -> dict[str, int]:
        if os.geteuid() != 0:
            return {}
        nobody = pwd.getpwnam("nobody")
        return {"user": nobody.pw_uid, "group": nobody.pw_gid}

    def init(self) -> None:
        ids = self._ids()
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if ids:
            for path in (self.root, pwfile):
                os.chown(path, ids["user"], ids["group"])
        result = subprocess.run(
            [
                str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
            ],
            capture_output=True, text=True, timeout=120, check=False, cwd=self.root,
            **({"extra_groups": [], **ids} if ids else {}),  # type: ignore[arg-type]
        )  # fmt: skip
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        ids = self._ids()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                    "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
                    "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
                ],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                **({"extra_groups": [], **ids} if ids else {}),  # type: ignore[arg-type]
            )  # fmt: skip
        wait_for(self.answers, f"postgres on 127.0.0.1:{self.port}", 30, self.log, self.proc)

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown by PID; the port stays this server's for a later start()."""
        if self.proc is not None:
            code = stop_process(self.proc, sig=signal.SIGINT)
            self.proc = None
            if code != 0:
                raise RuntimeError(f"postgres exited with {code}:\n{tail(self.log)}")


def started() -> PostgresServer:
    """A fresh, running cluster in its own directory (cleanup(): stop + remove)."""
    root = Path(tempfile.mkdtemp(prefix="pgtest-"))
    server = PostgresServer(root)
    try:
        server.init()
        server.start()
    except BaseException:
        cleanup(server)
        raise
    return server


def cleanup(server: PostgresServer) -> None:
    try:
        server.stop()
    finally:
        shutil.rmtree(server.root, ignore_errors=True)

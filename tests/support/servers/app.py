"""The demo app (app/events_service.py) run as a real process, the way its image runs it, and what its tests
set up for it: a database of its own, its environment, its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from infra import ROOT

from .common import free_port, port_open, stop_process, tail, wait_for
from .postgres import PostgresServer
from .tansu import TansuBroker

APP = ROOT / "app" / "events_service.py"
#: Only these of the test runner's variables reach the app: its configuration is what the test passes.
PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "SSL_CERT_FILE", "TZ")


@dataclass
class AppProcess:
    log: Path
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    returncode: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        self.port = self.port or free_port()
        env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        env.update({"HOST": "127.0.0.1", "PORT": str(self.port), **self.env})
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(APP)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        if wait:
            wait_for(lambda: port_open(self.port), f"app on {self.url}", 60, self.log, self.proc)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout)
        self.proc = None
        return self.returncode

    def stop(self) -> int | None:
        if self.proc is not None:
            self.returncode = stop_process(self.proc)
            self.proc = None
        return self.returncode

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=15, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kwargs)

    def logs(self) -> list[dict[str, Any]]:
        """The app's stdout, each line parsed as JSON (a non-JSON line fails the test that reads it)."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def log_tail(self) -> str:
        return tail(self.log)


def new_database(pg: PostgresServer) -> str:
    name = f"app_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # a generated identifier, not input
    return name


#: The app's deadline for each Postgres and Kafka operation it treats as a health check, a new connection included
#: (CHECK_TIMEOUT; the product's default is 2 s). Beside the VM tier on a busy host, the real Postgres could
#: take longer than that: in a fresh-clone run beside two busy loops, GET /events answered 503
#: "postgres" after 2176 ms and test_bad_input_app's control case failed. A healthy dependency must not be called
#: down because the host is busy; a stopped one is still refused at once (connection refused, not a timeout).
CHECK_TIMEOUT = "10"


def app_env(pg: PostgresServer, broker: TansuBroker, database: str, **extra: str) -> dict[str, str]:
    return {
        **pg.env(),
        "PGDATABASE": database,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "KAFKA_TOPIC": f"events-{database}",
        "APP_VERSION": "test-1",
        "CHECK_TIMEOUT": CHECK_TIMEOUT,
        **extra,
    }


def count_rows(pg: PostgresServer, database: str) -> int:
    with psycopg.connect(pg.dsn.rsplit("/", 1)[0] + "/" + database) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
        assert row is not None
        return int(row[0])

"""A product `Client` of the Nomad API double, as the client and deploy tests make it, and a session that notes
the limits the client gives each request."""

from __future__ import annotations

from typing import Any

import requests

from infra.nomad.client import Client, Settings
from support.doubles.nomad_api import NomadAPIDouble

#: A namespace-scoped deploy token: jobs, variables and node reads, but no agent:read (acl/policy.go).
DEPLOY_CAPS = {"node:read", "read-job", "submit-job", "list-jobs", "parse-job", "variables:read",
               "variables:write", "read-logs"}  # fmt: skip


def _no_sleep(seconds: float) -> None:
    """A retry's pause, skipped: the tests count attempts, not time."""


def client_for(double: NomadAPIDouble, **settings: Any) -> Client:
    """A client of `double`: no retries unless asked, its pauses skipped, and generous limits that only end a
    request the double never answers (a slow machine is not a failure). `settings`: infra.nomad.client.Settings."""
    limits: dict[str, Any] = {"connect_timeout": 30, "read_timeout": 120, "retries": 0}
    return Client(Settings(addr=double.url, **(limits | settings)), sleep=_no_sleep)


class TimeoutRecorder(requests.Session):
    """A requests session that notes the (connect, read) limits the client gives each request."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[tuple[float, float]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kw: Any) -> requests.Response:
        self.timeouts.append(tuple(kw["timeout"]))
        return super().request(method, url, *args, **kw)

"""A product `Client` of the Nomad API double, as the client and deploy tests make it."""

from __future__ import annotations

from typing import Any

from infra.nomad.client import Client, Settings
from support.doubles.nomad_api import NomadAPIDouble


def _no_sleep(seconds: float) -> None:
    """A retry's pause, skipped: the tests count attempts, not time."""


def client_for(double: NomadAPIDouble, **settings: Any) -> Client:
    """A client of `double`: no retries unless asked, its pauses skipped, and generous limits that only end a
    request the double never answers (a slow machine is not a failure). `settings`: infra.nomad.client.Settings."""
    limits: dict[str, Any] = {"connect_timeout": 30, "read_timeout": 120, "retries": 0}
    return Client(Settings(addr=double.url, **(limits | settings)), sleep=_no_sleep)

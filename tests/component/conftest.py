"""Fixtures of the component tier: real servers and tools, each started here and stopped by PID at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from servers import dockerd


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[dockerd.DockerEngine]:
    """A private dockerd (Debian's docker.io). If it cannot start, every test using it FAILS with the
    dockerd log: a missing engine is a broken environment, not a reason to skip."""
    engine = dockerd.started()
    yield engine
    dockerd.cleanup(engine)

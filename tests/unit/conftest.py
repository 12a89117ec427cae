"""The unit tier is pure Python: a test here that starts a process or opens a network socket fails at once,
naming what it tried, so a slow or environment-dependent test cannot hide in the fast tier (it belongs in
tests/component/)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class NotPure(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _pure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(what: str) -> Any:
        def _refuse(*args: Any, **kwargs: Any) -> Any:
            raise NotPure(
                f"unit tests may not {what} (args: {args[1:2]!r}); move the test to tests/component/"
            )

        return _refuse

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("start a process"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect a socket"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect a socket"))
    monkeypatch.setattr(socket.socket, "bind", refuse("bind a socket"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("resolve a name"))
    yield

"""A QMP client: one command over qemu's monitor socket (JSON lines: greeting, capabilities, command)."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infra.errors import VMError


def execute(
    socket_path: Path, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 5
) -> Any:
    """Run one QMP command; returns its `return` value. Raises VMError on errors."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(socket_path))
        except OSError as exc:
            raise VMError(f"cannot connect to QMP socket {socket_path}: {exc.strerror or exc}") from exc
        reader = s.makefile("rb")

        def receive() -> dict[str, Any]:
            while True:
                line = reader.readline()
                if not line:
                    raise VMError(f"QMP socket {socket_path} closed")
                msg: dict[str, Any] = json.loads(line)
                if "event" not in msg:
                    return msg

        def run(name: str, args: Mapping[str, Any] | None = None) -> Any:
            request: dict[str, Any] = {"execute": name}
            if args:
                request["arguments"] = dict(args)
            s.sendall(json.dumps(request).encode() + b"\n")
            reply = receive()
            if "error" in reply:
                raise VMError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

        receive()  # the greeting
        run("qmp_capabilities")
        return run(command, arguments)


__all__ = ["execute"]

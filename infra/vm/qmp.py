"""A QMP client: one command over qemu's monitor socket (JSON lines: greeting, capabilities, command).

Whatever the socket does — a qemu stopped with SIGSTOP (the kernel still accepts the connection, nobody
answers), a line that never ends, bytes that are not JSON, JSON of another shape — is a VMError naming
the socket, never an exception of the json or socket modules: callers (`vm.stop`) fall back to signals.
The whole exchange has one deadline, and no line longer than MAX_LINE is held in memory.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infra.core.errors import VMError

#: Longest QMP message read (qemu's greeting and the answers used here are well under 1 KiB; events such
#: as BLOCK_IO_ERROR a few hundred bytes). A longer line is not QMP.
MAX_LINE = 64 * 1024
#: Most asynchronous events skipped while waiting for one answer.
MAX_EVENTS = 256


def execute(
    socket_path: Path, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 5
) -> Any:
    """Run one QMP command; returns its `return` value. Raises VMError on every failure (no connection,
    no answer within `timeout` seconds for the whole exchange, a line over MAX_LINE, not JSON, wrong shape,
    a QMP error)."""
    end = time.monotonic() + timeout
    where = f"QMP socket {socket_path}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(socket_path))
        except OSError as exc:  # TimeoutError is an OSError too
            raise VMError(f"cannot connect to {where}: {exc.strerror or exc or 'timed out'}") from exc
        buffer = bytearray()

        def read_line() -> bytes:
            while True:
                newline = buffer.find(b"\n")
                if newline >= 0:
                    line = bytes(buffer[: newline + 1])
                    del buffer[: newline + 1]
                    return line
                if len(buffer) > MAX_LINE:
                    raise VMError(f"{where} sent a line longer than {MAX_LINE} bytes: not QMP")
                rest = end - time.monotonic()
                if rest <= 0:
                    raise VMError(f"{where}: no answer within {timeout:g}s (is qemu stopped or hung?)")
                s.settimeout(rest)
                try:
                    chunk = s.recv(min(65536, MAX_LINE + 1 - len(buffer)))
                except TimeoutError as exc:
                    raise VMError(
                        f"{where}: no answer within {timeout:g}s (is qemu stopped or hung?)"
                    ) from exc
                except OSError as exc:
                    raise VMError(f"{where}: {exc.strerror or exc}") from exc
                if not chunk:
                    raise VMError(f"{where} closed")
                buffer.extend(chunk)

        def receive() -> dict[str, Any]:
            for _ in range(MAX_EVENTS + 1):
                line = read_line()
                try:
                    msg = json.loads(line)
                except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
                    raise VMError(f"{where} sent something that is not JSON: {line[:80]!r}") from exc
                if not isinstance(msg, dict):
                    raise VMError(f"{where} sent JSON that is not a QMP message: {line[:80]!r}")
                if "event" not in msg:
                    return msg
            raise VMError(f"{where} sent more than {MAX_EVENTS} events and no answer")

        def run(name: str, args: Mapping[str, Any] | None = None) -> Any:
            request: dict[str, Any] = {"execute": name}
            if args:
                request["arguments"] = dict(args)
            try:
                s.sendall(json.dumps(request).encode() + b"\n")
            except OSError as exc:
                raise VMError(f"{where}: cannot send {name}: {exc.strerror or exc or 'timed out'}") from exc
            reply = receive()
            if "error" in reply:
                error = reply["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise VMError(f"QMP {name}: {str(desc)[:200]}")
            if "return" not in reply:
                raise VMError(f"{where} answered {name} without a return value: {str(reply)[:80]}")
            return reply["return"]

        greeting = receive()
        if "QMP" not in greeting:
            raise VMError(f"{where} did not greet as QMP: {str(greeting)[:80]}")
        run("qmp_capabilities")
        return run(command, arguments)


__all__ = ["MAX_LINE", "execute"]

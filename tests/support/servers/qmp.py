"""A fake QMP server on a unix socket, for what a real qemu will not do on demand: a line that never ends,
garbage, JSON of the wrong shape, a guest paused on a disk error (`io-error`).

It runs in a thread of the test process and counts what it sent (`sent`): a test shows a bound by counting
bytes, not by timing. Modes:
- "no-newline": after the greeting's first bytes, an endless line (stops at STREAM_CAP bytes);
- "garbage": bytes that are not JSON, then a newline;
- "shape:<json>": that JSON line instead of the greeting (e.g. `[]`, `1`, `{"error": "x"}`);
- "silent": accepts and never sends a byte (a qemu stopped with SIGSTOP does the same);
- "status:<run state>": a well-behaved QMP (greeting, capabilities) whose `query-status` answers that
  run state (qapi/run-state.json RunState: running, paused, io-error, ...) and whose other commands
  answer `{}`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path

#: The most the endless line sends before giving up (far above any bound the client should hold).
STREAM_CAP = 64 * 1024 * 1024

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}


class FakeQMP:
    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.mode = mode
        self.sent = 0
        self.commands: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"fake-qmp-{mode}")
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(10)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> FakeQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                self._talk(conn)

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def _talk(self, conn: socket.socket) -> None:
        mode, _, arg = self.mode.partition(":")
        if mode == "silent":
            while not self._closed and conn.recv(4096):
                pass
            return
        if mode == "no-newline":
            self._send(conn, b'{"QMP": {"version": "')
            chunk = b"x" * 65536
            while self.sent < STREAM_CAP and not self._closed:
                self._send(conn, chunk)  # raises once the client has closed
            return
        if mode == "garbage":
            self._send(conn, b"\x00\xff not json at all }{\n")
            return
        if mode == "shape":
            self._send(conn, arg.encode() + b"\n")
            conn.recv(4096)
            self._send(conn, arg.encode() + b"\n")
            return
        if mode == "status":
            self._send(conn, json.dumps(GREETING).encode() + b"\n")
            reader = conn.makefile("rb")
            for line in reader:
                request = json.loads(line)
                name = request.get("execute", "")
                self.commands.append(name)
                if name == "query-status":
                    answer = {"running": arg == "running", "singlestep": False, "status": arg}
                else:
                    answer = {}
                self._send(conn, json.dumps({"return": answer}).encode() + b"\n")
            return
        raise ValueError(f"unknown mode {self.mode}")

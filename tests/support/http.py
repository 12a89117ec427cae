"""Small HTTP servers for the client's limits: a server that answers too slowly to finish."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class DribblingServer:
    """On 127.0.0.1: headers at once, then one byte of body a second for `seconds` s, to every connection.
    Every read succeeds, so only a deadline over the whole request ends it. `with DribblingServer(200) as
    url:` or start()/stop()."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.listener = socket.socket()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> str:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.thread.start()
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        self.thread.join(timeout=5)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._dribble, args=(conn,), daemon=True).start()

    def _dribble(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {self.seconds}\r\n\r\n".encode()
            )
            for _ in range(self.seconds):
                if self.stopping.wait(1.0):
                    return
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

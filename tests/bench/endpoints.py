"""The local end of a throughput run: a TCP sink/source, plus timed push and pull."""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Literal

__all__ = ["CHUNK", "Endpoint", "pull", "push"]

CHUNK = 1 << 20
_ZEROS = memoryview(bytes(CHUNK))

Mode = Literal["sink", "source"]


class Endpoint:
    """Listens on a free loopback port. In ``sink`` mode every connection is read to EOF
    and reports (bytes, time of EOF); in ``source`` mode it is sent ``nbytes`` and closed.
    This is where the device's local service would be."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self.mode: Mode = "sink"
        self.nbytes = 0
        self.results: queue.Queue[tuple[int, float]] = queue.Queue()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, self.mode, self.nbytes),
                             daemon=True).start()

    def _serve(self, conn: socket.socket, mode: Mode, nbytes: int) -> None:
        with conn:
            try:
                if mode == "sink":
                    self.results.put(_drain(conn))
                else:
                    _send(conn, nbytes)
                    conn.shutdown(socket.SHUT_WR)
            except OSError:
                self.results.put((-1, time.perf_counter()))

    def close(self) -> None:
        self._closed = True
        self._sock.close()


def _drain(conn: socket.socket) -> tuple[int, float]:
    buf = bytearray(CHUNK)
    got = 0
    while True:
        n = conn.recv_into(buf)
        if not n:
            return got, time.perf_counter()
        got += n


def _send(conn: socket.socket, nbytes: int) -> None:
    left = nbytes
    while left > 0:
        n = min(left, CHUNK)
        conn.sendall(_ZEROS[:n])
        left -= n


def push(port: int, nbytes: int, sink: Endpoint, timeout: float = 300) -> float:
    """Send ``nbytes`` into ``port``; seconds until the sink saw all of them and EOF."""
    sink.mode = "sink"
    while not sink.results.empty():
        sink.results.get_nowait()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        _send(s, nbytes)
        s.shutdown(socket.SHUT_WR)
        got, t1 = sink.results.get(timeout=timeout)
    if got != nbytes:
        raise RuntimeError(f"push through port {port}: sink got {got} of {nbytes} bytes")
    return t1 - t0


def pull(port: int, nbytes: int, source: Endpoint, timeout: float = 300) -> float:
    """Read ``nbytes`` that the source sends back through ``port``; seconds until EOF."""
    source.mode, source.nbytes = "source", nbytes
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        got, t1 = _drain(s)
    if got != nbytes:
        raise RuntimeError(f"pull through port {port}: got {got} of {nbytes} bytes")
    return t1 - t0

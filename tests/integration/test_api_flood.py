"""A slowloris flood on the manager API must not stop /v1/health from answering.

The manager runs as on the appliance (its own process) with a low open-file limit, so
that the flood can reach it: before, uvicorn kept every slow connection forever, and
once the descriptors were gone nothing answered at all.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from test_tunnel_layouts import Appliance

from support import free_port

NOFILE = 400
SLOW_CONNECTIONS = 600


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    s = Appliance(dir=tmp_path / "st", broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), manager_nofile=NOFILE)
    s.start()
    try:
        yield s
    finally:
        s.close()


class Slowloris:
    """Keeps SLOW_CONNECTIONS connections each sending one byte of a request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.closed_by_server = 0
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self) -> socket.socket | None:
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", self.port))
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            s.close()
            return None
        s.setblocking(False)
        self.opened += 1
        return s

    def _run(self) -> None:
        conns: list[socket.socket] = []
        while not self.stop.is_set():
            alive = []
            for s in conns:
                try:
                    if s.recv(4096) == b"":
                        raise ConnectionResetError
                    raise ConnectionResetError  # any answer ends it too
                except BlockingIOError:
                    try:
                        s.send(b"X")  # one more header byte: never a complete request
                        alive.append(s)
                    except OSError:
                        self.closed_by_server += 1
                        s.close()
                except OSError:
                    self.closed_by_server += 1
                    s.close()
            conns = alive
            while len(conns) < SLOW_CONNECTIONS and not self.stop.is_set():
                s = self._open()
                if s is None:
                    break
                conns.append(s)
            time.sleep(0.5)
        for s in conns:
            s.close()


def health(port: int) -> int:
    # 30 s only bounds a hang (a manager out of descriptors never answers); on two loaded
    # CI cores an answer can take seconds while 600 sockets are being served
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=30) as r:
        return int(r.status)


def test_slowloris_does_not_stop_health(appliance: Appliance) -> None:
    assert health(appliance.api_port) == 200
    flood = Slowloris(appliance.api_port)
    try:
        time.sleep(3)  # the flood is at full strength: more connections than descriptors
        answered = []
        for _ in range(10):
            answered.append(health(appliance.api_port))
            time.sleep(0.5)
        assert answered == [200] * 10
        assert flood.opened > NOFILE  # it did try to take every descriptor
        assert flood.closed_by_server > 0  # and the longest-waiting were closed
    finally:
        flood.stop.set()
        flood.thread.join(10)
    assert appliance.cli("device", "list").returncode == 0

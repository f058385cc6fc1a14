"""A pre-auth flooder for tests: many TCP connections from many 127.0.0.x source addresses.

Run as a separate process (``python tests/flood.py PORT --sources 2-21 ...``) so the
flood does not share the GIL with the server under test. Each source keeps up to
``--hold`` connections open, re-opening those the server closes, as fast as ``--rate``
new connections a second allows. ``--mode`` says what each connection sends: ``banner``
(an SSH version line, then nothing), ``idle`` (nothing), ``garbage`` (random bytes, then
hang up). Prints one JSON line of counters on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time


def _closed(s: socket.socket) -> bool:
    try:
        while True:  # read what the server sent (its banner), then see EOF or nothing
            if not s.recv(65536, socket.MSG_DONTWAIT):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def flood_source(addr: str, port: int, mode: str, hold: int, rate: float, until: float,
                 counts: dict[str, int]) -> None:
    conns: list[socket.socket] = []
    gap = 1.0 / rate
    while time.monotonic() < until:
        alive = []
        for s in conns:
            if _closed(s):
                s.close()
                counts["closed_by_server"] += 1
            else:
                alive.append(s)
        conns = alive
        if len(conns) >= hold:
            time.sleep(0.05)
            continue
        s = socket.socket()
        s.settimeout(2)
        try:
            s.bind((addr, 0))
            s.connect(("127.0.0.1", port))
            if mode == "banner":
                s.sendall(b"SSH-2.0-flood\r\n")
            elif mode == "garbage":
                s.sendall(os.urandom(512))
            counts["opened"] += 1
        except OSError:
            counts["failed"] += 1
            s.close()
            time.sleep(gap)
            continue
        if mode == "garbage":
            s.close()
        else:
            s.setblocking(False)  # _closed() must never wait
            conns.append(s)
        time.sleep(gap)
    for s in conns:
        s.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--sources", default="2-2", help="LOW-HIGH: 127.0.0.LOW..127.0.0.HIGH")
    p.add_argument("--mode", choices=("banner", "idle", "garbage"), default="banner")
    p.add_argument("--hold", type=int, default=50, help="connections kept open per source")
    p.add_argument("--rate", type=float, default=100.0, help="new connections/s per source")
    p.add_argument("--duration", type=float, default=30.0)
    a = p.parse_args()
    lo, hi = (int(x) for x in a.sources.split("-"))
    until = time.monotonic() + a.duration
    counts = {"opened": 0, "failed": 0, "closed_by_server": 0}
    threads = [threading.Thread(target=flood_source, daemon=True,
                                args=(f"127.0.0.{n}", a.port, a.mode, a.hold, a.rate, until,
                                      counts))
               for n in range(lo, hi + 1)]
    for t in threads:
        t.start()
    print("flooding", flush=True)
    for t in threads:
        t.join()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()

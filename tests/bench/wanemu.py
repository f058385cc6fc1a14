"""A packet-level WAN emulator in user space, for kernels without ``sch_netem``.

Two TUN interfaces joined by this process: one stays on the host, the other is moved
into the device's network namespace (its file descriptor keeps working there). Each IP
packet read from one side is written to the other after netem's treatment, per
direction: serialization at ``rate`` (a drop-tail queue of ``limit`` packets), a random
``loss``, and a one-way ``delay`` plus normal ``jitter``, departures kept in order (as
netem does when it also has a rate). The kernels at both ends run real TCP over it, so
slow start, the congestion window, loss recovery and the SSH windows all see the link.

    python -m tests.bench.wanemu HOST_IF DEV_IF NETNS HOST_IP DEV_IP
    (then writes "ready" on stdout; reads "MBIT DELAY_MS JITTER_MS LOSS_PCT LIMIT" lines
    on stdin to change the profile; EOF stops it)
"""

from __future__ import annotations

import collections
import fcntl
import heapq
import os
import random
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


@dataclass
class Shape:
    mbit: float = 0.0  # 0: no rate limit
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    limit: int = 1000


class Direction:
    """One way of the link: rate, queue, loss, delay; ``due`` holds (time, seq, packet)."""

    def __init__(self, out_fd: int) -> None:
        self.out = out_fd
        self.busy_until = 0.0  # the serializer's next free moment
        self.last_departure = 0.0
        self.queue: collections.deque[float] = collections.deque()  # serialization ends
        self.due: list[tuple[float, int, bytes]] = []
        self.seq = 0
        self.drops = 0

    def push(self, pkt: bytes, now: float, s: Shape, rng: random.Random) -> None:
        while self.queue and self.queue[0] <= now:
            self.queue.popleft()
        if len(self.queue) >= s.limit:
            self.drops += 1  # tail drop: the modem's buffer is full
            return
        if s.loss_pct and rng.random() * 100 < s.loss_pct:
            self.drops += 1
            return
        start = max(now, self.busy_until)
        done = start + (len(pkt) * 8 / (s.mbit * 1e6) if s.mbit else 0.0)
        self.busy_until = done
        self.queue.append(done)
        delay = s.delay_ms / 1000
        if s.jitter_ms:
            delay = max(0.0, delay + rng.gauss(0, s.jitter_ms / 1000))
        t = max(done + delay, self.last_departure)  # in order, as netem with a rate
        self.last_departure = t
        self.seq += 1
        heapq.heappush(self.due, (t, self.seq, pkt))

    def flush(self, now: float) -> float:
        while self.due and self.due[0][0] <= now:
            _, _, pkt = heapq.heappop(self.due)
            try:
                os.write(self.out, pkt)
            except OSError:
                pass  # the far side went away
        return self.due[0][0] if self.due else float("inf")


def main(argv: list[str]) -> int:
    host_if, dev_if, ns, host_ip, dev_ip = argv
    hfd, dfd = open_tun(host_if), open_tun(dev_if)

    def ip(*a: str) -> None:
        subprocess.run(["ip", *a], check=True, capture_output=True)

    ip("link", "set", dev_if, "netns", ns)
    ip("addr", "add", host_ip, "peer", dev_ip, "dev", host_if)
    ip("link", "set", host_if, "up")
    ip("-n", ns, "addr", "add", dev_ip, "peer", host_ip, "dev", dev_if)
    ip("-n", ns, "link", "set", dev_if, "up")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "route", "add", "default", "via", host_ip)
    shape = Shape()
    lock = threading.Lock()
    stop = threading.Event()

    def control() -> None:
        nonlocal shape
        for line in sys.stdin:
            f = line.split()
            if len(f) == 5:
                with lock:
                    shape = Shape(float(f[0]), float(f[1]), float(f[2]), float(f[3]), int(f[4]))
                print("ok", flush=True)
        stop.set()

    threading.Thread(target=control, daemon=True).start()
    up, down = Direction(hfd), Direction(dfd)  # up: device -> host
    rng = random.Random(12)
    print("ready", flush=True)
    nxt = float("inf")
    while not stop.is_set():
        timeout = min(0.2, max(0.0, nxt - time.monotonic()))
        r, _, _ = select.select([hfd, dfd], [], [], timeout)
        now = time.monotonic()
        with lock:
            s = shape
        for fd in r:
            d = up if fd == dfd else down
            for _ in range(64):  # drain what is there, then serve departures
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                d.push(pkt, now, s, rng)
        now = time.monotonic()
        nxt = min(up.flush(now), down.flush(now))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The one copy of the test/bench/demo plumbing: free ports, polling, stopping processes."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["device_link", "free_port", "read_pid", "stop_proc", "wait_for", "wait_port"]


#: the tunnel servers' default device-port pool (tunnel.port_range): a port picked
#: for a service there was once given to a device before the service bound it
_POOL = (20000, 29999)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A currently free TCP port, below the kernel's ephemeral range.

    Services bind the port a moment (for RabbitMQ, seconds) after it is picked. A port from
    the ephemeral range can be taken meanwhile by any outgoing connection on the machine; a
    CI run lost a port that way. Below that range only another listener can take it, and
    the random pick makes two parallel runs colliding unlikely. Nor from the tunnel's
    device-port pool, which tunnel servers of the same run allocate from.
    """
    top = _ephemeral_low()
    bottom = max(1024, top - 22000)
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(bottom, top)
        if _POOL[0] <= port <= _POOL[1]:
            continue  # a tunnel server of this run may hand it to a device meanwhile
        with socket.socket() as s:
            try:
                s.bind(("", port))  # all addresses: a listener on any of them counts
            except OSError:
                continue
        return port


def read_pid(path: Path) -> int | None:
    """The pid in a daemon's pid file, or None while it is missing or half-written
    (Mosquitto truncates, then writes: a poll can see the file empty)."""
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15) -> None:
    """Until something accepts on ``host:port``; always tries at least once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listening on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


def wait_for(cond: Callable[[], object], what: str, timeout: float = 30,
             interval: float = 0.1) -> Any:
    """Poll ``cond()`` until it is truthy and return that value; the timeout only bounds a
    hang (TimeoutError naming ``what``), it is never asserted on."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def stop_proc(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal ``proc`` (SIGTERM by default), give it 10 s, then kill it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def device_link(ns: str, veth: str, host_ip: str, dev_ip: str, *,
                no_ipv6: bool = False) -> None:
    """A /30 veth from the host (``veth``, ``host_ip``) into the existing netns ``ns``
    (``eth0``, ``dev_ip``, default route via the host). ``no_ipv6``: none on the link, so
    that interface counters see only the device's own traffic. Raises CalledProcessError."""
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    if no_ipv6:
        run("sysctl", "-qw", f"net.ipv6.conf.{veth}.disable_ipv6=1")
        run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    run("ip", "addr", "add", f"{host_ip}/30", "dev", veth)
    run("ip", "link", "set", veth, "up")
    run("ip", "-n", ns, "addr", "add", f"{dev_ip}/30", "dev", "eth0")
    run("ip", "-n", ns, "link", "set", "eth0", "up")
    run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "-n", ns, "route", "add", "default", "via", host_ip)

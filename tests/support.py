"""The one copy of the test/bench/demo plumbing: free ports, polling, stopping processes."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["free_port", "read_pid", "stop_proc", "wait_for", "wait_port"]


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel picks; tiny race accepted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

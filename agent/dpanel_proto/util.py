"""Small helpers both sides use: ``host:port`` parsing, atomic writes, jittered backoff."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Optional, Union

from .wire import DecodeError

__all__ = ["Backoff", "atomic_write", "parse_hostport", "skip_none_auth"]


def parse_hostport(value: str, what: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` -> (host, port); errors name ``what``."""
    host, port_s = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise DecodeError(f"{what}: unclosed '[' in {value!r}")
        host, port_s = value[1:end], value[end + 2:] if value[end + 1:end + 2] == ":" else ""
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    if not host:
        raise DecodeError(f"{what}: no host in {value!r}")
    if not port_s:
        return host, default_port
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise DecodeError(f"{what}: port {port_s!r} is not 1-65535")
    return host, int(port_s)


def atomic_write(path: Union[str, Path], data: Union[str, bytes], mode: int = 0o600, *,
                 make_parents: bool = False, owner: Optional[tuple[int, int]] = None) -> None:
    """Write via a temp file in the same directory + fsync + rename: readers and a power
    cut (an SD card yanked out) only ever see the old or the new file, never half. The
    mode (and ``owner``, a (uid, gid), when given) are set before any byte is written, so
    a secret is never readable by others and a service never sees the file with the
    wrong owner."""
    p = Path(path)
    if make_parents:
        p.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=str(p.parent))
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(str(p.parent), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class Backoff:
    """Exponential backoff with full jitter: the n-th wait is uniform in [0, d], where d =
    lo * 2**n capped at hi. Thousands of devices behind one broker that restarts do not
    all come back in the same second: each retry spreads the herd over its whole window
    (the "equal jitter" [d/2, d] used before packs twice as many into each second), and
    no wait is ever longer than ``hi``. tests/unit/proto/test_backoff_spread.py checks
    the spread of 10,000 schedules.

    ``floor=0.5`` makes it "equal jitter" ([d/2, d]): for retries after a refusal, which
    are no herd but one client that must settle to a slow pace; with full jitter two
    near-zero waits in a row let a revoked device redial at once again."""

    def __init__(self, lo: float, hi: float, floor: float = 0.0) -> None:
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor: {floor!r} is not within 0-1")
        self.lo, self.hi, self.floor = lo, hi, floor
        self.failures = 0

    def next(self) -> float:
        d = min(self.hi, self.lo * (2 ** min(self.failures, 30)))
        self.failures += 1
        return random.uniform(d * self.floor, d)  # noqa: S311 (jitter, not crypto)

    def reset(self) -> None:
        self.failures = 0


def skip_none_auth(conn: object, method: bytes) -> None:
    """Start an asyncssh client's login with ``method`` rather than its ``none`` probe: one
    round trip less per login (300 ms on LTE), where the caller knows what the server
    accepts. RFC 4252 lets a client open with any method. asyncssh keeps the list in a
    private attribute; if that ever changes, this does nothing and the login keeps its
    extra round trip. Duck-typed, so that this package still imports no asyncssh."""
    if getattr(conn, "_auth_methods", None) == [b"none"]:
        conn._auth_methods = [method]  # type: ignore[attr-defined]

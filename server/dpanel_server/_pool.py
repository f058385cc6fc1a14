"""The tunnel's port pool: random free ports from a range, with sticky per-device reservations."""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from typing import Callable, Collection, Optional

__all__ = ["PoolExhausted", "PortPool"]

#: Random probes before falling back to a scan of the whole range. With the pool at most
#: 3/4 full, 32 probes all missing has probability < 1e-4, and the scan is O(range) only.
_PROBES = 32


class PoolExhausted(Exception):
    """No port of the pool can be handed out (all bound, or all excluded by the caller)."""


class PortPool:
    """Ports ``lo..hi`` (inclusive) handed out at random, so a port says nothing of its device.

    A port is in exactly one of three states:

    * *taken* — bound for a device right now (``_taken``: port -> device);
    * *reserved* — released less than ``sticky_seconds`` ago; it goes back to the same
      device if that device comes back, and to others only when nothing else is free
      (frp-style: a reconnecting device keeps its address, so a manager's cached
      ``localhost:PORT`` stays right);
    * *free* — everything else. Free ports are not stored at all, so memory is
      proportional to the ports in use, not to the size of the range.
    """

    def __init__(self, lo: int, hi: int, *, sticky_seconds: float = 86400.0,
                 rng: Optional[random.Random] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"port range {lo}-{hi}: need 1 <= low <= high <= 65535")
        self.lo, self.hi = lo, hi
        self._sticky_seconds = sticky_seconds
        # SystemRandom: ports are not guessable from earlier allocations.
        self._rng = rng if rng is not None else random.SystemRandom()
        self._clock = clock
        self._taken: dict[int, str] = {}
        #: port -> (device, expiry); insertion order == release order == expiry order
        self._reserved: OrderedDict[int, tuple[str, float]] = OrderedDict()
        #: device -> its most recent port (taken or reserved)
        self._sticky: dict[str, int] = {}

    # ------------------------------------------------------------------ queries

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    @property
    def in_use(self) -> int:
        return len(self._taken)

    @property
    def reserved(self) -> int:
        self._expire()
        return len(self._reserved)

    @property
    def free(self) -> int:
        """Ports that can still be handed out (reserved ones count: they can be reused)."""
        return self.size - len(self._taken)

    def owner(self, port: int) -> Optional[str]:
        return self._taken.get(port)

    def sticky_port(self, device: str) -> Optional[int]:
        """The port ``device`` held last, if it is still its own (taken or reserved)."""
        self._expire()
        port = self._sticky.get(device)
        if port is None:
            return None
        if self._taken.get(port) == device:
            return port
        held = self._reserved.get(port)
        return port if held is not None and held[0] == device else None

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    # ------------------------------------------------------------------ changes

    def acquire(self, device: str, *, avoid: Collection[int] = ()) -> int:
        """Take a port for ``device``: its reserved port if it has one, else a random free
        one, else the least recently released reservation of another device.

        ``avoid`` lists ports the caller just failed to bind (held by another process).
        Raises :class:`PoolExhausted` when nothing is left.
        """
        self._expire()
        mine = self._sticky.get(device)
        if mine is not None and mine not in avoid:
            held = self._reserved.get(mine)
            if held is not None and held[0] == device:
                del self._reserved[mine]
                return self._take(mine, device)
        port = self._random_free(avoid)
        if port is None:
            port = self._steal_reserved(avoid)
        if port is None:
            raise PoolExhausted(
                f"port pool exhausted: {len(self._taken)} of {self.size} ports "
                f"({self.lo}-{self.hi}) in use"
            )
        return self._take(port, device)

    def claim(self, device: str, port: int) -> bool:
        """Take exactly ``port`` for ``device`` if it is that device's own reserved port."""
        self._expire()
        held = self._reserved.get(port)
        if held is None or held[0] != device:
            return False
        del self._reserved[port]
        self._take(port, device)
        return True

    def release(self, port: int, *, sticky: bool = True) -> None:
        """Give ``port`` back. With ``sticky`` it stays reserved for its device for
        ``sticky_seconds``; without (e.g. it never got bound) it is plainly free."""
        device = self._taken.pop(port, None)
        if device is None:
            return
        if sticky and self._sticky_seconds > 0 and self._sticky.get(device) == port:
            self._reserved[port] = (device, self._clock() + self._sticky_seconds)
        elif self._sticky.get(device) == port:
            del self._sticky[device]

    def export(self) -> dict[str, int]:
        """device -> port for every device that holds or may reclaim a port (to persist)."""
        self._expire()
        out = {dev: port for dev, port in self._sticky.items()
               if self._taken.get(port) == dev or self._reserved.get(port, ("",))[0] == dev}
        return dict(sorted(out.items()))

    def preload(self, ports: dict[str, int]) -> int:
        """Reserve ports from :meth:`export` of an earlier run (fresh expiry). Entries out of
        range or clashing with what is already known are skipped; returns how many were kept."""
        if self._sticky_seconds <= 0:
            return 0
        expiry = self._clock() + self._sticky_seconds
        kept = 0
        for device, port in ports.items():
            if port not in self or self._unavailable(port, ()) or device in self._sticky:
                continue
            self._reserved[port] = (device, expiry)
            self._sticky[device] = port
            kept += 1
        return kept

    # ------------------------------------------------------------------ internals

    def _take(self, port: int, device: str) -> int:
        self._taken[port] = device
        self._sticky[device] = port
        return port

    def _expire(self) -> None:
        now = self._clock()
        while self._reserved:
            port, (device, expiry) = next(iter(self._reserved.items()))
            if expiry > now:
                break
            self._forget_reservation(port, device)

    def _forget_reservation(self, port: int, device: str) -> None:
        del self._reserved[port]
        if self._sticky.get(device) == port:
            del self._sticky[device]

    def _unavailable(self, port: int, avoid: Collection[int]) -> bool:
        return port in self._taken or port in self._reserved or port in avoid

    def _random_free(self, avoid: Collection[int]) -> Optional[int]:
        busy = len(self._taken) + len(self._reserved)
        if busy * 4 <= self.size * 3:
            for _ in range(_PROBES):
                port = self._rng.randint(self.lo, self.hi)
                if not self._unavailable(port, avoid):
                    return port
        # Nearly full (or unlucky): an exact scan, still a uniform pick among the free.
        candidates = [p for p in range(self.lo, self.hi + 1) if not self._unavailable(p, avoid)]
        return self._rng.choice(candidates) if candidates else None

    def _steal_reserved(self, avoid: Collection[int]) -> Optional[int]:
        for port, (device, _expiry) in self._reserved.items():
            if port not in avoid:
                self._forget_reservation(port, device)
                return port
        return None

"""Who may hold an unauthenticated slot on the tunnel: per-source limits, eviction, penalties.

The attack: anyone on the internet opens TCP connections to :2220 and sends a banner (or
nothing), each holding a pre-auth slot until the login timeout. With one global cap and
no per-source limit, ~10 such connections a second locked every device out. asyncssh has
no MaxStartups, so the tunnel decides itself, at accept, in O(sources) at worst:

1. **Penalised source** -> refused at once (OpenSSH ``PerSourcePenalties``): every
   connection from a source that ends without authenticating adds ``penalty_noauth``
   seconds to the source's score, one that failed a password ``penalty_authfail``; the
   score decays in real time. When it reaches ``penalty_min`` the source is refused for
   the whole accumulated score (at most ``penalty_max``). A client that keeps failing
   (a revoked agent redialling 150 times a second) so costs about ``penalty_min /
   penalty_authfail`` failed logins per ``penalty_min`` seconds; the rest are refused
   before any key exchange. Connections we refuse or drop ourselves add nothing.
2. **Per-source random early drop** (OpenSSH ``MaxStartups start:rate:full``, applied to
   one source's pending connections): from ``start`` pending connections of that source,
   a new one is refused with probability ``rate`` %, rising linearly to 100 % at
   ``full``. A device has one pending connection at a time; a flooder from one address
   holds at most ``full`` slots.
3. **Global cap with eviction, not refusal**: when ``max_unauthenticated`` connections are
   pending, refusing newcomers is exactly the lock-out the attacker wants. Instead the
   newcomer displaces the oldest connection of the source holding the most pending
   connections (one still in key exchange before one already authenticating), provided
   that source holds more than the newcomer's own source. So a device whose address holds
   fewer pending connections than the busiest address always gets a slot, and keeps it as
   long as it needs to log in; only an attacker with more than ``max_unauthenticated``
   addresses, each opening a connection faster than a device can log in, can still delay
   it. Nothing in-process defends against that; it needs filtering upstream.

Why not a global random early drop as in OpenSSH: it protects the server but not its
users; at ``full`` it refuses every device, which is this attack's goal. Addresses are
IPv4 /32 and IPv6 /64 (one customer's allocation), as in OpenSSH.

Known cost, as with OpenSSH: devices sharing an address (NAT) with a flooder share its
penalty and its per-source budget; nothing before authentication tells them apart.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Literal, Optional

from .errors import ConfigError

__all__ = ["Outcome", "PreAuthGate", "Startups", "source_key"]

#: How a pending connection ended: logged in, failed a password, neither (timeout, garbage,
#: hang-up, evicted), or refused/dropped by us (no penalty: it is our decision, not theirs).
Outcome = Literal["auth", "authfail", "noauth", "ours"]

#: Sources with a penalty remembered at once; beyond it the expired ones are purged and,
#: if still full, new penalties are not recorded (memory is bounded; the other limits stay).
_MAX_PENALISED = 65536


def source_key(host: str) -> str:
    """The address a limit applies to: IPv4 /32, IPv6 /64 (IPv4-mapped IPv6 as IPv4)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(frozen=True)
class Startups:
    """``start:rate:full`` as in OpenSSH's MaxStartups."""

    start: int
    rate: int
    full: int

    @classmethod
    def parse(cls, text: str, what: str = "per_source_startups") -> Startups:
        try:
            start, rate, full = (int(x) for x in text.split(":"))
        except ValueError:
            raise ConfigError(f"{what}: {text!r} is not START:RATE:FULL (e.g. 5:30:20)") from None
        if not (1 <= start <= full and 0 <= rate <= 100):
            raise ConfigError(f"{what}: {text!r} needs 1 <= START <= FULL and 0 <= RATE <= 100")
        return cls(start, rate, full)

    def drop_probability(self, pending: int) -> float:
        if pending < self.start:
            return 0.0
        if pending >= self.full:
            return 1.0
        span = self.full - self.start
        return (self.rate + (100 - self.rate) * (pending - self.start) / span) / 100


class _Pending:
    __slots__ = ("authing", "source", "started")

    def __init__(self, source: str, started: float) -> None:
        self.source = source
        self.started = started
        self.authing = False


class _Penalty:
    __slots__ = ("blocked_until", "until")

    def __init__(self) -> None:
        self.until = 0.0          # score = until - now
        self.blocked_until = 0.0


class PreAuthGate:
    """Bookkeeping of pending (unauthenticated) connections; no I/O, so unit-testable."""

    def __init__(self, *, max_unauthenticated: int, per_source: Startups,
                 penalty_authfail: float = 5.0, penalty_noauth: float = 1.0,
                 penalty_min: float = 15.0, penalty_max: float = 60.0,
                 rng: Optional[random.Random] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_unauthenticated = max_unauthenticated
        self.per_source = per_source
        self.penalty_authfail = penalty_authfail
        self.penalty_noauth = penalty_noauth
        self.penalty_min = penalty_min
        self.penalty_max = penalty_max
        self._rng = rng if rng is not None else random.SystemRandom()
        self._clock = clock
        self._pending: dict[Hashable, _Pending] = {}
        #: source -> its pending connections, oldest first
        self._by_source: dict[str, OrderedDict[Hashable, None]] = {}
        self._penalties: dict[str, _Penalty] = {}

    # ------------------------------------------------------------------ queries

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_from(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def penalised(self, source: str) -> float:
        """Seconds ``source`` is still refused for (0: not refused)."""
        p = self._penalties.get(source)
        return max(0.0, p.blocked_until - self._clock()) if p is not None else 0.0

    @property
    def penalised_sources(self) -> int:
        now = self._clock()
        return sum(1 for p in self._penalties.values() if p.blocked_until > now)

    # ------------------------------------------------------------------ decisions

    def admit(self, handle: Hashable, source: str
              ) -> tuple[Optional[str], Optional[Hashable]]:
        """Decide on a new connection. Returns ``(refusal, victim)``: ``refusal`` is why it
        is refused (``None``: admitted, and now pending); ``victim`` is a pending
        connection the caller must drop to make room (already forgotten here)."""
        left = self.penalised(source)
        if left > 0:
            return f"penalised for {left:.0f} s after failed or abandoned logins", None
        mine = self.pending_from(source)
        p = self.per_source.drop_probability(mine)
        if p >= 1.0 or (p > 0 and self._rng.random() < p):
            return f"{mine} unauthenticated connections from this address", None
        victim: Optional[Hashable] = None
        if len(self._pending) >= self.max_unauthenticated:
            victim = self._pick_victim(mine)
            if victim is None:
                return (f"too many unauthenticated connections ({len(self._pending)}), "
                        "and this address holds as many as any other"), None
            self._forget(victim)
        self._pending[handle] = _Pending(source, self._clock())
        self._by_source.setdefault(source, OrderedDict())[handle] = None
        return None, victim

    def authing(self, handle: Hashable) -> None:
        """The connection finished its key exchange and asked to authenticate."""
        entry = self._pending.get(handle)
        if entry is not None:
            entry.authing = True

    def done(self, handle: Hashable, outcome: Outcome, source: Optional[str] = None) -> None:
        """A connection stopped being pending (idempotent). ``source`` is needed for a
        victim the gate already forgot."""
        entry = self._forget(handle)
        src = entry.source if entry is not None else source
        if src is None:
            return
        if outcome == "authfail":
            self._penalise(src, self.penalty_authfail)
        elif outcome == "noauth":
            self._penalise(src, self.penalty_noauth)

    # ------------------------------------------------------------------ internals

    def _pick_victim(self, newcomer_pending: int) -> Optional[Hashable]:
        best: Optional[OrderedDict[Hashable, None]] = None
        best_key: tuple[int, float] = (newcomer_pending, 0.0)
        for conns in self._by_source.values():
            n = len(conns)
            if n < best_key[0]:
                continue
            oldest = self._pending[next(iter(conns))].started
            # most pending first; among equals, the one whose oldest waited longest
            key = (n, -oldest)
            if n > newcomer_pending and (best is None or key > best_key):
                best, best_key = conns, key
        if best is None:
            return None
        for handle in best:  # oldest first: one still in key exchange before one authing
            if not self._pending[handle].authing:
                return handle
        return next(iter(best))

    def _forget(self, handle: Hashable) -> Optional[_Pending]:
        entry = self._pending.pop(handle, None)
        if entry is not None:
            conns = self._by_source.get(entry.source)
            if conns is not None:
                conns.pop(handle, None)
                if not conns:
                    del self._by_source[entry.source]
        return entry

    def _penalise(self, source: str, amount: float) -> None:
        if amount <= 0:
            return
        now = self._clock()
        p = self._penalties.get(source)
        if p is None:
            if len(self._penalties) >= _MAX_PENALISED:
                self._purge(now)
                if len(self._penalties) >= _MAX_PENALISED:
                    return
            p = self._penalties[source] = _Penalty()
        p.until = min(max(p.until, now) + amount, now + self.penalty_max)
        if p.until - now >= self.penalty_min:
            p.blocked_until = max(p.blocked_until, p.until)

    def _purge(self, now: float) -> None:
        for source in [s for s, p in self._penalties.items()
                       if p.until <= now and p.blocked_until <= now]:
            del self._penalties[source]

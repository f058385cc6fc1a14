"""Manager replicas' leases: each named replica bumps its row in the registry every few
seconds; a live replica that sees another's row stop moving settles the job and rollout
parts the dead one left ``running``/``offered`` (jobs.py, updates.py), so a replica that
dies for good does not leave them so forever.

Liveness is judged on the observer's own monotonic clock: a replica is dead when its
``beat`` counter has not changed for :data:`LEASE_TTL` seconds *as this process saw it*.
No wall clock is compared across hosts, so clock skew between replicas cannot make a
live one look dead (or a dead one live). A fresh observer first waits a full TTL.

Worst case from a replica's death until its parts are settled: it renewed just before
dying (lag up to :data:`LEASE_RENEW`), the observer polls every :data:`LEASE_RENEW`
(a new beat is seen up to one poll late, and the expiry is noticed up to one poll late),
so ``LEASE_TTL + 2 * LEASE_RENEW`` = :data:`WORST_CASE` seconds (21 s).

Settling never re-runs anything: a job part whose command may have been sent is marked
``failed`` naming the dead replica; one claimed but not yet sent goes back to
``pending``. A replica wrongly judged dead (stalled for longer than the TTL) is fenced:
its own writes are compare-and-sets on ``runner = itself``, so it sends nothing after
its claim was taken back (jobs.py ``mark_sent``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .manager import Manager
    from .registry import Registry

__all__ = ["LEASE_RENEW", "LEASE_TTL", "WORST_CASE", "LeaseStore", "LeaseWatch", "Leases"]

log = logging.getLogger("dpanel.leases")

#: how often a replica renews its lease (and looks at the others')
LEASE_RENEW = 3.0
#: a replica whose beat has not moved for this long is dead (5 missed renewals: a busy
#: database or a GC pause of a few seconds does not count as death)
LEASE_TTL = 15.0
#: longest time from a replica's death until a live one has settled its parts
WORST_CASE = LEASE_TTL + 2 * LEASE_RENEW

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS manager_leases (
        replica VARCHAR(32) PRIMARY KEY,
        beat BIGINT NOT NULL,
        renewed DOUBLE PRECISION NOT NULL,
        started DOUBLE PRECISION NOT NULL
    )""",
]


class LeaseStore:
    """The ``manager_leases`` table, on the registry's database."""

    def __init__(self, registry: Registry, replica: str) -> None:
        self._reg = registry
        self.replica = replica
        registry.db.ensure("leases", _SCHEMA)

    def renew(self) -> None:
        """Bump this replica's beat (the row is made on the first renewal)."""
        now = time.time()
        with self._reg._tx() as cur:
            cur.execute("UPDATE manager_leases SET beat = beat + 1, renewed = ? "
                        "WHERE replica = ?", (now, self.replica))
            if cur.rowcount == 0:
                cur.execute("INSERT INTO manager_leases (replica, beat, renewed, started) "
                            "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                            (self.replica, 1, now, now))

    def beats(self) -> dict[str, tuple[int, float]]:
        """replica -> (beat, wall time of its last renewal, for display only)."""
        with self._reg._tx() as cur:
            rows = cur.execute("SELECT replica, beat, renewed FROM manager_leases",
                               ()).fetchall()
        return {str(r[0]): (int(r[1]), float(r[2])) for r in rows}


class LeaseWatch:
    """Which other replicas stopped renewing, by this process's monotonic clock."""

    def __init__(self, me: str, ttl: float = LEASE_TTL) -> None:
        self.me, self.ttl = me, ttl
        #: replica -> (beat last seen, monotonic time it was first seen at that beat)
        self._seen: dict[str, tuple[int, float]] = {}

    def update(self, beats: dict[str, int], now: float) -> list[str]:
        dead = []
        for name, beat in sorted(beats.items()):
            if name == self.me:
                continue
            prev = self._seen.get(name)
            if prev is None or prev[0] != beat:
                self._seen[name] = (beat, now)
            elif now - prev[1] >= self.ttl:
                dead.append(name)
        return dead


class Leases:
    """The renew + watch loop of one named replica, in the manager's event loop."""

    def __init__(self, manager: Manager, replica: str) -> None:
        self._m = manager
        self.store = LeaseStore(manager.registry, replica)
        self.watch = LeaseWatch(replica)
        self._task: Optional[asyncio.Task[None]] = None

    async def start(self) -> None:
        await asyncio.to_thread(self.store.renew)
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        # the lease is left to expire: if this replica does not come back (scaled down),
        # the others settle what its shutdown cut; if it does, its start does
        if self._task:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a broken database: say it, keep renewing
                log.exception("replica lease")
            await asyncio.sleep(LEASE_RENEW)

    async def tick(self) -> None:
        await asyncio.to_thread(self.store.renew)
        beats = await asyncio.to_thread(self.store.beats)
        for dead in self.watch.update({k: v[0] for k, v in beats.items()}, time.monotonic()):
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(beats[dead][1]))
            requeued, failed, cancelled = await asyncio.to_thread(
                self._m.jobs.store.settle_dead, dead,
                f"manager replica {dead} died while it ran this part (its lease stopped "
                f"renewing at {since}); not re-run: the command may have run")
            if requeued or failed or cancelled:
                log.warning("replica %s is dead (lease last renewed %s): %d job part(s) it "
                            "ran marked failed, %d it had claimed but not sent given back "
                            "(%d of ended jobs cancelled)", dead, since, failed, requeued,
                            cancelled)
                self._m.jobs.kick()
            await self._m.updates.settle_dead(dead, since)

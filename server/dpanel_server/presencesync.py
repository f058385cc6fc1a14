"""Presence that does not depend on retained statuses, for brokers where those cannot
rebuild it: RabbitMQ (a cluster or one node) and any broker cluster.

Why: RabbitMQ's MQTT plugin keeps retained messages per node, and never sends a retained
message to a wildcard subscription at all (``dpanel/+/status`` is one), so a manager that
(re)connects hears no retained status whatever node it is on. Before this module, a
replica restart showed the whole fleet offline until each device had been pinged, and a
manager on one RabbitMQ node (one broker URL) never swept at all.

Two parts, both MQTT 3.1.1-portable and working with every deployed agent:

* :class:`PresenceStore`: the shared registry (SQLite or PostgreSQL) keeps each device's
  last presence change, written by whichever replica heard it (every replica hears every
  status; the upsert keeps the newest). A (re)starting replica seeds its view from it at
  once, each entry marked *unverified*: the fleet never shows offline because a replica
  restarted.
* :class:`Resync`: after every broker (re)connect, every device not heard from since is
  pinged, bounded (``parallel`` in flight) and jittered. The agent answers a ping and
  publishes its status again, routed live to us from whatever node it is on. A seeded
  "online" device that answers none of ``tries`` pings is marked offline (it died while
  nobody listened for its will).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from .config import ServerConfig
from .db import Database

__all__ = ["PresenceStore", "Resync", "StoredPresence", "needs_resync"]

log = logging.getLogger("dpanel.manager.presence")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS device_presence (
        device VARCHAR(63) PRIMARY KEY,
        online INTEGER NOT NULL,
        since DOUBLE PRECISION,
        agent_version TEXT,
        port INTEGER,
        changed_at DOUBLE PRECISION NOT NULL
    )""",
]


def needs_resync(cfg: ServerConfig) -> bool:
    """RabbitMQ (``broker.auth = "http"``, its auth backend) or several broker URLs (a
    cluster): retained statuses cannot be trusted to rebuild presence."""
    return cfg.broker.auth == "http" or len(cfg.broker.host_ports) > 1


@dataclass(frozen=True)
class StoredPresence:
    device: str
    online: bool
    since: float
    agent_version: str
    port: Optional[int]
    changed_at: float


class PresenceStore:
    """One row per device: its last presence change as heard by any replica."""

    def __init__(self, db: Database) -> None:
        self._db = db
        db.ensure("device_presence", SCHEMA)

    def record(self, device: str, online: bool, since: float, agent_version: str,
               port: Optional[int], when: float) -> None:
        # newest wins: two replicas write the same change, and a late write of an older
        # change (a slow thread) must not undo a newer one
        self._db.execute(
            "INSERT INTO device_presence (device, online, since, agent_version, port, "
            "changed_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device) DO UPDATE SET "
            "online = excluded.online, since = excluded.since, "
            "agent_version = excluded.agent_version, port = excluded.port, "
            "changed_at = excluded.changed_at "
            "WHERE device_presence.changed_at <= excluded.changed_at",
            (device, int(online), since, agent_version[:200], port, when))

    def drop(self, device: str) -> None:
        self._db.execute("DELETE FROM device_presence WHERE device = ?", (device,))

    def online(self) -> list[StoredPresence]:
        rows = self._db.execute(
            "SELECT p.device, p.since, p.agent_version, p.port, p.changed_at "
            "FROM device_presence p JOIN devices d ON d.id = p.device "
            "WHERE p.online = 1 AND d.revoked_at IS NULL", ())
        return [StoredPresence(r[0], True, float(r[1] or 0.0), str(r[2] or ""), r[3],
                               float(r[4])) for r in rows]


class Resync:
    """The sweep after a broker (re)connect (one at a time: a new connect restarts it).

    ``targets()`` lists the devices to ping (those not heard from in this broker
    session); ``ping(device)`` returns whether it answered (None: the broker session
    is gone, a new sweep comes with the next one); ``still_unverified(device)``
    whether nothing was heard from it meanwhile; ``give_up(device)`` marks a device
    that answered none of the pings.
    """

    def __init__(self, *, targets: Callable[[], Awaitable[list[tuple[str, bool]]]],
                 ping: Callable[[str], Awaitable[Optional[bool]]],
                 still_unverified: Callable[[str], bool],
                 give_up: Callable[[str], None],
                 settle: float = 3.0, parallel: int = 200, tries: int = 3,
                 spread: float = 2.0, rate: float = 1000.0) -> None:
        self._targets, self._ping = targets, ping
        self._still_unverified, self._give_up = still_unverified, give_up
        self.settle, self.parallel, self.tries, self.spread = settle, parallel, tries, spread
        #: first pings started per second at most (the spread grows with the fleet)
        self.rate = rate
        self._task: Optional[asyncio.Task[None]] = None
        #: the last sweep's figures (logs, tests, the bench)
        self.last: dict[str, float] = {}

    def start(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = asyncio.ensure_future(self._sweep())
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("bug: presence resync failed", exc_info=task.exception())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _sweep(self) -> None:
        t0 = time.monotonic()
        # what a broker that does deliver retained statuses (one Mosquitto, EMQX) sends
        # comes right after SUBACK: no need to ping those devices
        await asyncio.sleep(self.settle)
        sem = asyncio.Semaphore(self.parallel)
        targets = await self._targets()
        counts = {"pinged": 0, "answered": 0, "gave_up": 0}
        spread = max(self.spread, len(targets) / self.rate)

        async def one(device: str, seeded_online: bool) -> None:
            # jitter: thousands of statuses at once are what the broker and every
            # replica would otherwise take in one burst
            await asyncio.sleep(random.uniform(0, spread))  # noqa: S311 (jitter)
            for _ in range(self.tries if seeded_online else 1):
                if not self._still_unverified(device):
                    return
                async with sem:
                    counts["pinged"] += 1
                    answered = await self._ping(device)
                if answered is None:
                    return
                if answered:
                    counts["answered"] += 1
                    return
            if self._still_unverified(device):
                counts["gave_up"] += 1
                self._give_up(device)

        await asyncio.gather(*(one(d, on) for d, on in targets))
        self.last = {"devices": len(targets), **counts,
                     "seconds": round(time.monotonic() - t0, 1)}
        log.info("presence resync: %s device(s) not heard from after the broker connect, "
                 "%s ping(s), %s answered, %s marked offline, in %.1f s", len(targets),
                 counts["pinged"], counts["answered"], counts["gave_up"],
                 time.monotonic() - t0)

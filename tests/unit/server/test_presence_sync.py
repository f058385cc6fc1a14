"""presencesync: the shared presence store (newest change wins, revoked devices left
out), seeding a tracker from it, and the resync's ping/give-up rules."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dpanel_proto import wire
from dpanel_server.config import ServerConfig
from dpanel_server.presence import PresenceTracker
from dpanel_server.presencesync import PresenceStore, Resync, needs_resync
from dpanel_server.registry import Registry


def _status(device: str, state: str) -> bytes:
    return wire.encode(wire.Status(device=device, state=state))  # type: ignore[arg-type]


def test_store_keeps_the_newest_change_and_skips_revoked(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    for name in ("d-1", "d-2", "d-3"):
        reg.add(name)
    store = PresenceStore(reg.db)
    store.record("d-1", True, 10.0, "1.0", 2200, when=100.0)
    store.record("d-1", False, 10.0, "1.0", None, when=99.0)  # older: a slow replica
    store.record("d-2", True, 20.0, "1.0", None, when=100.0)
    store.record("d-2", False, 20.0, "1.0", None, when=101.0)  # newer: offline
    store.record("d-3", True, 30.0, "1.0", None, when=100.0)
    reg.revoke("d-3")
    rows = {r.device: r for r in store.online()}
    assert set(rows) == {"d-1"} and rows["d-1"].port == 2200 and rows["d-1"].since == 10.0
    store.drop("d-1")
    assert store.online() == []


def test_needs_resync_for_rabbitmq_or_a_cluster() -> None:
    cfg = ServerConfig()
    assert not needs_resync(cfg)  # one Mosquitto: retained statuses rebuild presence
    cfg.broker.auth = "http"
    assert needs_resync(cfg)  # RabbitMQ, even one node: no retained on a wildcard
    cfg.broker.auth = "files"
    cfg.broker.url = "mqtt://127.0.0.1:1883,mqtt://127.0.0.1:1884"
    assert needs_resync(cfg)


def test_seeded_presence_is_verified_or_given_up(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    for name in ("alive", "dead", "live"):
        reg.add(name)
    store = PresenceStore(reg.db)
    for name in ("alive", "dead", "live"):
        store.record(name, True, 5.0, "1.0", None, when=50.0)
    offline: list[str] = []
    came: list[str] = []
    tracker = PresenceTracker(reg, on_offline=offline.append, on_pinned=lambda: None,
                              on_online=came.append, store=store)

    async def go() -> None:
        tracker.on_status("live", _status("live", "online"))  # heard before the seed
        assert tracker.seed(store.online()) == 2  # a live status beats any record
        for name in ("alive", "dead", "live"):
            p = tracker.get(name)
            assert p is not None and p.state == "online"
        assert tracker.unverified("alive") and not tracker.unverified("live")
        pings: list[str] = []

        async def targets() -> list[tuple[str, bool]]:
            return [(d, True) for d in ("alive", "dead", "live") if tracker.unverified(d)]

        async def ping(device: str) -> bool:
            pings.append(device)
            if device == "alive":
                tracker.on_status(device, _status(device, "online"))  # as the agent does
                return True
            return False

        resync = Resync(targets=targets, ping=ping, still_unverified=tracker.unverified,
                        give_up=tracker.give_up, settle=0, spread=0, tries=3)
        resync.start()
        await asyncio.wait_for(resync._task, 10)  # type: ignore[arg-type]
        assert pings.count("alive") == 1 and pings.count("dead") == 3 and "live" not in pings
        assert resync.last["gave_up"] == 1
        dead, alive = tracker.get("dead"), tracker.get("alive")
        assert dead is not None and dead.state == "offline" and offline == ["dead"]
        assert alive is not None and alive.since == 5.0  # the record's, kept
        assert "alive" in came  # what waits for it (jobs) looks again
        await tracker.drain()
        assert {r.device for r in store.online()} == {"alive", "live"}
        # a reconnect keeps what we know, unverified, instead of forgetting it
        tracker.clear()
        assert tracker.unverified("live") and tracker.get("live") is not None
        await resync.close()

    asyncio.run(go())


def test_resync_stops_when_the_broker_session_goes(tmp_path: Path) -> None:
    gave_up: list[str] = []

    async def go() -> None:
        async def targets() -> list[tuple[str, bool]]:
            return [("d-1", True)]

        async def ping(_device: str) -> None:
            return None  # no broker session: not the device's fault

        resync = Resync(targets=targets, ping=ping, still_unverified=lambda _d: True,
                        give_up=gave_up.append, settle=0, spread=0)
        resync.start()
        await asyncio.wait_for(resync._task, 10)  # type: ignore[arg-type]

    asyncio.run(go())
    assert gave_up == []

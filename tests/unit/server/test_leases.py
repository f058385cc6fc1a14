"""Replica leases without processes: when a replica counts as dead, and how a live one
settles the job parts and rollout offers a dead one left, on both registry engines
(the processes themselves, SIGKILLed: tests/integration/test_replica_rollout.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dpanel_server.jobs import JobSpec, JobStore
from dpanel_server.leases import LEASE_RENEW, LEASE_TTL, WORST_CASE, LeaseStore, LeaseWatch
from dpanel_server.presence import Presence
from dpanel_server.registry import Registry
from dpanel_server.updates import RolloutSpec, Updates


def test_a_replica_is_dead_only_after_its_beat_stood_still_for_the_ttl() -> None:
    w = LeaseWatch("a", ttl=15)
    assert w.update({"a": 1, "b": 7}, 100.0) == []  # first sight: a full TTL first
    assert w.update({"a": 1, "b": 7}, 114.9) == []
    assert w.update({"a": 9, "b": 7}, 115.0) == ["b"]  # never itself
    assert w.update({"a": 9, "b": 8}, 116.0) == []  # it moved: alive again
    assert w.update({"a": 9, "b": 8}, 130.9) == []
    assert w.update({"b": 8, "c": 1}, 131.0) == ["b"]
    assert WORST_CASE == LEASE_TTL + 2 * LEASE_RENEW and LEASE_RENEW < LEASE_TTL / 3


def test_lease_rows_renew_on_both_engines(registry_url: str) -> None:
    reg = Registry(registry_url)
    try:
        a, b = LeaseStore(reg, "a"), LeaseStore(reg, "b")
        a.renew()
        a.renew()
        b.renew()
        LeaseStore(reg, "a").renew()  # the same replica restarted: same row, still moving
        beats = a.beats()
        assert {k: v[0] for k, v in beats.items()} == {"a": 3, "b": 1}
    finally:
        reg.close()


def test_a_dead_replicas_parts_fail_if_maybe_sent_and_go_back_if_only_claimed(
        registry_url: str) -> None:
    reg = Registry(registry_url)
    try:
        for d in ("d1", "d2", "d3"):
            reg.add(d)
        a, b = JobStore(reg, "a"), JobStore(reg, "b")
        a.add("j1", JobSpec(command="true"), {}, "admin", ["d1", "d2", "d3"])
        assert a.claim("j1", "d1") and a.mark_sent("j1", "d1")  # the command went out
        assert a.claim("j1", "d2")  # claimed, tunnel still opening: nothing sent
        assert b.claim("j1", "d3") and b.mark_sent("j1", "d3")  # b's own, alive
        assert b.settle_dead("a", "replica a died") == (1, 1, 0)
        assert b.settle_dead("a", "replica a died") == (0, 0, 0)  # once
        parts = {p["device"]: p for p in b.job("j1")["parts"]}
        assert (parts["d1"]["state"], parts["d1"]["reason"]) == ("failed", "replica a died")
        assert (parts["d2"]["state"], parts["d2"]["runner"]) == ("pending", None)
        assert parts["d3"]["state"] == "running" and parts["d3"]["runner"] == "b"
        # a was only stalled, not dead: fenced, it sends nothing and overwrites nothing
        assert not a.mark_sent("j1", "d2")
        a.finish("j1", "d1", "succeeded", 0)
        assert b.claim("j1", "d2")  # d2 is anyone's again, and runs once
        a.unclaim("j1", "d2")
        a.finish("j1", "d2", "succeeded", 0)
        parts = {p["device"]: p for p in b.job("j1")["parts"]}
        assert parts["d1"]["state"] == "failed"
        assert (parts["d2"]["state"], parts["d2"]["runner"]) == ("running", "b")
        b.finish("j1", "d2", "succeeded", 0)
        assert b.job("j1")["parts"][1]["state"] == "succeeded"
        # a claim never sent, of a job that ended meanwhile: cancelled, not pending
        a.add("j2", JobSpec(command="true"), {}, "admin", ["d1"])
        assert a.claim("j2", "d1") and a.set_state("j2", "cancelled")
        assert b.settle_dead("a", "replica a died") == (0, 0, 1)
        assert b.job("j2")["parts"][0]["state"] == "cancelled"
    finally:
        reg.close()


class _Manager:
    def __init__(self, url: str, state: Path, replica: str) -> None:
        self.registry = Registry(url)
        self.cfg = SimpleNamespace(state_dir=str(state),
                                   manager=SimpleNamespace(replica=replica))
        self.presence: dict[str, Presence] = {}


def test_a_dead_replicas_offers_settle_by_what_each_device_reports(
        registry_url: str, tmp_path: Path) -> None:
    async def go() -> dict[str, Any]:
        ma = _Manager(registry_url, tmp_path, "a")
        mb = _Manager(registry_url, tmp_path, "b")
        try:
            ua, ub = Updates(ma), Updates(mb)  # type: ignore[arg-type]
            devices = ["up", "lost", "busy", "away", "crash", "live"]
            ua.store.add("r1", RolloutSpec(version="2.0", canary=0), {}, "admin",
                         [(d, "1.0") for d in devices])
            for d in devices[:5]:
                assert ua.store.move("r1", d, "pending", "offered")
            assert ub.store.move("r1", "live", "pending", "offered")  # b's own offer
            mb.presence.update({
                "up": Presence(online=True, agent_version="2.0", update_state="committed",
                               update_version="2.0"),
                "lost": Presence(online=True, agent_version="1.0"),  # never heard of it
                "busy": Presence(online=True, agent_version="1.0",
                                 update_state="downloading", update_version="2.0"),
                "away": Presence(online=False, agent_version="1.0"),
                "crash": Presence(online=True, agent_version="1.0",
                                  update_state="rolled_back", update_version="2.0",
                                  update_reason="exited at start"),
                "live": Presence(online=True, agent_version="1.0")})
            # a report of this version's failure (maybe one b holds from an earlier
            # offer): judged by the replica that offered, not by b while a lives
            mb.presence["live"] = Presence(online=True, agent_version="1.0",
                                           update_state="failed", update_version="2.0")
            live = next(p for p in ua.store.rollout("r1")["parts"] if p["device"] == "live")
            crash = next(p for p in ua.store.rollout("r1")["parts"]
                         if p["device"] == "crash")
            await ub._follow("r1", "2.0", crash)  # a's offer: b keeps off
            assert ub.store.rollout("r1")["counts"].get("rolled_back") is None
            await ub._follow("r1", "2.0", live)  # b's own offer: b judges it
            assert ub.store.rollout("r1")["counts"].get("failed") == 1
            await ub.settle_dead("a", "12:00")
            await ub.settle_dead("a", "12:00")  # twice: nothing more moves
            return {p["device"]: p for p in ub.store.rollout("r1")["parts"]}
        finally:
            ma.registry.close()
            mb.registry.close()

    parts = asyncio.run(go())
    assert parts["up"]["state"] == "updated" and "replica a" in parts["up"]["reason"]
    assert parts["lost"]["state"] == "pending" and "offered again" in parts["lost"]["reason"]
    assert parts["crash"]["state"] == "rolled_back"
    assert parts["crash"]["reason"].startswith("exited at start"), parts["crash"]
    # a report on its way, a device offline: left as they are
    assert [parts[d]["state"] for d in ("busy", "away")] == ["offered"] * 2
    assert parts["live"]["state"] == "failed" and parts["live"]["runner"] == "b"

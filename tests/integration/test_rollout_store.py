"""The rollout tables on both registry engines (SQLite, a real PostgreSQL 15): the
compare-and-set that makes an offer happen once, halting, listing."""

from __future__ import annotations

from dpanel_server.registry import Registry
from dpanel_server.updates import RolloutSpec, RolloutStore


def test_rollout_store_on_both_engines(registry_url: str) -> None:
    reg = Registry(registry_url)
    try:
        store = RolloutStore(reg)
        RolloutStore(reg)  # a second manager on the same database: schema once
        spec = RolloutSpec(version="2.0", devices=("d1", "d2", "d3"), canary=1,
                           url_base="http://m")
        store.add("r1", spec, {"devices": ["d1", "d2", "d3"]}, "alice",
                  [("d1", "1.0"), ("d2", "1.0"), ("d3", "")])
        r = store.rollout("r1")
        assert [(p["device"], p["canary"], p["state"]) for p in r["parts"]] == [
            ("d1", True, "pending"), ("d2", False, "pending"), ("d3", False, "pending")]
        assert store.move("r1", "d1", "pending", "offered")
        assert not store.move("r1", "d1", "pending", "offered")  # once
        assert store.move("r1", "d1", "offered", "rolled_back", "crashed at start")
        assert store.settle("r1", "pending", "skipped", "halted") == 2
        assert store.set_state("r1", "halted") and not store.set_state("r1", "finished")
        r = store.rollout("r1")
        assert r["state"] == "halted" and r["counts"] == {"rolled_back": 1, "skipped": 2}
        assert r["parts"][0]["reason"] == "crashed at start" and r["parts"][0]["ended"]
        # no offer once the rollout is not running any more
        store.add("r2", spec, {}, "bob", [("d1", "1.0")])
        store.set_state("r2", "cancelled")
        assert not store.move("r2", "d1", "pending", "offered")
        assert [x["id"] for x in store.rollouts()] == ["r1", "r2"]
        assert store.rollouts(active_only=True) == []
    finally:
        reg.close()

"""Agent updates and job parts on two manager replicas (one real PostgreSQL 15, one real
Mosquitto, the tunnel process, replicas "a" and "b"), with frozen amd64 agents in update
slots under tests/updfix.Supervisor.

* A rollout started through one replica: both replicas schedule it, the devices'
  statuses reach both, and each device is offered, installs and restarts exactly once;
  the rollout reads the same whichever replica is asked.
* A replica SIGKILLed while it runs a job part mid-command: the other settles that part
  as failed, naming the dead replica, within the lease bound (leases.WORST_CASE), and
  never runs it again (a side-effect file on the device says the command ran once). An
  offer the dead replica made that the device never took is offered again.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import asyncssh
import pytest
from pgfix import Postgres
from test_manager_replicas import Replicas

from dpanel_proto import __version__ as OLD
from dpanel_proto.update import write_bundle
from dpanel_server.leases import LEASE_RENEW, WORST_CASE
from dpanel_server.registry import Registry
from dpanel_server.updates import RolloutSpec, RolloutStore
from support import free_port, wait_for
from updfix import NEW_VERSION, SlotDevice, Supervisor, frozen_agents

DEVICES = ("rep-1", "rep-2")


class World:
    def __init__(self, s: Replicas, tmp: Path, agents: dict[str, Path]) -> None:
        self.s, self.tmp, self.agents = s, tmp, agents
        self.devs: dict[str, SlotDevice] = {}
        self.sups: dict[str, Supervisor] = {}

    def show(self, replica: str, rid: str) -> dict[str, Any]:
        return dict(json.loads(self.s.on_ok(replica, "agent", "update", "status", rid,
                                            "--json")))

    def job(self, replica: str, job: str) -> dict[str, Any]:
        return dict(json.loads(self.s.on_ok(replica, "job", "show", job, "--json")))

    def device_on(self, replica: str, device: str) -> dict[str, Any]:
        return dict(json.loads(self.s.on_ok(replica, "device", "show", device)))


@pytest.fixture(scope="module")
def world(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("reprollout")
    agents = frozen_agents(Path.home() / ".cache" / "dpanel" / "test-dist-upd")
    s = Replicas(dir=tmp / "st", broker_port=free_port(), tunnel_port=free_port(),
                 api_port=free_port(), api_port_b=free_port(), registry=postgres.new_db())
    w = World(s, tmp, agents)
    try:
        s.start()
        wait_for(lambda: (s.dir / "update_key.pub").exists(), "the update key", 30)
        pub = " ".join((s.dir / "update_key.pub").read_text().split()[:2])
        for i, d in enumerate(DEVICES):
            token = s.on_ok("ab"[i], "device", "add", d, "--print-token").strip()
            w.devs[d] = SlotDevice(tmp / d, token, agents[OLD], pub)
            w.sups[d] = Supervisor(w.devs[d], tmp / d / "agent.log")
            w.sups[d].start()
        for d in DEVICES:
            for r in "ab":
                wait_for(lambda r=r, d=d: (x := w.device_on(r, d))["online"]  # type: ignore[misc]
                         and x["agent_version"] == OLD, f"{d} online on replica {r}", 90)
        yield w
    finally:
        for sup in w.sups.values():
            sup.stop()
        s.close()


def _log(w: World, device: str) -> str:
    return (w.tmp / device / "agent.log").read_text(errors="replace")


def test_a_rollout_on_two_replicas_updates_each_device_once(world: World) -> None:
    w, s = world, world.s
    key = asyncssh.read_private_key(str(s.dir / "update_key"))
    bundle = w.tmp / "bundle"
    write_bundle(bundle, w.agents[NEW_VERSION], NEW_VERSION, "amd64", key)
    s.on_ok("b", "agent", "import", str(bundle))  # one state directory: both see it
    for r in "ab":
        assert NEW_VERSION in s.on_ok(r, "agent", "bundles")
    starts = {d: len(w.sups[d].starts) for d in DEVICES}
    rid = str(json.loads(s.on_ok("a", "agent", "update", "--json", *DEVICES, "--version",
                                 NEW_VERSION, "--canary", "1"))["id"])
    asked = itertools.cycle("ab")

    def done() -> bool:
        r = w.show(next(asked), rid)  # whichever replica: the same rollout
        bad = [p for p in r["parts"] if p["state"] in ("failed", "rolled_back", "skipped")]
        assert not bad, r
        return r["state"] == "finished"

    try:
        wait_for(done, f"rollout {rid} finished", 240)
    except TimeoutError:
        raise AssertionError(f"{w.show('a', rid)}\n{s.log()[-4000:]}") from None
    views = {r: w.show(r, rid) for r in "ab"}
    for v in views.values():
        assert {p["device"]: p["state"] for p in v["parts"]} == dict.fromkeys(DEVICES,
                                                                            "updated")
    keys = ("device", "state", "canary", "from_version", "offered", "ended", "reason",
            "agent_version", "online")
    assert [[p[k] for k in keys] for p in views["a"]["parts"]] == \
        [[p[k] for k in keys] for p in views["b"]["parts"]]
    assert views["a"]["state"] == views["b"]["state"] == "finished"
    for d in DEVICES:
        # one offer, one install, one restart into the new slot; never a second swap
        assert _log(w, d).count(f"update {NEW_VERSION} installed; restarting") == 1, d
        assert w.devs[d].current() == "slots/b"
        assert len(w.sups[d].starts) == starts[d] + 1, w.sups[d].starts
        for r in "ab":
            assert w.device_on(r, d)["agent_version"] == NEW_VERSION
    # the offers were made once in all: by one replica or the other, never both (an
    # offer left unanswered on a loaded machine is made again, by design: then the
    # device's own count above is what holds)
    log = s.log()
    for d in DEVICES:
        assert log.count(f"{d} accepted {NEW_VERSION}") == 1 or \
            f"offer to {d} not answered" in log, log[-4000:]


def test_a_killed_replicas_running_part_is_failed_by_the_other_and_not_rerun(
        world: World) -> None:
    w, s = world, world.s
    side = w.tmp / "side-effect"
    started = w.tmp / "started"
    job = str(json.loads(s.on_ok("b", "job", "run", "rep-1", "--json", "--", "sh", "-c",
                                 f"echo ran >> {side}; touch {started}; sleep 45"))["id"])
    wait_for(started.exists, "the job's command runs on rep-1", 90)
    runner = w.job("a", job)["parts"][0]["runner"]
    assert runner in ("a", "b")  # either scheduler may have won the claim
    other = "b" if runner == "a" else "a"
    proc = s.proc if runner == "a" else s.proc_b
    assert proc is not None
    # and an offer the same replica made of a version rep-1 never heard of (as when it
    # dies between the offer's claim and its publish): made through the replica's own
    # store, since no timing makes a live replica lose an offer on cue
    lost = secrets.token_hex(8)
    reg = Registry(s.registry or "")
    try:
        store = RolloutStore(reg, runner)
        store.add(lost, RolloutSpec(version="9.9-lost", canary=0), {"devices": ["rep-1"]},
                  "admin", [("rep-1", NEW_VERSION)])
        assert store.move(lost, "rep-1", "pending", "offered", "offered")
    finally:
        reg.close()
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    proc.wait(30)

    def settled() -> Any:
        p = w.job(other, job)["parts"][0]
        return p if p["state"] != "running" else None

    # the bound of a hang, not a measurement: the lease's worst case plus a loaded CI
    part = dict(wait_for(settled, "the dead replica's part settled", WORST_CASE + 60))
    took = time.monotonic() - killed
    assert part["state"] == "failed", part
    assert f"manager replica {runner} died" in part["reason"], part
    assert "not re-run" in part["reason"], part
    shown = s.on_ok(other, "job", "show", job)
    assert f"manager replica {runner} died" in shown, shown
    # the lost offer went back to pending and the survivor offered it again (it then
    # fails at once: no bundle of that version exists)
    offer = dict(wait_for(lambda: (p := w.show(other, lost)["parts"][0])["state"] != "offered"
                          and p, "the dead replica's offer settled", 60))
    assert offer["state"] == "failed" and "no bundle of 9.9-lost" in offer["reason"], offer
    assert f"manager replica {runner} died before rep-1 took the offer" in s.log()
    # nobody runs it again: two more lease rounds later, the device ran it once
    time.sleep(2 * LEASE_RENEW + 1)
    assert side.read_text() == "ran\n"
    assert w.job(other, job)["parts"][0]["state"] == "failed"
    assert w.job(other, job)["state"] != "running"
    # the survivor carries on with new work on the same device
    again = str(json.loads(s.on_ok(other, "job", "run", "rep-1", "--json", "--", "sh", "-c",
                                   f"echo again >> {side}"))["id"])
    wait_for(lambda: w.job(other, again)["parts"][0]["state"] == "succeeded",
             "a new job on the survivor", 90)
    assert side.read_text() == "ran\nagain\n"
    print(f"dead replica {runner}'s part settled {took:.1f} s after SIGKILL "
          f"(bound {WORST_CASE:.0f} s)")
    log = s.log()
    assert "Traceback" not in log, log[-4000:]

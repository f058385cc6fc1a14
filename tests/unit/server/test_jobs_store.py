"""Jobs without processes: who sees a job and its output, the part compare-and-set, and
the flags' parsers (the scheduler itself is tried on a real stack: test_jobs.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dpanel_server.authz import Forbidden, Principal
from dpanel_server.errors import DPanelError, UnknownDevice
from dpanel_server.jobs import Jobs, JobSpec, error_limit, parse_duration, parse_max_errors
from dpanel_server.registry import Device, Registry


class _Manager:
    """The few Manager attributes Jobs reads (a stub: no broker, nobody online)."""

    def __init__(self, path: Path | str) -> None:
        self.registry = Registry(path)
        self.presence: dict[str, Any] = {}

    async def devices(self, include_revoked: bool = True) -> list[Device]:
        return self.registry.devices(include_revoked)

    async def device(self, name: str) -> Device:
        return self.registry.get(name)


ADMIN = Principal("admin", "admin")
ALICE = Principal("alice", "operator", ("site=a",))
BOB = Principal("bob", "operator", ("site=b",))
VIEWER = Principal("vera", "viewer")


@pytest.fixture
def jobs(registry_url: str) -> Jobs:
    m = _Manager(registry_url)  # each engine in turn (pgfix)
    m.registry.add("a-1", {"site": "a"})
    m.registry.add("a-2", {"site": "a"})
    m.registry.add("b-1", {"site": "b"})
    return Jobs(m)  # type: ignore[arg-type]


def test_a_scoped_operator_reaches_only_its_devices(jobs: Jobs) -> None:
    async def go() -> None:
        job = await jobs.create(ALICE, JobSpec(command="true", all=True))
        assert [p["device"] for p in job["parts"]] == ["a-1", "a-2"]
        assert job["created_by"] == "alice"
        with pytest.raises(Forbidden):
            await jobs.create(ALICE, JobSpec(command="true", devices=("b-1",)))
        with pytest.raises(Forbidden):
            await jobs.create(VIEWER, JobSpec(command="true", all=True))
        with pytest.raises(UnknownDevice):
            await jobs.create(ADMIN, JobSpec(command="true", devices=("nope",)))
        with pytest.raises(Forbidden):  # not "unknown": a scope hides what is outside it
            await jobs.create(ALICE, JobSpec(command="true", devices=("nope",)))
    asyncio.run(go())


def test_another_operator_cannot_see_a_job_or_its_output(jobs: Jobs) -> None:
    async def go() -> None:
        job = await jobs.create(ALICE, JobSpec(command="secret-thing", all=True))
        for call in (jobs.get(BOB, job["id"]), jobs.part(BOB, job["id"], "a-1"),
                     jobs.cancel(BOB, job["id"])):
            with pytest.raises(DPanelError, match="unknown job"):
                await call
        assert await jobs.list(BOB) == []
        assert [j["id"] for j in await jobs.list(ADMIN)] == [job["id"]]
        assert (await jobs.part(ALICE, job["id"], "a-1"))["state"] == "pending"
    asyncio.run(go())


def test_a_part_is_claimed_once_and_a_cut_run_is_never_rerun(jobs: Jobs) -> None:
    async def go() -> str:
        return str((await jobs.create(ADMIN, JobSpec(command="true", all=True)))["id"])
    job_id = asyncio.run(go())
    store = jobs.store
    assert store.claim(job_id, "a-1") is True
    assert store.claim(job_id, "a-1") is False  # a second dispatcher, a reconnect
    assert store.cut_by_restart() == 1
    part = {p["device"]: p for p in store.job(job_id)["parts"]}["a-1"]
    assert part["state"] == "failed" and "restarted" in part["reason"]
    assert store.claim(job_id, "a-1") is False
    store.set_state(job_id, "cancelled")
    assert store.claim(job_id, "a-2") is False  # a cancelled job dispatches nothing


def test_flag_parsers() -> None:
    assert parse_duration("7d") == 7 * 86400 and parse_duration("5s") == 5
    assert parse_duration("90") == 90 and parse_duration("1.5h") == 5400
    for bad in ("7x", "", "-5s", "0s", "1000d"):
        with pytest.raises(DPanelError, match="--expires"):
            parse_duration(bad)
    assert parse_max_errors("5%") == "5%" and parse_max_errors(" 3 ") == "3"
    for bad in ("150%", "x", "-1", "5%%"):
        with pytest.raises(DPanelError, match="--max-errors"):
            parse_max_errors(bad)
    assert error_limit("5%", 20) == 1 and error_limit("5%", 10) == 0
    assert error_limit("3", 10) == 3

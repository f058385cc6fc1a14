"""Jobs: one command for many devices, stored in the registry, run on each device once
when it is online (now, or when it next comes online, until the job expires).

Each part runs through the same pooled tunnel + SSH exec path as ``dpanel exec`` (no new
code path on the device; exit codes and output as for exec). Presence is pushed over MQTT,
so a device that is online for minutes a day gets its part seconds after it connects.

At-most-once: a part moves ``pending -> running`` in one registry transaction (a
compare-and-set on its state) before anything is sent to the device, so a job id plus a
device id never runs twice, across reconnects and manager restarts. A second
compare-and-set (``sent = 1``, on ``runner`` = this replica) comes after the tunnel and
SSH login and before the command is sent. A part found ``running`` when its manager
starts again was cut by the restart: it is marked ``failed`` with that reason, never
re-run. With replicas, a part whose replica died for good (its lease expired,
leases.py) is settled by another replica: ``failed`` naming the dead one if the command
may have been sent, back to ``pending`` if it was only claimed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from dpanel_proto import wire
from dpanel_proto.codes import ErrorCode

from ._partstore import PartStore, count_states
from .authz import Forbidden, Principal, in_scope, require
from .errors import DPanelError, RequestTimeout, UnknownDevice

if TYPE_CHECKING:
    from .manager import Manager
    from .registry import Registry

__all__ = [
    "JOB_STATES",
    "PART_STATES",
    "JobSpec",
    "Jobs",
    "parse_duration",
    "parse_max_errors",
]

log = logging.getLogger("dpanel.jobs")

#: states of one device's part (scripts rely on these spellings)
PART_STATES = ("pending", "running", "succeeded", "failed", "timed_out", "expired",
               "cancelled")
_DONE = frozenset(PART_STATES) - {"pending", "running"}
#: states of a job: running until no part is pending or running
JOB_STATES = ("running", "finished", "stopped", "cancelled", "expired")

#: kept of each of stdout and stderr per part; the rest is counted and dropped
OUTPUT_CAP = 64 << 10
#: a job's longest life, and most devices, so that one request cannot fill the registry
MAX_EXPIRES = 90 * 86400
MAX_COMMAND = 64 << 10
#: the scheduler looks at the registry at least this often (expiry), and on every event
_TICK = 1.0
#: a device online whose tunnel or SSH login failed is tried again after this
_RETRY = 15.0

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS jobs (
        id VARCHAR(32) PRIMARY KEY,
        command TEXT NOT NULL,
        selector TEXT NOT NULL,
        created_by VARCHAR(255) NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL,
        timeout DOUBLE PRECISION,
        max_concurrency INTEGER NOT NULL,
        max_errors VARCHAR(16) NOT NULL,
        state VARCHAR(16) NOT NULL,
        ended DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS job_parts (
        job VARCHAR(32) NOT NULL,
        device VARCHAR(63) NOT NULL,
        state VARCHAR(16) NOT NULL,
        exit INTEGER,
        stdout TEXT NOT NULL DEFAULT '',
        stderr TEXT NOT NULL DEFAULT '',
        truncated INTEGER NOT NULL DEFAULT 0,
        started DOUBLE PRECISION,
        ended DOUBLE PRECISION,
        reason TEXT,
        PRIMARY KEY (job, device)
    )""",
    "CREATE INDEX IF NOT EXISTS job_parts_state ON job_parts (state)",
]

#: Numbered schema steps (see Database.migrate). 1: which manager replica runs a part.
#: 2: whether its command may have been sent (0: claimed only; 1 or NULL: maybe sent),
#: so that a dead replica's unsent claims go back to pending and the rest never re-run.
_MIGRATIONS: list[list[str]] = [
    ["ALTER TABLE job_parts ADD COLUMN runner VARCHAR(32)"],
    ["ALTER TABLE job_parts ADD COLUMN sent INTEGER"],
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class JobError(DPanelError):
    """A refused job request: HTTP 422, names the field."""

    code = ErrorCode.INVALID


class UnknownJob(DPanelError):
    code = ErrorCode.UNKNOWN_JOB


def parse_duration(text: str, what: str = "--expires") -> float:
    """``30s``, ``15m``, ``12h``, ``7d`` or plain seconds; a one-line error otherwise."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise JobError(f"{what}: {text!r} is not a duration (e.g. 30s, 15m, 12h, 7d)")
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds > MAX_EXPIRES:
        raise JobError(f"{what}: {text!r} is longer than {MAX_EXPIRES // 86400} days")
    return seconds


def parse_max_errors(text: str, what: str = "--max-errors") -> str:
    """``N`` (a count) or ``N%`` (of the job's devices), normalised; 0-100 for a percent."""
    t = text.strip()
    pct = t.endswith("%")
    digits = t[:-1] if pct else t
    if not digits.isdigit():
        raise JobError(f"{what}: {text!r} is not a count N or a percentage N%")
    n = int(digits)
    if pct and n > 100:
        raise JobError(f"{what}: {text!r} is more than 100%")
    return f"{n}%" if pct else str(n)


def error_limit(max_errors: str, total: int) -> int:
    """How many failed parts a job tolerates; one more stops it."""
    if max_errors.endswith("%"):
        return total * int(max_errors[:-1]) // 100
    return int(max_errors)


@dataclass(frozen=True)
class JobSpec:
    """A job request, validated (the API builds it from its body)."""

    command: str
    devices: tuple[str, ...] = ()
    filters: tuple[str, ...] = ()
    all: bool = False
    max_concurrency: int = 16
    max_errors: str = "0"
    expires: float = 7 * 86400
    timeout: Optional[float] = None


class _Capped:
    def __init__(self) -> None:
        self.data = {"stdout": bytearray(), "stderr": bytearray()}
        self.truncated = False

    def add(self, kind: str, chunk: bytes) -> None:
        buf = self.data[kind]
        room = OUTPUT_CAP - len(buf)
        if len(chunk) > room:
            self.truncated = True
        buf += chunk[:max(room, 0)]

    def text(self, kind: str) -> str:
        return self.data[kind].decode("utf-8", "replace")


def _matches(filters: tuple[str, ...], device: str, labels: dict[str, str]) -> bool:
    """As ``dpanel exec --filter``: a glob on the id, or KEY=GLOB on a label; any match."""
    import fnmatch

    for expr in filters:
        key, eq, value = expr.partition("=")
        if (eq and fnmatch.fnmatch(labels.get(key, ""), value)) or (
                not eq and fnmatch.fnmatch(device, expr)):
            return True
    return False


class JobStore(PartStore):
    """The jobs tables, on the registry's database and lock (one transaction each)."""

    PARENT, PARTS, PARENT_KEY = "jobs", "job_parts", "job"

    def __init__(self, registry: Registry, runner: str = "") -> None:
        super().__init__(registry, runner, "jobs", _SCHEMA, _MIGRATIONS)

    def add(self, job_id: str, spec: JobSpec, selector: dict[str, Any], created_by: str,
            devices: list[str]) -> None:
        now = time.time()
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO jobs (id, command, selector, created_by, created, expires, "
                "timeout, max_concurrency, max_errors, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, spec.command, json.dumps(selector), created_by, now,
                 now + spec.expires, spec.timeout, spec.max_concurrency, spec.max_errors,
                 "running"))
            for d in devices:
                cur.execute("INSERT INTO job_parts (job, device, state) VALUES (?, ?, ?)",
                            (job_id, d, "pending"))

    _JOB_COLS = ("id, command, selector, created_by, created, expires, timeout, "
                 "max_concurrency, max_errors, state, ended")

    @staticmethod
    def _job(row: tuple[Any, ...]) -> dict[str, Any]:
        keys = [k.strip() for k in JobStore._JOB_COLS.split(",")]
        job = dict(zip(keys, row))
        job["selector"] = json.loads(job["selector"])
        return job

    def jobs(self, active_only: bool = False) -> list[dict[str, Any]]:
        where = " WHERE state = 'running'" if active_only else ""
        with self._tx() as cur:
            rows = cur.execute(f"SELECT {self._JOB_COLS} FROM jobs{where} "  # noqa: S608
                               "ORDER BY created").fetchall()
            counts = cur.execute("SELECT job, state, COUNT(*) FROM job_parts "
                                 "GROUP BY job, state").fetchall()
        out = []
        by_job: dict[str, dict[str, int]] = {}
        for job_id, state, n in counts:
            by_job.setdefault(job_id, {})[state] = int(n)
        for r in rows:
            job = self._job(r)
            job["counts"] = by_job.get(job["id"], {})
            out.append(job)
        return out

    def job(self, job_id: str, with_output: bool = False) -> dict[str, Any]:
        out_cols = ", stdout, stderr" if with_output else ""
        with self._tx() as cur:
            row = cur.execute(f"SELECT {self._JOB_COLS} FROM jobs WHERE id = ?",  # noqa: S608
                              (job_id,)).fetchone()
            parts = cur.execute(
                "SELECT device, state, exit, truncated, started, ended, reason, "  # noqa: S608
                f"runner{out_cols} FROM job_parts WHERE job = ? ORDER BY device",
                (job_id,)).fetchall()
        if row is None:
            raise UnknownJob(f"unknown job {job_id!r}")
        job = self._job(row)
        keys = ["device", "state", "exit", "truncated", "started", "ended", "reason",
                "runner"]
        if with_output:
            keys += ["stdout", "stderr"]
        job["parts"] = [dict(zip(keys, p)) for p in parts]
        for p in job["parts"]:
            p["truncated"] = bool(p["truncated"])
        job["counts"] = count_states(job["parts"])
        return job

    def claim(self, job_id: str, device: str) -> bool:
        """pending -> running, once: the compare-and-set that makes a part at-most-once."""
        with self._tx() as cur:
            # the job's own state is part of the check: a cancel that committed first wins
            cur.execute("UPDATE job_parts SET state = 'running', started = ?, runner = ?, "
                        "sent = 0 WHERE job = ? AND device = ? AND state = 'pending' AND EXISTS "
                        "(SELECT 1 FROM jobs WHERE id = ? AND state = 'running')",
                        (time.time(), self.runner, job_id, device, job_id))
            return bool(cur.rowcount == 1)

    def mark_sent(self, job_id: str, device: str) -> bool:
        """The command is about to be sent: from here a lost runner means 'maybe ran'.
        False: this replica's claim was taken back (judged dead): send nothing."""
        with self._tx() as cur:
            cur.execute("UPDATE job_parts SET sent = 1 WHERE job = ? AND device = ? AND "
                        "state = 'running' AND runner = ? AND sent = 0",
                        (job_id, device, self.runner))
            return bool(cur.rowcount == 1)

    def unclaim(self, job_id: str, device: str) -> None:
        """running -> pending: only when nothing was sent (the tunnel or SSH login failed)."""
        with self._tx() as cur:
            cur.execute("UPDATE job_parts SET state = 'pending', started = NULL, "
                        "runner = NULL, sent = NULL WHERE job = ? AND device = ? AND "
                        "state = 'running' AND runner = ? AND sent = 0",
                        (job_id, device, self.runner))

    def finish(self, job_id: str, device: str, state: str, exit: Optional[int] = None,
               out: Optional[_Capped] = None, reason: Optional[str] = None) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE job_parts SET state = ?, exit = ?, stdout = ?, stderr = ?, "
                "truncated = ?, ended = ?, reason = ? "
                "WHERE job = ? AND device = ? AND state = 'running' AND runner = ?",
                (state, exit, out.text("stdout") if out else "",
                 out.text("stderr") if out else "", int(bool(out and out.truncated)),
                 time.time(), reason, job_id, device, self.runner))

    def cut_by_restart(self) -> int:
        """Parts left ``running`` by this manager when it stopped: failed, never re-run.
        A replica cuts only its own: the others' are running right now. (Unlike a dead
        replica's, even a claim never sent is failed here: the restart said so first.)"""
        reason = "the manager restarted while it ran; not re-run (a part runs at most once)"
        with self._tx() as cur:
            if self.runner:
                cur.execute("UPDATE job_parts SET state = 'failed', ended = ?, reason = ? "
                            "WHERE state = 'running' AND runner = ?",
                            (time.time(), reason, self.runner))
            else:
                cur.execute("UPDATE job_parts SET state = 'failed', ended = ?, reason = ? "
                            "WHERE state = 'running'", (time.time(), reason))
            return int(cur.rowcount)

    def settle_dead(self, runner: str, reason: str) -> tuple[int, int, int]:
        """The parts a dead runner left ``running``: (given back to pending, failed,
        cancelled). Maybe sent: failed with ``reason``, never re-run. Only claimed:
        pending again if the job still runs, else cancelled. Compare-and-sets on state
        and runner, so replicas settling at once move each part once."""
        now = time.time()
        with self._tx() as cur:
            cur.execute("UPDATE job_parts SET state = 'pending', started = NULL, "
                        "runner = NULL, sent = NULL "
                        "WHERE state = 'running' AND runner = ? AND sent = 0 AND EXISTS "
                        "(SELECT 1 FROM jobs WHERE jobs.id = job_parts.job AND "
                        "jobs.state = 'running')", (runner,))
            requeued = int(cur.rowcount)
            cur.execute("UPDATE job_parts SET state = 'failed', ended = ?, reason = ? "
                        "WHERE state = 'running' AND runner = ? AND "
                        "(sent IS NULL OR sent <> 0)", (now, reason, runner))
            failed = int(cur.rowcount)
            cur.execute("UPDATE job_parts SET state = 'cancelled', ended = ?, reason = ? "
                        "WHERE state = 'running' AND runner = ?",
                        (now, f"the job ended while manager replica {runner} (dead) had "
                         "claimed this part; nothing was sent", runner))
            return requeued, failed, int(cur.rowcount)


class Jobs:
    """The scheduler: dispatches pending parts to online devices, in the manager's loop."""

    def __init__(self, manager: Manager, runner: str = "") -> None:
        self._m = manager
        self.store = JobStore(manager.registry, runner)
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task[None]] = None
        #: (job, device) -> the task running that part
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._cancelling: set[tuple[str, str]] = set()
        #: device -> monotonic time before which it is not tried again: its tunnel or SSH
        #: login failed (nothing was sent); coming online again clears it
        self._retry_after: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cut = await asyncio.to_thread(self.store.cut_by_restart)
        if cut:
            log.warning("%d job part(s) were running when the manager stopped: marked "
                        "failed, not re-run", cut)
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        # parts cut here stay 'running' in the registry: the next start marks them failed
        for t in list(self._running.values()):
            t.cancel()
        if self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def kick(self, device: str = "") -> None:
        """Something changed (a device came online, a part ended): look again now."""
        if device:
            self._retry_after.pop(device, None)
        self._wake.set()

    # ------------------------------------------------------------------ API side
    async def create(self, principal: Principal, spec: JobSpec) -> dict[str, Any]:
        require(principal, "exec")
        if not spec.command.strip():
            raise JobError("command: empty command")
        if len(spec.command) > MAX_COMMAND or "\0" in spec.command:
            raise JobError("command: too long or contains a NUL byte")
        if spec.max_concurrency < 1:
            raise JobError(f"max_concurrency: must be at least 1, not {spec.max_concurrency}")
        parse_max_errors(spec.max_errors, "max_errors")
        if not 0 < spec.expires <= MAX_EXPIRES:
            raise JobError("expires: must be more than 0 and at most 90 days")
        if spec.timeout is not None and spec.timeout <= 0:
            raise JobError("timeout: must be more than 0 seconds")
        if bool(spec.devices) + bool(spec.filters) + spec.all != 1:
            raise JobError("targets: give devices, filters or all (exactly one)")
        known = {d.id: d for d in await self._m.devices(include_revoked=False)}
        chosen: list[str] = []
        if spec.devices:
            for name in spec.devices:
                d = known.get(name)
                if d is None and principal.scope:
                    # a scoped caller learns nothing of devices outside its scope
                    raise Forbidden(f"device {name} is outside {principal.name}'s scope "
                                    f"({', '.join(principal.scope)})")
                if d is None:
                    raise UnknownDevice(f"device: unknown or revoked device {name!r}")
                require(principal, "exec", name, d.labels)
                chosen.append(name)
        else:
            for name, d in sorted(known.items()):
                # a selection is narrowed to the caller's scope; a named device is checked
                if (spec.all or _matches(spec.filters, name, d.labels)) and in_scope(
                        principal, d.labels):
                    require(principal, "exec", name, d.labels)
                    chosen.append(name)
            if not chosen:
                raise JobError("targets: no enrolled, unrevoked device (in your scope) "
                               "matches")
        chosen = sorted(set(chosen))
        job_id = secrets.token_hex(8)
        selector = {"devices": list(spec.devices), "filters": list(spec.filters),
                    "all": spec.all}
        await asyncio.to_thread(self.store.add, job_id, spec, selector, principal.name,
                                chosen)
        log.info("job %s by %s: %d device(s): %s", job_id, principal.name, len(chosen),
                 wire.printable(spec.command[:200]))
        self.kick()
        return await self.get(principal, job_id)

    def _visible(self, principal: Principal, job: dict[str, Any]) -> None:
        """A job is seen by its creator and by admins; anyone else is told it is not
        there (a job's id, command and outputs are the creator's business)."""
        if principal.role != "admin" and principal.name != job["created_by"]:
            raise UnknownJob(f"unknown job {job['id']!r}")

    async def list(self, principal: Principal) -> list[dict[str, Any]]:
        require(principal, "read")
        jobs = await asyncio.to_thread(self.store.jobs)
        return [j for j in jobs
                if principal.role == "admin" or j["created_by"] == principal.name]

    async def get(self, principal: Principal, job_id: str) -> dict[str, Any]:
        require(principal, "read")
        job = await asyncio.to_thread(self.store.job, job_id)
        self._visible(principal, job)
        return job

    async def part(self, principal: Principal, job_id: str, device: str) -> dict[str, Any]:
        require(principal, "read")
        job = await asyncio.to_thread(self.store.job, job_id, True)
        self._visible(principal, job)
        for p in job["parts"]:
            if p["device"] == device:
                labels = {}
                try:
                    labels = (await self._m.device(device)).labels
                except UnknownDevice:
                    pass  # deleted since: its output is still the job's
                require(principal, "read", device, labels)
                return dict(p, job=job_id, command=job["command"])
        raise UnknownDevice(f"device: {device!r} has no part in job {job_id}")

    async def cancel(self, principal: Principal, job_id: str) -> dict[str, Any]:
        job = await self.get(principal, job_id)
        require(principal, "exec")
        if job["state"] == "running":
            await asyncio.to_thread(self.store.set_state, job_id, "cancelled")
            await asyncio.to_thread(self.store.settle, job_id, "pending", "cancelled",
                                    f"cancelled by {principal.name}")
            for (j, d), task in list(self._running.items()):
                if j == job_id:
                    self._cancelling.add((j, d))
                    task.cancel()  # hangs the command up (RemoteCommand.close)
            if self._running:
                await asyncio.gather(*[t for (j, _), t in self._running.items()
                                       if j == job_id], return_exceptions=True)
        return await self.get(principal, job_id)

    # ------------------------------------------------------------------ scheduler
    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:  # a bug, or a broken database: say it, keep scheduling
                log.exception("job scheduler")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), _TICK)
            except asyncio.TimeoutError:
                pass

    def _ready(self, device: str) -> bool:
        p = self._m.presence.get(device)
        if self._retry_after.get(device, 0.0) > time.monotonic():
            return False
        return bool(p and p.online and p.not_answering_since is None and p.host_key_ok
                    and self._m.broker_connected())

    async def _tick(self) -> None:
        now = time.time()
        for job in await asyncio.to_thread(self.store.jobs, True):
            full = await asyncio.to_thread(self.store.job, job["id"])
            parts = full["parts"]
            counts = full["counts"]
            job_id = job["id"]
            errors = counts.get("failed", 0) + counts.get("timed_out", 0)
            pending = [p["device"] for p in parts if p["state"] == "pending"]
            running = counts.get("running", 0)
            if errors > error_limit(job["max_errors"], len(parts)):
                if pending:
                    await asyncio.to_thread(self.store.settle, job_id, "pending",
                                            "cancelled", "max-errors reached")
                if not running:
                    await asyncio.to_thread(self.store.set_state, job_id, "stopped")
                continue
            if now >= job["expires"]:
                if pending:
                    await asyncio.to_thread(self.store.settle, job_id, "pending", "expired",
                                            "the job expired before the device came online")
                if not running:
                    await asyncio.to_thread(self.store.set_state, job_id, "expired")
                continue
            if not pending and not running:
                await asyncio.to_thread(self.store.set_state, job_id, "finished")
                continue
            room = job["max_concurrency"] - running
            for device in pending:
                if room <= 0:
                    break
                if not self._ready(device) or (job_id, device) in self._running:
                    continue
                if not await asyncio.to_thread(self.store.claim, job_id, device):
                    continue  # someone else moved it: never twice
                room -= 1
                task = asyncio.create_task(self._run(job, device))
                self._running[(job_id, device)] = task
                task.add_done_callback(functools.partial(self._done, (job_id, device)))

    def _done(self, key: tuple[str, str], _task: object = None) -> None:
        self._running.pop(key, None)
        self._cancelling.discard(key)
        self.kick()

    async def _run(self, job: dict[str, Any], device: str) -> None:
        job_id = job["id"]
        out = _Capped()
        corr = secrets.token_hex(16)  # links the audit's record of this run to the device's
        try:
            try:
                # tunnel + SSH login first: a failure here sent nothing, so the part may
                # wait for the device's next time online
                await self._m.connection(device)
            except DPanelError as exc:
                log.info("job %s: %s not reachable yet (%s); waiting", job_id, device, exc)
                self._retry_after[device] = time.monotonic() + _RETRY
                await asyncio.to_thread(self.store.unclaim, job_id, device)
                return
            if not await asyncio.to_thread(self.store.mark_sent, job_id, device):
                # another replica took this claim back (it judged us dead): it decides
                log.warning("job %s: the claim on %s was taken back; not sent", job_id,
                            device)
                return
            state, exit_code, reason = "failed", None, None
            try:
                # the device files its record under the job's creator, linked to ours
                cmd = await self._m.start_exec(device, job["command"], timeout=job["timeout"],
                                               env={"DPANEL_OPERATOR": job["created_by"],
                                                    "DPANEL_SOURCE": f"job {job_id}",
                                                    "DPANEL_AUDIT_ID": corr})
            except DPanelError as exc:
                # the session request may have reached the device: not retried
                reason = f"could not start: {exc}"
            else:
                try:
                    async for kind, data in cmd.events():
                        if kind == "exit":
                            assert isinstance(data, int)
                            exit_code = data
                        else:
                            assert isinstance(data, bytes)
                            out.add(kind, data)
                    state = "succeeded" if exit_code == 0 else "failed"
                    if exit_code:
                        reason = f"exit status {exit_code}"
                except RequestTimeout as exc:
                    state, reason = "timed_out", str(exc)
                except DPanelError as exc:
                    reason = f"{exc}; not re-run (a part runs at most once)"
                finally:
                    cmd.close()
            await asyncio.to_thread(self.store.finish, job_id, device, state, exit_code,
                                    out, reason)
        except asyncio.CancelledError:
            if (job_id, device) in self._cancelling:
                await asyncio.shield(asyncio.to_thread(
                    self.store.finish, job_id, device, "cancelled", None, out,
                    "the job was cancelled while it ran (hung up)"))
                state, exit_code = "cancelled", None
            else:
                raise  # manager shutdown: the next start marks the part failed
        # the audit's own record of this run (the device's record of the command, linked
        # by the correlation id, has the exit status and bytes)
        try:
            await asyncio.to_thread(
                self._m.audit.api_record, str(job["created_by"]), device, "job",
                str(job["command"]), f"job {job_id}: {state}", source=f"job {job_id}",
                exit=exit_code, correlation=corr)
        except Exception:  # the audit must not stop the job runner
            log.exception("could not write the audit record of job %s on %s", job_id,
                          device)
        log.info("job %s: %s on %s (exit %s) for %s", job_id, state, device, exit_code,
                 job["created_by"])

"""Agent updates: signed bundles on the manager, staged rollouts stored in the registry.

A bundle (``STATE_DIR/updates/<arch>/<version>/``: ``dpanel-tunnel`` + ``manifest.json``
with the update key's signature) is imported once (``dpanel agent import``), checked
against the manager's update key. A rollout (``dpanel agent update``) names devices and a
version; each device's part is offered over MQTT (a signed ``update`` request carrying
the manifest and its signature) while the device is online: the canaries first, the
others once every canary updated. Devices fetch the binary over HTTPS from the manager
(``GET /v1/agent/bundles/ARCH/VERSION/dpanel-tunnel``, device credentials, Range), verify
it and swap slots (agent/dpanel_agent/updater.py). Their statuses say how it went:
``committed`` on the new version = updated; ``rolled_back`` or ``failed`` = a failure;
more failures than ``max_failures`` halt the rollout (no new offers; the rest stay
``skipped``). A device offline stays ``pending`` until it comes online or the rollout
expires. Same patterns as jobs.py: portable SQL, compare-and-set on a part's state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from dpanel_proto import wire
from dpanel_proto.codes import ErrorCode
from dpanel_proto.signing import ManagerKey
from dpanel_proto.update import (
    ARCHES,
    BINARY_NAME,
    MANIFEST_NAME,
    Manifest,
    file_sha256,
    read_bundle,
    verify_manifest,
)

from ._files import ensure_private_key
from ._partstore import PartStore, count_states
from .authz import Forbidden, Principal, in_scope, require
from .errors import BrokerError, DPanelError, RequestTimeout, UnknownDevice
from .jobs import JobError, _matches

if TYPE_CHECKING:
    import asyncssh

    from .manager import Manager
    from .registry import Registry

__all__ = ["PART_STATES", "BundleStore", "RolloutSpec", "Updates"]

log = logging.getLogger("dpanel.updates")

#: a device's part of a rollout
PART_STATES = ("pending", "offered", "updated", "rolled_back", "failed", "skipped")
_DONE = frozenset({"updated", "rolled_back", "failed", "skipped"})
ROLLOUT_STATES = ("running", "finished", "halted", "cancelled", "expired")
_TICK = 1.0
_RETRY = 15.0
_VERSION_RE = re.compile(r"^[A-Za-z0-9._+~:-]{1,64}\Z")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS agent_rollouts (
        id VARCHAR(32) PRIMARY KEY,
        version VARCHAR(64) NOT NULL,
        selector TEXT NOT NULL,
        created_by VARCHAR(255) NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL,
        canary INTEGER NOT NULL,
        max_failures INTEGER NOT NULL,
        max_concurrency INTEGER NOT NULL,
        commit_timeout INTEGER NOT NULL,
        url_base TEXT NOT NULL,
        state VARCHAR(16) NOT NULL,
        ended DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS agent_rollout_parts (
        rollout VARCHAR(32) NOT NULL,
        device VARCHAR(63) NOT NULL,
        canary INTEGER NOT NULL,
        state VARCHAR(16) NOT NULL,
        from_version VARCHAR(64),
        offered DOUBLE PRECISION,
        ended DOUBLE PRECISION,
        reason TEXT,
        PRIMARY KEY (rollout, device)
    )""",
    "CREATE INDEX IF NOT EXISTS agent_rollout_parts_state ON agent_rollout_parts (state)",
]

#: Numbered schema steps (Database.migrate). 1: which manager replica made an offer, so
#: that a live replica settles the offers of a dead one (leases.py).
_MIGRATIONS: list[list[str]] = [
    ["ALTER TABLE agent_rollout_parts ADD COLUMN runner VARCHAR(32)"],
]


class UpdateError(DPanelError):
    code = ErrorCode.INVALID


class UnknownRollout(DPanelError):
    code = ErrorCode.UNKNOWN_JOB


# --------------------------------------------------------------------------- bundles


class BundleStore:
    """``STATE_DIR/updates/<arch>/<version>/``; the update key is ``STATE_DIR/update_key``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "updates"
        self.key_path = state_dir / "update_key"

    def key(self) -> asyncssh.SSHKey:
        return ensure_private_key(self.key_path)

    def public_line(self) -> str:
        self.key()
        return " ".join(Path(str(self.key_path) + ".pub").read_text().split()[:2])

    def add(self, src: Path) -> Manifest:
        """Import a bundle directory after checking its signature and hash."""
        try:
            m, sig, binary = read_bundle(src)
        except wire.DecodeError as exc:
            raise UpdateError(str(exc)) from None
        if not verify_manifest(m, sig, ManagerKey(self.public_line())):
            raise UpdateError(f"bundle {src}: the manifest is not signed by this manager's "
                              f"update key ({self.key_path}.pub)")
        try:
            size, digest = file_sha256(binary)
        except OSError as exc:
            raise UpdateError(f"bundle {src}: {binary.name}: {exc.strerror}") from None
        if (size, digest) != (m.size, m.sha256):
            raise UpdateError(f"bundle {src}: {binary.name} does not match its manifest")
        dest = self.dir / m.arch / m.version
        tmp = dest.with_name(f".{m.version}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy2(binary, tmp / binary.name)  # the binary, or a onedir's tar
        shutil.copy2(src / MANIFEST_NAME, tmp / MANIFEST_NAME)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return m

    def get(self, arch: str, version: str) -> Optional[tuple[Manifest, str, Path]]:
        if arch not in ARCHES or not _VERSION_RE.match(version):
            return None
        d = self.dir / arch / version
        try:
            return read_bundle(d)
        except wire.DecodeError:
            return None

    def list(self) -> list[dict[str, Any]]:
        out = []
        for arch in ARCHES:
            base = self.dir / arch
            for d in sorted(base.iterdir()) if base.is_dir() else []:
                if d.name.startswith("."):
                    continue
                got = self.get(arch, d.name)
                if got:
                    out.append({"arch": arch, "version": got[0].version,
                                "size": got[0].size, "sha256": got[0].sha256,
                                "layout": got[0].layout})
        return out


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RolloutSpec:
    version: str
    devices: tuple[str, ...] = ()
    filters: tuple[str, ...] = ()
    all: bool = False
    canary: int = 1
    max_failures: int = 0
    max_concurrency: int = 20
    commit_timeout: int = 300
    expires: float = 7 * 86400
    url_base: str = ""


class RolloutStore(PartStore):
    PARENT, PARTS, PARENT_KEY = "agent_rollouts", "agent_rollout_parts", "rollout"

    def __init__(self, registry: Registry, runner: str = "") -> None:
        super().__init__(registry, runner, "agent_updates", _SCHEMA, _MIGRATIONS)

    _COLS = ("id, version, selector, created_by, created, expires, canary, max_failures, "
             "max_concurrency, commit_timeout, url_base, state, ended")
    _PART_COLS = "device, canary, state, from_version, offered, ended, reason, runner"

    def add(self, rid: str, spec: RolloutSpec, selector: dict[str, Any], by: str,
            devices: list[tuple[str, str]]) -> None:
        now = time.time()
        with self._tx() as cur:
            cur.execute(f"INSERT INTO agent_rollouts ({self._COLS}) VALUES "  # noqa: S608
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (rid, spec.version, json.dumps(selector), by, now, now + spec.expires,
                         spec.canary, spec.max_failures, spec.max_concurrency,
                         spec.commit_timeout, spec.url_base, "running", None))
            for i, (d, ver) in enumerate(devices):
                cur.execute("INSERT INTO agent_rollout_parts (rollout, device, canary, state, "
                            "from_version) VALUES (?, ?, ?, ?, ?)",
                            (rid, d, int(i < spec.canary), "pending", ver))

    def _rollout(self, row: tuple[Any, ...], parts: list[tuple[Any, ...]]) -> dict[str, Any]:
        r = dict(zip([k.strip() for k in self._COLS.split(",")], row))
        r["selector"] = json.loads(r["selector"])
        keys = [k.strip() for k in self._PART_COLS.split(",")]
        r["parts"] = [dict(zip(keys, p)) for p in parts]
        for p in r["parts"]:
            p["canary"] = bool(p["canary"])
        r["counts"] = count_states(r["parts"])
        return r

    def rollouts(self, active_only: bool = False) -> list[dict[str, Any]]:
        where = " WHERE state = 'running'" if active_only else ""
        with self._tx() as cur:
            rows = cur.execute(f"SELECT {self._COLS} FROM agent_rollouts{where} "  # noqa: S608
                               "ORDER BY created").fetchall()
            parts = cur.execute(f"SELECT rollout, {self._PART_COLS} FROM "  # noqa: S608
                                "agent_rollout_parts ORDER BY device").fetchall()
        by: dict[str, list[tuple[Any, ...]]] = {}
        for p in parts:
            by.setdefault(p[0], []).append(tuple(p[1:]))
        return [self._rollout(tuple(r), by.get(r[0], [])) for r in rows]

    def rollout(self, rid: str) -> dict[str, Any]:
        with self._tx() as cur:
            row = cur.execute(f"SELECT {self._COLS} FROM agent_rollouts "  # noqa: S608
                              "WHERE id = ?", (rid,)).fetchone()
            parts = cur.execute(f"SELECT {self._PART_COLS} FROM agent_rollout_parts "  # noqa: S608
                                "WHERE rollout = ? ORDER BY device", (rid,)).fetchall()
        if row is None:
            raise UnknownRollout(f"unknown rollout {rid!r}")
        return self._rollout(tuple(row), [tuple(p) for p in parts])

    def move(self, rid: str, device: str, from_state: str, to_state: str,
             reason: Optional[str] = None) -> bool:
        """Compare-and-set of one part's state (and the rollout still running, for offers)."""
        now = time.time()
        with self._tx() as cur:
            if to_state == "offered":
                cur.execute("UPDATE agent_rollout_parts SET state = ?, offered = ?, reason = ?, "
                            "runner = ? WHERE rollout = ? AND device = ? AND state = ? AND "
                            "EXISTS (SELECT 1 FROM agent_rollouts WHERE id = ? AND state = "
                            "'running')", (to_state, now, reason, self.runner, rid, device,
                                           from_state, rid))
            else:
                ended = now if to_state in _DONE else None
                cur.execute("UPDATE agent_rollout_parts SET state = ?, ended = ?, reason = ? "
                            "WHERE rollout = ? AND device = ? AND state = ?",
                            (to_state, ended, reason, rid, device, from_state))
            return bool(cur.rowcount == 1)

    def dead_offers(self, runner: str) -> list[tuple[str, str, str]]:
        """(rollout, version, device) of the running rollouts' parts that ``runner``
        offered and that no device report has settled yet."""
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT p.rollout, r.version, p.device FROM agent_rollout_parts p "
                "JOIN agent_rollouts r ON r.id = p.rollout WHERE p.state = 'offered' AND "
                "p.runner = ? AND r.state = 'running' ORDER BY p.rollout, p.device",
                (runner,)).fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def release(self, rid: str, device: str, runner: str, to_state: str,
                reason: str) -> bool:
        """A dead runner's offer: ``offered -> to_state`` (compare-and-set on the runner
        too); back to pending drops the runner, so the next offer is anyone's."""
        ended = time.time() if to_state in _DONE else None
        with self._tx() as cur:
            cur.execute("UPDATE agent_rollout_parts SET state = ?, ended = ?, reason = ?, "
                        "runner = NULL WHERE rollout = ? AND device = ? AND state = "
                        "'offered' AND runner = ?",
                        (to_state, ended, reason, rid, device, runner))
            return bool(cur.rowcount == 1)


# --------------------------------------------------------------------------- engine


class Updates:
    """Rollouts, scheduled in the manager's loop (as jobs)."""

    def __init__(self, manager: Manager) -> None:
        self._m = manager
        self.bundles = BundleStore(Path(manager.cfg.state_dir))
        self.store = RolloutStore(manager.registry, manager.cfg.manager.replica)
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task[None]] = None
        self._offering: set[tuple[str, str]] = set()
        self._retry_after: dict[str, float] = {}

    async def start(self) -> None:
        await asyncio.to_thread(self.bundles.key)  # made once, 0600
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

    def kick(self, device: str = "") -> None:
        if device:
            self._retry_after.pop(device, None)
        self._wake.set()

    async def settle_dead(self, runner: str, since: str) -> None:
        """Offers made by a dead replica (leases.py): the device's own report decides.
        Running the target version: updated. Online and reporting that this version
        failed or rolled back: that. Online with no word of this version (the
        offer was lost with the replica): pending, offered again (an update is
        idempotent: the agent answers an offer of what it runs or is fetching without a
        second swap). Anything else is left to :meth:`_follow` (a report on its way) or
        to the rollout's expiry (the device stays offline)."""
        for rid, version, device in await asyncio.to_thread(self.store.dead_offers, runner):
            p = self._m.presence.get(device)
            if p is None:
                continue
            done = None
            if p.agent_version == version and (p.update_version != version
                                               or p.update_state == "committed"):
                done = ("updated", f"running {version} (offered by manager replica "
                        f"{runner}, which died; lease last renewed {since})")
            elif p.online and p.update_version == version and p.update_state in (
                    "failed", "rolled_back"):
                # stale or not, a failure of this version: never offered again by us
                done = (p.update_state, f"{p.update_reason or p.update_state} (offered by "
                        f"manager replica {runner}, which died)")
            elif p.online and p.update_version != version:
                done = ("pending", f"manager replica {runner} died before {device} took "
                        f"the offer (lease last renewed {since}); offered again")
            if done is None:
                continue
            to_state, reason = done
            if await asyncio.to_thread(self.store.release, rid, device, runner, to_state,
                                       reason):
                log.warning("rollout %s: %s: %s", rid, device, reason)
                self.kick()

    # ------------------------------------------------------------------ API side
    async def create(self, principal: Principal, spec: RolloutSpec) -> dict[str, Any]:
        require(principal, "exec")
        if not _VERSION_RE.match(spec.version):
            raise UpdateError("version: 1-64 letters, digits and . _ + ~ : -")
        if spec.canary < 0 or spec.max_failures < 0 or spec.max_concurrency < 1:
            raise UpdateError("canary, max_failures: 0 or more; max_concurrency: 1 or more")
        if not 10 <= spec.commit_timeout <= 86400:
            raise UpdateError("commit_timeout: 10-86400 seconds")
        if bool(spec.devices) + bool(spec.filters) + spec.all != 1:
            raise UpdateError("targets: give devices, filters or all (exactly one)")
        if not any(b["version"] == spec.version for b in self.bundles.list()):
            raise UpdateError(f"version: no bundle of {spec.version} was imported "
                              "(dpanel agent import BUNDLE)")
        known = {d.id: d for d in await self._m.devices(include_revoked=False)}
        chosen: list[str] = []
        if spec.devices:
            for name in spec.devices:
                d = known.get(name)
                if d is None and principal.scope:
                    raise Forbidden(f"device {name} is outside {principal.name}'s scope")
                if d is None:
                    raise UnknownDevice(f"device: unknown or revoked device {name!r}")
                require(principal, "exec", name, d.labels)
                chosen.append(name)
        else:
            for name, d in sorted(known.items()):
                if (spec.all or _matches(spec.filters, name, d.labels)) and in_scope(
                        principal, d.labels):
                    require(principal, "exec", name, d.labels)
                    chosen.append(name)
        if not chosen:
            raise JobError("targets: no enrolled, unrevoked device (in your scope) matches")
        chosen = sorted(set(chosen))
        # canaries: the devices named first, else the first in name order
        if spec.devices:
            order = list(dict.fromkeys(spec.devices))
            chosen = order + [c for c in chosen if c not in order]
        parts = [(d, (p.agent_version if (p := self._m.presence.get(d)) else "")) for d in chosen]
        rid = secrets.token_hex(8)
        selector = {"devices": list(spec.devices), "filters": list(spec.filters),
                    "all": spec.all}
        await asyncio.to_thread(self.store.add, rid, spec, selector, principal.name, parts)
        log.info("rollout %s by %s: %s to %d device(s), %d canary", rid, principal.name,
                 spec.version, len(parts), min(spec.canary, len(parts)))
        self.kick()
        return await self.get(principal, rid)

    def _visible(self, principal: Principal, r: dict[str, Any]) -> None:
        if principal.role != "admin" and principal.name != r["created_by"]:
            raise UnknownRollout(f"unknown rollout {r['id']!r}")

    async def list(self, principal: Principal) -> list[dict[str, Any]]:
        require(principal, "read")
        return [self._annotate(r) for r in await asyncio.to_thread(self.store.rollouts)
                if principal.role == "admin" or r["created_by"] == principal.name]

    def _annotate(self, r: dict[str, Any]) -> dict[str, Any]:
        for p in r["parts"]:  # what the device runs now, from presence
            pr = self._m.presence.get(p["device"])
            p["agent_version"] = pr.agent_version if pr else ""
            p["online"] = bool(pr and pr.online)
        return r

    async def get(self, principal: Principal, rid: str) -> dict[str, Any]:
        require(principal, "read")
        r = await asyncio.to_thread(self.store.rollout, rid)
        self._visible(principal, r)
        return self._annotate(r)

    async def cancel(self, principal: Principal, rid: str) -> dict[str, Any]:
        require(principal, "exec")
        r = await self.get(principal, rid)
        if r["state"] == "running":
            await asyncio.to_thread(self.store.set_state, rid, "cancelled")
            await asyncio.to_thread(self.store.settle, rid, "pending", "skipped",
                                    f"cancelled by {principal.name}")
        return await self.get(principal, rid)

    # ------------------------------------------------------------------ scheduler
    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:
                log.exception("rollout scheduler")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), _TICK)
            except asyncio.TimeoutError:
                pass

    async def _tick(self) -> None:
        now = time.time()
        for r in await asyncio.to_thread(self.store.rollouts, True):
            rid, version = r["id"], r["version"]
            for p in r["parts"]:
                if p["state"] == "offered":
                    await self._follow(rid, version, p)
            r = await asyncio.to_thread(self.store.rollout, rid)
            parts, counts = r["parts"], r["counts"]
            failures = counts.get("rolled_back", 0) + counts.get("failed", 0)
            pending = [p for p in parts if p["state"] == "pending"]
            offered = counts.get("offered", 0)
            if failures > r["max_failures"]:
                if pending:
                    await asyncio.to_thread(self.store.settle, rid, "pending", "skipped",
                                            f"halted: {failures} failure(s), more than "
                                            f"max-failures {r['max_failures']}")
                if not offered:
                    await asyncio.to_thread(self.store.set_state, rid, "halted")
                continue
            if now >= r["expires"]:
                await asyncio.to_thread(self.store.settle, rid, "pending", "skipped",
                                        "the rollout expired before the device came online")
                # an offer the device never reported back on (gone offline for good)
                await asyncio.to_thread(self.store.settle, rid, "offered", "failed",
                                        "no result from the device before the rollout "
                                        "expired")
                await asyncio.to_thread(self.store.set_state, rid, "expired")
                continue
            if not pending and not offered:
                await asyncio.to_thread(self.store.set_state, rid, "finished")
                continue
            canaries_open = any(p["canary"] and p["state"] in ("pending", "offered")
                                for p in parts)
            room = r["max_concurrency"] - offered
            batch = []
            for p in pending:
                if room <= 0:
                    break
                if canaries_open and not p["canary"]:
                    continue  # the others wait until every canary updated
                if (rid, p["device"]) in self._offering or not self._ready(p["device"]):
                    continue
                room -= 1
                batch.append(p["device"])
            # offers in parallel: each waits up to a request timeout for its answer
            await asyncio.gather(*(self._offer_once(r, d) for d in batch))

    async def _offer_once(self, r: dict[str, Any], device: str) -> None:
        key = (r["id"], device)
        self._offering.add(key)
        try:
            await self._offer(r, device)
        except Exception:
            log.exception("rollout %s: offer to %s", r["id"], device)
        finally:
            self._offering.discard(key)

    def _ready(self, device: str) -> bool:
        p = self._m.presence.get(device)
        if self._retry_after.get(device, 0.0) > time.monotonic():
            return False
        return bool(p and p.online and p.not_answering_since is None
                    and self._m.broker_connected())

    async def _offer(self, r: dict[str, Any], device: str) -> None:
        rid, version = r["id"], r["version"]
        p = self._m.presence.get(device)
        assert p is not None
        if p.agent_version == version:
            await asyncio.to_thread(self.store.move, rid, device, "pending", "updated",
                                    f"already running {version}")
            return
        if not p.arch:
            await asyncio.to_thread(self.store.move, rid, device, "pending", "failed",
                                    "the agent does not report its architecture (too old "
                                    "to update itself)")
            return
        got = await asyncio.to_thread(self.bundles.get, p.arch, version)
        if got is None:
            await asyncio.to_thread(self.store.move, rid, device, "pending", "failed",
                                    f"no bundle of {version} for {p.arch}")
            return
        m, sig, _ = got
        if not await asyncio.to_thread(self.store.move, rid, device, "pending", "offered",
                                       "offered"):
            return
        # what the device said of earlier updates no longer counts for this offer
        p.update_state = p.update_version = p.update_reason = None
        issued, expires = self._m._times()
        url = f"{r['url_base'].rstrip('/')}/v1/agent/bundles/{m.arch}/{m.version}/{BINARY_NAME}"
        req = wire.UpdateRequest(device=device, id=secrets.token_hex(16), issued_at=issued,
                                 expires_at=expires, version=m.version, arch=m.arch,
                                 size=m.size, sha256=m.sha256, manifest_sig=sig, url=url,
                                 commit_timeout=r["commit_timeout"],
                                 layout=None if m.layout == "onefile" else m.layout)
        try:
            resp = await self._m._requests.request(req)
        except (RequestTimeout, BrokerError) as exc:
            log.info("rollout %s: offer to %s not answered (%s); later", rid, device, exc)
            self._retry_after[device] = time.monotonic() + _RETRY
            await asyncio.to_thread(self.store.move, rid, device, "offered", "pending",
                                    f"offer not answered: {exc}")
            return
        if resp.code == ErrorCode.OK:
            if resp.message.startswith("already running"):
                await asyncio.to_thread(self.store.move, rid, device, "offered", "updated",
                                        resp.message)
            log.info("rollout %s: %s accepted %s: %s", rid, device, version, resp.message)
            return
        if resp.code == ErrorCode.TOO_MANY:
            self._retry_after[device] = time.monotonic() + _RETRY
            await asyncio.to_thread(self.store.move, rid, device, "offered", "pending",
                                    resp.message)
            return
        await asyncio.to_thread(self.store.move, rid, device, "offered", "failed",
                                f"refused: {resp.message} ({resp.code.value})")
        log.warning("rollout %s: %s refused %s: %s", rid, device, version, resp.message)

    async def _follow(self, rid: str, version: str, part: dict[str, Any]) -> None:
        """An offered part: what does the device's status say now?"""
        device = part["device"]
        p = self._m.presence.get(device)
        if p is None or p.update_version != version:
            return
        state = p.update_state
        if state == "committed" and p.agent_version == version:
            await asyncio.to_thread(self.store.move, rid, device, "offered", "updated",
                                    f"running {version}")
        elif state in ("failed", "rolled_back") and p.online and part.get("runner") in (
                None, self.store.runner):
            # a failure is judged by the replica that offered (it forgot the device's
            # earlier report of this version when it offered; the others may still hold
            # that stale one) or, once that replica is dead, by settle_dead
            await asyncio.to_thread(self.store.move, rid, device, "offered", state,
                                    p.update_reason or state)
            log.warning("rollout %s: %s %s: %s", rid, device, state, p.update_reason)

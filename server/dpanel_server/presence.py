"""Presence: which devices are online, with what agent and host key, from their statuses.

Statuses arrive over each device's own authenticated broker session, which the ACL
confines to its own topic: that is what makes pinning a host key on first sight safe.
Registry work (pinning, last-seen) runs in a worker thread, never on the event loop.

Being connected to the broker is not being alive: a frozen agent (SIGSTOP, a stuck
board) keeps its broker session, and its retained "online" status, until the broker's
keepalive runs out (1.5 x the agent's ``mqtt_keepalive``: 90 s by default), when its last
will says "offline". So a device that lets a request time out is marked
``not_answering`` at once, until it shows a sign of life (any status or answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Literal, Optional

from dpanel_proto import wire

from .errors import RegistryError
from .hostkeys import InvalidHostKey, fingerprint, normalize_host_key
from .registry import Registry

if TYPE_CHECKING:
    from .presencesync import PresenceStore

__all__ = ["Presence", "PresenceTracker"]

log = logging.getLogger("dpanel.manager.presence")


@dataclass
class Presence:
    online: bool = False
    since: float = 0.0
    agent_version: str = ""
    #: the tunnel port the device last reported (see Manager.tunnel_port for the truth)
    port: Optional[int] = None
    host_key_ok: bool = True
    host_key: str = ""  # as last announced (normalised), pinned or not
    #: the SSH user CA the device reports trusting; None: an agent without certificates
    user_ca: Optional[str] = None
    #: wall time of the first request it left unanswered; None while it answers
    not_answering_since: Optional[float] = None
    #: agent updates (updates.py): the device's arch and what it says of its last update
    arch: Optional[str] = None
    update_state: Optional[str] = None
    update_version: Optional[str] = None
    update_reason: Optional[str] = None
    #: False: known only from the shared store (presencesync: another replica's record,
    #: or our own before a restart), not heard from in this broker session yet
    verified: bool = True

    @property
    def state(self) -> Literal["online", "offline", "not_answering"]:
        """offline: no broker session; not_answering: connected, but the last request
        went unanswered and nothing was heard from it since; online otherwise."""
        if not self.online:
            return "offline"
        if self.not_answering_since is not None:
            return "not_answering"
        return "online"


class PresenceTracker:
    """Device presence, rebuilt from retained statuses after any broker reconnect; or,
    with a ``store`` (brokers whose retained statuses cannot rebuild it, see
    :mod:`.presencesync`), seeded from the shared store and verified by a resync."""

    def __init__(self, registry: Registry, *, on_offline: Callable[[str], None],
                 on_pinned: Callable[[], None],
                 on_online: Callable[[str], None] = lambda _d: None,
                 store: Optional[PresenceStore] = None) -> None:
        self._registry = registry
        self._store = store
        #: a device turned online (jobs dispatch its pending parts)
        self._on_online = on_online
        self._on_offline = on_offline
        self._on_pinned = on_pinned
        self.devices: dict[str, Presence] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: called with a device id (or "*" for all) after its presence may have changed
        #: (the web panel's live fan-out; callers compare, so a spurious call is harmless)
        self.listeners: list[Callable[[str], None]] = []

    def _changed(self, device: str) -> None:
        for listener in self.listeners:
            try:
                listener(device)
            except Exception:  # a listener's bug must not stop presence
                log.exception("bug: presence listener failed")

    def get(self, device: str) -> Optional[Presence]:
        return self.devices.get(device)

    def mark_not_answering(self, device: str) -> None:
        p = self.devices.get(device)
        if p is not None and p.online and p.not_answering_since is None:
            p.not_answering_since = time.time()
            log.warning("device %s is connected but not answering", device)
            self._changed(device)

    def alive(self, device: str) -> None:
        """Something well-formed came from ``device`` itself: it answers again."""
        p = self.devices.get(device)
        if p is not None and p.not_answering_since is not None:
            p.not_answering_since = None
            log.info("device %s answers again", device)
            self._changed(device)

    def forget(self, device: str) -> None:
        self.devices.pop(device, None)
        if self._store is not None:
            self._spawn(asyncio.to_thread(self._store.drop, device))
        self._changed(device)

    def clear(self) -> None:
        # A broker that restarted without persistence has forgotten devices that died
        # meanwhile: they must not stay "online"; retained statuses rebuild the rest.
        if self._store is not None:
            # no retained statuses will come (presencesync): keep what we know, as
            # unverified, until the resync has heard from each device or given up
            for p in self.devices.values():
                p.verified = False
            return
        self.devices.clear()
        self._changed("*")

    def seed(self, rows: list[Any]) -> int:
        """Devices the shared store says are online (``StoredPresence`` rows), unless
        heard from already (a live status is newer than any record)."""
        n = 0
        for row in rows:
            if row.device in self.devices:
                continue
            self.devices[row.device] = Presence(online=True, since=row.since,
                                                agent_version=row.agent_version,
                                                port=row.port, verified=False)
            n += 1
            self._changed(row.device)
        return n

    def unverified(self, device: str) -> bool:
        p = self.devices.get(device)
        return p is None or not p.verified

    def answered(self, device: str) -> None:
        """It answered a resync ping: it is there (its status follows)."""
        p = self.devices.get(device)
        if p is not None and p.online:
            p.verified = True

    def give_up(self, device: str) -> None:
        """A seeded "online" device answered no resync ping: it died while no replica
        listened for its will (or before we reconnected)."""
        p = self.devices.get(device)
        if p is None or p.verified:
            return
        p.verified = True  # we know now: offline
        if p.online:
            log.info("device %s did not answer after the broker connect: offline", device)
            p.online = False
            self._on_offline(device)
            self._spawn(self._record(device, p))
            self._changed(device)

    def on_status(self, device: str, payload: bytes) -> None:
        """Handle one status payload (raises wire.DecodeError for a bad one)."""
        if not payload:
            return  # a cleared retained message
        msg = wire.decode(payload)
        if not isinstance(msg, wire.Status) or msg.device != device:
            raise wire.DecodeError(f"device: status for {getattr(msg, 'device', '?')} on "
                                   f"{device}'s topic")
        host_key = ""
        if msg.host_key:
            try:
                host_key = normalize_host_key(msg.host_key)
            except InvalidHostKey as exc:
                raise wire.DecodeError(str(exc)) from None
        p = self.devices.setdefault(device, Presence())
        self.alive(device)
        seeded = not p.verified  # known from the store (or before a reconnect) only
        was_online = p.online
        p.verified = True
        p.online = msg.state == "online"
        p.agent_version = msg.agent_version
        p.port = msg.port  # the device's claim; Manager.tunnel_port prefers the tunnel's
        if p.online:
            p.user_ca = msg.user_ca
            p.arch, p.update_state = msg.arch, msg.update_state
            p.update_version, p.update_reason = msg.update_version, msg.update_reason
        if p.online and not was_online:
            p.since = time.time()
        if not p.online:
            self._on_offline(device)
        elif not was_online or seeded:
            self._on_online(device)  # seeded: what waits for it (jobs) looks again
        new_key = bool(host_key) and host_key != p.host_key
        if new_key:
            # statuses repeat the key every time; the registry only needs to see a new one
            p.host_key = host_key
        if new_key or p.online != was_online:
            # one registry write per change, not per status: a fleet reconnecting after a
            # broker restart is thousands of statuses in seconds
            self._spawn(self._update_registry(device, p, host_key if new_key else "",
                                              p.online != was_online))
        self._changed(device)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # RegistryError is handled where it is expected; anything else is a bug (or a
        # broken database) and must be seen, with its traceback
        if not task.cancelled() and task.exception() is not None:
            log.error("bug: registry update failed", exc_info=task.exception())

    async def _update_registry(self, device: str, p: Presence, key: str,
                               state_changed: bool) -> None:
        if key:
            await self.check_host_key(device, key, p)
        if state_changed:
            if self._store is not None:
                await self._record(device, p)
            try:
                await asyncio.to_thread(self._registry.touch, device, time.time())
            except RegistryError:
                pass  # revoked and deleted meanwhile

    async def _record(self, device: str, p: Presence) -> None:
        """The change, for replicas that (re)start later (presencesync)."""
        assert self._store is not None
        try:
            await asyncio.to_thread(self._store.record, device, p.online, p.since,
                                    p.agent_version, p.port, time.time())
        except RegistryError as exc:  # the database is down: live presence still holds
            log.warning("presence of %s not recorded: %s", device, exc)

    async def check_host_key(self, device: str, key: str, p: Presence) -> None:
        try:
            pinned = await asyncio.to_thread(self._registry.pin_host_key, device, key)
        except RegistryError:  # unknown device (e.g. revoked and deleted)
            return
        p.host_key_ok = pinned == key
        self._changed(device)
        if p.host_key_ok:
            self._on_pinned()
        elif pinned is None:
            log.error("device %s announces host key %s, which another device already holds: "
                      "refusing it (cloned card?)", device, fingerprint(key))
        else:
            log.error("device %s presents host key %s but %s is pinned: refusing it",
                      device, fingerprint(key), fingerprint(pinned))

    async def drain(self) -> None:
        """Wait for pending registry updates (shutdown, tests)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

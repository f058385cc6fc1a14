"""The manager's tunnel servers: enrolment, heartbeats, placement, and one SSH channel each.

Tunnel servers may run on other hosts (``dpanel tunnel serve --manager URL``). Each one:

* is enrolled by name (``dpanel tunnel-server add NAME`` prints its secret, stored hashed
  in ``tunnel_servers``) and announces itself every few seconds with a heartbeat to the
  API, under that secret: its public address, host key (pinned at the first heartbeat),
  the loopback address its device ports are bound on, its capacity and load, and which
  device holds which port. Heartbeats go to the shared table, so any manager replica sees
  every server;
* is dialled by the manager over SSH, as :data:`~.tunnel.MANAGER_USER` with the manager
  key (which the heartbeat's answer tells the server to trust), pinned to its host key.
  Over that one connection the manager pushes revocations (``kick``, at once), asks for
  the server's allocations, and reaches device ports (direct-tcpip, which the server
  allows only to its own bind address and only to ports it allocated);
* is *up* while that connection lives and heartbeats are fresh; a lost connection or
  missing heartbeats make it *down* at once, with the reason, and placement skips it.

Placement (:meth:`Fleet.place`): a device whose tunnel is up on a server stays there;
otherwise the least-loaded up server takes it ((load + placed since its last
heartbeat) / capacity). The open request names the server and its host key, signed.

A partial partition (the server is up for the manager, but a device's site cannot reach
it: a firewall, a broken route): the device answers ``tunnel_unreachable`` naming the
server, :meth:`Fleet.unreachable` marks that server unusable *for that device* for
:data:`UNREACHABLE_FOR` seconds, and the manager places the same open again elsewhere,
at most :meth:`Fleet.tries` times. With no server left, the error names each one and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import asyncssh

from dpanel_proto.codes import ErrorCode
from dpanel_proto.wire import DecodeError, printable, validate_device_id

from .errors import DPanelError, RegistryError
from .registry import Registry, hash_secret
from .tunnel import MANAGER_USER

__all__ = ["HEARTBEAT_INTERVAL", "SCHEMA", "Fleet", "ServerState", "TunnelServerDown",
           "add_server"]

log = logging.getLogger("dpanel.fleet")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS tunnel_servers (
        name VARCHAR(63) PRIMARY KEY,
        secret_hash VARCHAR(64) NOT NULL,
        host_key TEXT,
        public_addr VARCHAR(300),
        bind_host VARCHAR(64),
        capacity INTEGER NOT NULL DEFAULT 0,
        load INTEGER NOT NULL DEFAULT 0,
        devices TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION
    )""",
]

#: Seconds between a tunnel server's heartbeats (told to it in every answer).
HEARTBEAT_INTERVAL = 5.0
#: A server not heard from for this long is down (three heartbeats missed).
STALE_AFTER = 3 * HEARTBEAT_INTERVAL
#: How often the table is read again, and down servers are redialled at most.
_REFRESH = 1.0
_REDIAL = 3.0
#: A placement counts as the device's tunnel for this long before a heartbeat lists it.
_STICKY_GRACE = 30.0
#: How long a server a device could not reach is skipped for that device.
UNREACHABLE_FOR = 120.0
#: Placements per open request at most (each one a signed request the device answers).
MAX_TRIES = 3
#: A control command (kick, sessions) over the manager's SSH channel.
_CONTROL_TIMEOUT = 15.0


def add_server(registry: Registry, name: str, secret: Optional[str] = None) -> str:
    """Enrol a tunnel server in the registry; returns its secret (stored hashed).
    ``secret``: re-enrol with a known one (the stack's own servers keep theirs)."""
    validate_device_id(name, "tunnel server name")
    registry.db.ensure("tunnel_servers", SCHEMA)
    secret = secret or secrets.token_urlsafe(32)
    with registry.db.tx() as cur:
        if cur.execute("SELECT name FROM tunnel_servers WHERE name = ?",
                       (name,)).fetchone():
            raise RegistryError(f"tunnel server {name} exists; remove it first")
        cur.execute("INSERT INTO tunnel_servers (name, secret_hash, created_at) "
                    "VALUES (?, ?, ?)", (name, hash_secret(secret), time.time()))
    log.info("enrolled tunnel server %s", name)
    return secret


class TunnelServerDown(DPanelError):
    """No tunnel server can take the tunnel (each one named, with why)."""

    code = ErrorCode.TUNNEL_UNREACHABLE


@dataclass
class ServerState:
    name: str
    public: str = ""
    host_key: str = ""
    bind_host: str = "127.0.0.1"
    capacity: int = 0
    load: int = 0
    last_seen: float = 0.0
    devices: dict[str, int] = field(default_factory=dict)
    conn: Optional[asyncssh.SSHClientConnection] = None
    #: new (never connected) | up | down
    state: str = "new"
    reason: str = ""
    since: float = 0.0
    pending: int = 0
    next_dial: float = 0.0
    dialling: bool = False
    #: monotonic time it last answered a probe on its channel (heartbeats late)
    probed: float = 0.0
    probing: bool = False

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "public": self.public, "state": self.state,
                "bind_host": self.bind_host,
                "reason": self.reason, "since": self.since or None,
                # a down server's last heartbeat is history: its tunnels are gone
                "capacity": self.capacity, "load": self.load if self.is_up() else 0,
                "tunnels": len(self.devices) if self.is_up() else 0,
                "devices": sorted(self.devices) if self.is_up() else [],
                "last_seen": self.last_seen or None, "host_key": self.host_key}

    def is_up(self) -> bool:
        return self.state == "up" and self.conn is not None and not self.conn.is_closed()


class Fleet:
    """Every enrolled tunnel server, as this manager sees it (empty: the single built-in
    tunnel is used, as before)."""

    def __init__(self, registry: Registry, key: asyncssh.SSHKey) -> None:
        self._registry = registry
        self._key = key
        self.manager_key_line = " ".join(key.export_public_key().decode().split()[:2])
        registry.db.ensure("tunnel_servers", SCHEMA)
        self.servers: dict[str, ServerState] = {}
        #: device -> (server name, monotonic time placed, port or 0 before it is known)
        self._placed: dict[str, tuple[str, float, int]] = {}
        #: device -> {server name: (monotonic end of the mark, why)}: servers that this
        #: device could not reach (a partial partition; see the module docstring)
        self._unreach: dict[str, dict[str, tuple[float, str]]] = {}
        self._task: Optional[asyncio.Task[None]] = None
        self._bg: set[asyncio.Future[None]] = set()
        self._refresh_rows(self._rows())

    # ------------------------------------------------------------------ the table
    def _rows(self) -> list[tuple[Any, ...]]:
        return self._registry.db.execute(
            "SELECT name, host_key, public_addr, bind_host, capacity, load, devices, "
            "last_seen FROM tunnel_servers")

    def add(self, name: str) -> str:
        """Enrol a tunnel server; returns its secret (shown once, stored hashed)."""
        return add_server(self._registry, name)

    def remove(self, name: str) -> None:
        with self._registry.db.tx() as cur:
            cur.execute("DELETE FROM tunnel_servers WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise RegistryError(f"tunnel server {name}: not enrolled")
        log.warning("removed tunnel server %s", name)

    def authenticate(self, name: str, secret: str) -> str:
        """The pinned host key of tunnel server ``name`` if ``secret`` is its own (run in a
        thread); else :class:`RegistryError` (401). Checked before its body is even read."""
        try:
            validate_device_id(name, "tunnel server name")
        except DecodeError:
            raise _Unauthorized("unknown tunnel server or wrong secret") from None
        rows = self._registry.db.execute(
            "SELECT secret_hash, host_key FROM tunnel_servers WHERE name = ?", (name,))
        if not rows or not hmac.compare_digest(hash_secret(secret), rows[0][0]):
            raise _Unauthorized("unknown tunnel server or wrong secret")
        return str(rows[0][1] or "")

    def heartbeat(self, name: str, secret: str, body: dict[str, Any]) -> dict[str, Any]:
        """A tunnel server's announcement (run in a thread). Raises
        :class:`RegistryError` (401) naming what is wrong."""
        pinned = self.authenticate(name, secret)
        if pinned and pinned != body["host_key"]:
            raise RegistryError(f"tunnel server {name}: its host key changed; refused "
                                f"(re-enrol it: dpanel tunnel-server remove {name}, add)")
        self._registry.db.execute(
            "UPDATE tunnel_servers SET host_key = ?, public_addr = ?, bind_host = ?, "
            "capacity = ?, load = ?, devices = ?, last_seen = ? WHERE name = ?",
            (body["host_key"], body["public"], body["bind_host"], body["capacity"],
             body["load"], json.dumps(body["devices"]), time.time(), name))
        return {"manager_key": self.manager_key_line, "interval": HEARTBEAT_INTERVAL}

    def _refresh_rows(self, rows: list[tuple[Any, ...]]) -> None:
        names = set()
        for name, host_key, public, bind_host, capacity, load, devices, last_seen in rows:
            names.add(name)
            st = self.servers.setdefault(name, ServerState(name))
            if host_key and st.host_key and host_key != st.host_key:
                self._down(st, "its host key changed")
            st.host_key, st.public = host_key or "", public or ""
            st.bind_host = bind_host or "127.0.0.1"
            if (last_seen or 0) > st.last_seen:
                st.pending = 0  # the new load counts what was placed before it
            st.capacity, st.load, st.last_seen = capacity, load, last_seen or 0.0
            try:
                st.devices = {str(k): int(v) for k, v in json.loads(devices).items()}
            except (ValueError, AttributeError):
                st.devices = {}
        # tunnels opened since a server's last heartbeat: what the manager checked itself
        now = time.monotonic()
        for device, (name, when, port) in self._placed.items():
            held = self.servers.get(name)
            if held is not None and port and now - when < _STICKY_GRACE:
                held.devices.setdefault(device, port)
        for name in set(self.servers) - names:
            st = self.servers.pop(name)
            if st.conn is not None:
                st.conn.close()

    def active(self) -> bool:
        """Whether tunnels are placed on enrolled tunnel servers (else: the built-in one)."""
        return bool(self.servers)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for t in list(self._bg):
            t.cancel()
        for st in self.servers.values():
            if st.conn is not None:
                st.conn.close()

    async def _loop(self) -> None:
        while True:
            try:
                self._refresh_rows(await asyncio.to_thread(self._rows))
            except Exception as exc:  # a database outage must not end the loop
                log.warning("tunnel servers: cannot read the table: %s", exc)
            now_wall, now = time.time(), time.monotonic()
            for st in list(self.servers.values()):
                fresh = st.last_seen and now_wall - st.last_seen < STALE_AFTER
                if not fresh and st.is_up():
                    # heartbeats are late (a busy API, a slow link), but the channel is
                    # up: ask the server itself before calling it failed
                    if now - st.probed < STALE_AFTER:
                        continue
                    if not st.probing:
                        st.probing = True
                        self._spawn(self._probe(st))
                    continue
                if not fresh:
                    if st.state == "up" or (st.state == "new" and st.last_seen):
                        self._down(st, f"no heartbeat since "
                                   f"{time.strftime('%H:%M:%SZ', time.gmtime(st.last_seen))}")
                    continue
                if not st.is_up() and not st.dialling and now >= st.next_dial and st.public:
                    st.dialling = True
                    self._spawn(self._dial(st))
            await asyncio.sleep(_REFRESH)

    def _down(self, st: ServerState, reason: str) -> None:
        if st.state != "down" or st.reason != reason:
            log.error("tunnel server %s (%s) failed: %s", st.name, st.public, reason)
        st.state, st.reason, st.since = "down", reason, time.time()
        conn, st.conn = st.conn, None
        if conn is not None:
            conn.close()

    async def _dial(self, st: ServerState) -> None:
        from .config import _hostport

        try:
            host, port = _hostport(st.public, f"tunnel server {st.name}", 2220)
            conn = await asyncssh.connect(
                host, port, username=MANAGER_USER, client_keys=[self._key],
                known_hosts=([asyncssh.import_public_key(st.host_key)], [], []),
                agent_path=None, config=None, connect_timeout=10,
                keepalive_interval=5, keepalive_count_max=3)
        except (OSError, asyncssh.Error, ValueError, DPanelError) as exc:
            st.next_dial = time.monotonic() + _REDIAL
            self._down(st, f"cannot connect to {st.public}: {printable(str(exc))[:200]}")
            st.dialling = False
            return
        st.dialling = False
        st.conn, st.state, st.reason, st.since = conn, "up", "", time.time()
        log.info("tunnel server %s up at %s", st.name, st.public)
        self._spawn(self._watch(st, conn))
        self._spawn(self._reconcile(st))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _probe(self, st: ServerState) -> None:
        try:
            await self.control(st, {"op": "stats"})
            st.probed = time.monotonic()
            log.warning("tunnel server %s: heartbeats late, but it answers on its channel",
                        st.name)
        except DPanelError as exc:
            self._down(st, f"no heartbeat since "
                       f"{time.strftime('%H:%M:%SZ', time.gmtime(st.last_seen))}, and {exc}")
        finally:
            st.probing = False

    async def _watch(self, st: ServerState, conn: asyncssh.SSHClientConnection) -> None:
        await conn.wait_closed()
        if st.conn is conn:
            st.next_dial = time.monotonic() + _REDIAL
            self._down(st, "the manager's SSH connection to it was lost")

    async def _reconcile(self, st: ServerState) -> None:
        """After every (re)connect: a revoke pushed while it was unreachable was lost, so
        every device it holds is checked against the registry once."""
        try:
            held = await self.control(st, {"op": "devices"})
            revoked = await asyncio.to_thread(self._registry.revoked_ids)
            known = {d.id for d in await asyncio.to_thread(self._registry.devices, False)}
            for device in held.get("devices", []):
                if device in revoked or device not in known:
                    log.warning("tunnel server %s holds revoked device %s: kicking it",
                                st.name, device)
                    await self.control(st, {"op": "kick", "device": device})
        except DPanelError as exc:
            log.warning("tunnel server %s: reconcile failed: %s", st.name, exc)

    # ------------------------------------------------------------------ control channel
    async def control(self, st: ServerState, request: dict[str, Any]) -> dict[str, Any]:
        """One control command over the manager's SSH connection to ``st``."""
        conn = st.conn
        if conn is None or conn.is_closed():
            raise TunnelServerDown(f"tunnel server {st.name} ({st.public}) is down: "
                                   f"{st.reason or 'not connected'}")
        try:
            result = await asyncio.wait_for(conn.run(json.dumps(request), check=False),
                                            _CONTROL_TIMEOUT)
            answer = json.loads(str(result.stdout or ""))
        except asyncio.TimeoutError:
            raise TunnelServerDown(f"tunnel server {st.name} ({st.public}): no answer to "
                                   f"a control command within {_CONTROL_TIMEOUT:g} s") from None
        except (OSError, asyncssh.Error, ValueError) as exc:
            raise TunnelServerDown(f"tunnel server {st.name} ({st.public}): control "
                                   f"command failed: {printable(str(exc))[:200]}") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            raise TunnelServerDown(f"tunnel server {st.name}: {answer}")
        return answer

    async def sessions(self, st: ServerState) -> dict[str, int]:
        raw = (await self.control(st, {"op": "sessions"})).get("sessions") or {}
        return {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}

    async def port_of(self, st: ServerState, device: str) -> Optional[int]:
        """The port ``st`` allocated to ``device`` (None: none)."""
        port = (await self.control(st, {"op": "port", "device": device})).get("port")
        return port if isinstance(port, int) else None

    async def kick(self, device: str) -> None:
        """Push a revocation to every up server now (each one cuts the device off)."""
        async def one(st: ServerState) -> None:
            try:
                await self.control(st, {"op": "kick", "device": device})
            except DPanelError as exc:
                log.warning("kick %s: %s (reconciled when it is back)", device, exc)
        await asyncio.gather(*(one(st) for st in self.servers.values() if st.is_up()))
        self._placed.pop(device, None)
        self._unreach.pop(device, None)

    # ------------------------------------------------------------------ placement
    def tries(self) -> int:
        """How many servers one open request may be placed on in turn."""
        return max(1, min(MAX_TRIES, len(self.servers)))

    def _marks(self, device: str) -> dict[str, tuple[float, str]]:
        now = time.monotonic()
        marks = self._unreach.get(device, {})
        for name in [n for n, (until, _) in marks.items() if until <= now]:
            del marks[name]
        if not marks:
            self._unreach.pop(device, None)
        return marks

    def unreachable(self, device: str, st: ServerState, why: str) -> None:
        """``device`` could not reach ``st`` (it said so): skip it for this device for
        :data:`UNREACHABLE_FOR` s, other devices still use it."""
        why = printable(why)[:300]  # the device's own words
        log.warning("device %s cannot reach tunnel server %s (%s): %s; placing it "
                    "elsewhere for %g s", device, st.name, st.public, why, UNREACHABLE_FOR)
        self._unreach.setdefault(device, {})[st.name] = (time.monotonic() + UNREACHABLE_FOR,
                                                         why)
        if len(self._unreach) > 10000:  # a bound, whatever devices do: the oldest go
            for old in list(self._unreach)[:1000]:
                del self._unreach[old]
        placed = self._placed.get(device)
        if placed is not None and placed[0] == st.name:
            del self._placed[device]
        st.devices.pop(device, None)
        st.pending = max(0, st.pending - 1)

    def unreachable_from(self, st: ServerState) -> dict[str, str]:
        """device -> why, for the devices that cannot reach ``st`` now."""
        return {d: marks[st.name][1] for d in list(self._unreach)
                if st.name in (marks := self._marks(d))}

    def check_left(self, device: str) -> None:
        """Raise :class:`TunnelServerDown` naming every server and why, if none that is
        up is left for ``device`` (some are, but it cannot reach them)."""
        marks = self._marks(device)
        up_all = [st for st in self.servers.values() if st.is_up()]
        if up_all and all(st.name in marks for st in up_all):
            raise TunnelServerDown(f"device {device} cannot reach any tunnel server: "
                                   + "; ".join(self._why(st, marks) for st in
                                               sorted(self.servers.values(),
                                                      key=lambda s: s.name)))

    def place(self, device: str) -> ServerState:
        """The server the device's tunnel goes on (see the module docstring)."""
        self.check_left(device)
        marks = self._marks(device)
        up = [st for st in self.servers.values() if st.is_up() and st.name not in marks]
        for st in up:  # its tunnel lives there: sticky
            if device in st.devices:
                return st
        placed = self._placed.get(device)
        if placed is not None:
            was = self.servers.get(placed[0])
            if (was is not None and was.is_up() and was.name not in marks
                    and time.monotonic() - placed[1] < _STICKY_GRACE):
                return was
            if was is not None and not was.is_up():
                log.warning("device %s: its tunnel server %s failed (%s); placing it "
                            "elsewhere", device, was.name, was.reason)
        if not up:
            raise TunnelServerDown("no tunnel server is up: " + "; ".join(
                f"{st.name} ({st.public or 'never announced'}): {st.state}"
                + (f", {st.reason}" if st.reason else "")
                for st in sorted(self.servers.values(), key=lambda s: s.name)))
        best = min(up, key=lambda s: ((s.load + s.pending) / max(1, s.capacity), s.name))
        best.pending += 1
        self._placed[device] = (best.name, time.monotonic(), 0)
        return best

    @staticmethod
    def _why(st: ServerState, marks: dict[str, tuple[float, str]]) -> str:
        at = f"{st.name} ({st.public or 'never announced'})"
        if st.is_up() and st.name in marks:
            return f"{at}: up, but not reachable from the device: {marks[st.name][1]}"
        return f"{at}: {st.state}" + (f", {st.reason}" if st.reason else "")

    def placed(self, device: str, st: ServerState, port: int) -> None:
        self._placed[device] = (st.name, time.monotonic(), port)
        marks = self._unreach.get(device)
        if marks:
            marks.pop(st.name, None)  # reached after all (its site's network is back)
        st.devices[device] = port

    def server_of(self, device: str) -> Optional[ServerState]:
        placed = self._placed.get(device)
        return self.servers.get(placed[0]) if placed else None

    def via(self, device: str) -> Optional[asyncssh.SSHClientConnection]:
        """The SSH connection through which the device's port is reached (None: local)."""
        st = self.server_of(device)
        if st is None:
            return None
        if not st.is_up():
            raise TunnelServerDown(f"device {device}: its tunnel server {st.name} "
                                   f"({st.public}) is down: {st.reason}")
        return st.conn

    def tunnels(self) -> dict[str, int]:
        """device -> port over every up server (as their last heartbeats said)."""
        out: dict[str, int] = {}
        for st in self.servers.values():
            if st.is_up():
                out.update(st.devices)
        return out

    def list(self) -> list[dict[str, Any]]:
        return [{**st.view(), "unreachable_from": self.unreachable_from(st)}
                for st in sorted(self.servers.values(), key=lambda s: s.name)]


class _Unauthorized(RegistryError):
    code = ErrorCode.UNAUTHORIZED

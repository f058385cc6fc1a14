"""The public tunnel: an asyncssh server that only grants each device one reverse forward.

Devices dial in with username = device id and password = device secret, and ask for a
remote forward on port 0 (``ssh -R 0:...``). The server picks a random free port from its
pool, binds it on loopback only, and tells the device which one it got. Nothing else is
allowed: no session (shell/exec/subsystem/pty/agent/X11), no direct-tcpip, no unix or
tun/tap forwards, no second port, no port of another device.

Robustness rules, each learned from tunnel servers in the field:

* a reconnecting device evicts its own stale session at once and gets its previous port
  back (OpenSSH ``-R`` + autossh keeps the device locked out until the stale session
  times out);
* every disconnect path (client close, keepalive timeout, kick, eviction, server close,
  cancel-tcpip-forward, bind error) returns the port to the pool;
* the internet cannot lock devices out (asyncssh has no MaxStartups): unauthenticated
  connections pass :class:`~dpanel_server._gate.PreAuthGate` at accept (per-source
  penalties for failed or abandoned logins, per-source random early drop, and a global cap
  that evicts the busiest address's oldest connection instead of refusing newcomers), and
  must finish their key exchange within ``handshake_timeout`` (5 s) and log in within
  ``login_timeout`` (10 s); a device on a slow cellular link needs 1-3 s for both;
* revocation is re-checked in the registry at every forward request (``allowed``), on top
  of the manager's push (``kick``) and the revision poll;
* every per-connection and per-device log line is rate-limited per source address or
  device (:mod:`dpanel_proto.ratelog`), so no peer can flood the journal;
* a device's port is written to the sticky map within ``sticky_save_delay`` of being
  allocated (batched), so even a SIGKILLed tunnel gives devices their ports back.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import random
import resource
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Literal, Optional, Union

import asyncssh

from dpanel_proto.ratelog import REPORT_SOURCE, RateLimitedLog
from dpanel_proto.wire import DecodeError, printable, validate_device_id

from ._files import atomic_write, ensure_private_key
from ._forwarding import forward_local_port, forward_to
from ._gate import Outcome, PreAuthGate, Startups, source_key
from ._pool import PoolExhausted, PortPool
from .errors import ConfigError
from .metrics import AUTH_FAILURES
from .relaypeers import RELAYS

__all__ = [
    "ALLOWED_LISTEN_HOSTS",
    "MANAGER_USER",
    "MAX_AUTH_FAILURES",
    "VERIFY_CONCURRENCY",
    "TunnelServer",
    "TunnelSettings",
    "host_key_line",
    "load_host_key",
]

log = logging.getLogger("dpanel.tunnel")

#: What a device may name as the listen address of its forward. The port is always bound
#: on ``TunnelSettings.bind_host`` whatever it says; these are only the spellings of
#: "loopback" that clients send ('' = asyncssh default, 'localhost' = OpenSSH ``-R 0:..``).
ALLOWED_LISTEN_HOSTS = frozenset({"", "localhost", "127.0.0.1"})

Verify = Callable[[str, str], bool]
#: ``allowed(device)``: is the device still enrolled and not revoked? Called in a thread at
#: every forward request, so it may read the registry.
Allowed = Callable[[str], bool]

#: Wrong passwords allowed per connection before it is dropped (OpenSSH MaxAuthTries is 6;
#: a device knows its secret, so a second wrong one is already an attack or a bad token).
MAX_AUTH_FAILURES = 3
#: The SSH user name of the manager on a tunnel server: not a device id (a dot), so no
#: device can ever be it; it logs in by key only (``TunnelServer.manager_keys``).
MANAGER_USER = "dpanel.manager"
#: verify() calls running at once; the rest queue, so a reconnect storm of thousands of
#: devices cannot take every thread of the default executor.
VERIFY_CONCURRENCY = 8


@dataclass(frozen=True)
class TunnelSettings:
    """Everything the tunnel server needs; validated at construction (errors name the field)."""

    host_key_path: Path
    listen_host: str = "0.0.0.0"
    listen_port: int = 2220
    port_min: int = 20000
    port_max: int = 29999
    #: Forwarded ports are bound here and only here; anything not loopback is refused.
    bind_host: str = "127.0.0.1"
    keepalive_interval: float = 15
    keepalive_count_max: int = 3
    #: From accept to logged in. OpenSSH's 120 s suits humans typing; a device sends its
    #: secret at once and needs 1-3 s even over a poor cellular link.
    login_timeout: float = 10
    #: From accept to the first authentication request (banner + key exchange done):
    #: a connection that sends a banner and then nothing is gone after this.
    handshake_timeout: float = 5
    #: Unauthenticated connections at once; at the cap a newcomer evicts the oldest
    #: connection of the busiest address (see :mod:`dpanel_server._gate`). ~23 KB each.
    max_unauthenticated: int = 1000
    #: OpenSSH MaxStartups start:rate:full, applied to each source address's pending
    #: connections (a device has one at a time; a NAT'd site reconnecting a few more).
    per_source_startups: str = "5:30:20"
    #: OpenSSH PerSourcePenalties: seconds added to a source's score per failed / abandoned
    #: login; at ``penalty_min`` the source is refused for its score (<= ``penalty_max``).
    penalty_authfail: float = 5.0
    penalty_noauth: float = 1.0
    penalty_min: float = 15.0
    penalty_max: float = 60.0
    #: A device that comes back within this many seconds gets its previous port again.
    sticky_seconds: float = 86400
    #: Where the sticky port map is saved on close and read on start, so a restarted tunnel
    #: gives devices their ports back too (``None``: kept in memory only).
    sticky_path: Optional[Path] = None
    #: Allocations are written to ``sticky_path`` at most this long after they happen,
    #: batched (one write for a burst of reconnecting devices, never one per connection).
    sticky_save_delay: float = 0.5
    #: How many pool ports to try when binding fails because another process holds one.
    bind_attempts: int = 16

    def __post_init__(self) -> None:
        try:
            bind = ipaddress.ip_address(self.bind_host)
        except ValueError:
            raise ConfigError(
                f"bind_host: {self.bind_host!r} is not an IP address (use 127.0.0.1)"
            ) from None
        if not bind.is_loopback:
            raise ConfigError(
                f"bind_host: {self.bind_host} is not a loopback address; forwarded device "
                "ports must never be reachable from the network"
            )
        checks: list[tuple[bool, str]] = [
            (0 <= self.listen_port <= 65535, "listen_port: must be 0-65535"),
            (1024 <= self.port_min <= self.port_max <= 65535,
             f"port_min/port_max: {self.port_min}-{self.port_max} must be within 1024-65535"),
            (self.keepalive_interval > 0,
             "keepalive_interval: must be > 0 (dead peers would hold their ports forever)"),
            (self.keepalive_count_max >= 1, "keepalive_count_max: must be >= 1"),
            (self.login_timeout > 0, "login_timeout: must be > 0"),
            (self.handshake_timeout > 0, "handshake_timeout: must be > 0"),
            (self.max_unauthenticated >= 1, "max_unauthenticated: must be >= 1"),
            (min(self.penalty_authfail, self.penalty_noauth) >= 0,
             "penalty_authfail/penalty_noauth: must be >= 0"),
            (0 < self.penalty_min <= self.penalty_max,
             "penalty_min/penalty_max: need 0 < penalty_min <= penalty_max"),
            (self.sticky_save_delay >= 0, "sticky_save_delay: must be >= 0"),
            (self.sticky_seconds >= 0, "sticky_seconds: must be >= 0"),
            (self.bind_attempts >= 1, "bind_attempts: must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        Startups.parse(self.per_source_startups)

    @classmethod
    def from_config(cls, tunnel: object, **overrides: object) -> TunnelSettings:
        """Build from ``dpanel_server.config.TunnelConfig`` (already validated)."""
        from .config import TunnelConfig, _hostport  # local: config imports are heavy-ish

        if not isinstance(tunnel, TunnelConfig):
            raise TypeError(f"expected TunnelConfig, got {type(tunnel).__name__}")
        host, port = _hostport(tunnel.listen, "tunnel.listen", 2220)
        lo, hi = tunnel.ports
        values: dict[str, object] = {
            "host_key_path": Path(tunnel.host_key), "listen_host": host, "listen_port": port,
            "port_min": lo, "port_max": hi, "keepalive_interval": tunnel.keepalive_interval,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def load_host_key(path: Union[str, Path]) -> asyncssh.SSHKey:
    """Load the tunnel host key, creating an ed25519 key (0600, atomic) the first time."""
    p = Path(path)
    try:
        key = ensure_private_key(p)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"host_key: cannot load {p}: {exc}") from None
    mode = stat.S_IMODE(os.stat(p).st_mode)
    if mode & 0o077:
        log.warning("host key %s is readable by group/others (mode %o); chmod 600 it", p, mode)
    return key


def host_key_line(path: Union[str, Path]) -> str:
    """The OpenSSH public key line of the host key at ``path`` (created if missing)."""
    return load_host_key(path).export_public_key().decode().strip()


class _PoolListener(asyncssh.SSHListener):
    """What asyncssh keeps for a granted forward: closing it (cancel-tcpip-forward or
    connection cleanup) closes the real socket listener and gives the port back."""

    def __init__(self, session: _Session, inner: asyncssh.SSHListener, port: int) -> None:
        super().__init__()
        self._session: Optional[_Session] = session
        self._inner = inner
        self._port = port

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        if self._session is not None:
            self._session.release_port("forward closed")
            self._session = None
        self._inner.close()

    async def wait_closed(self) -> None:
        await self._inner.wait_closed()


ForwardState = Literal["none", "pending", "bound"]


class _Session(asyncssh.SSHServer):
    """Per-connection state; kept small because there are thousands of these."""

    def __init__(self, server: TunnelServer) -> None:
        self._srv = server
        self._conn: Optional[asyncssh.SSHServerConnection] = None
        self.peer = "?"
        self.source = "?"
        self.username = ""
        self.failures = 0
        self.authed = False
        self.gone = False
        #: counted by the pre-auth gate (admitted, not yet authenticated or gone)
        self.pending = False
        self._handshake: Optional[asyncio.TimerHandle] = None
        self.forward: ForwardState = "none"
        self.port: Optional[int] = None
        self._listener: Optional[asyncssh.SSHListener] = None
        #: a manager logged in with a trusted key (remote tunnel servers, see .tsrv)
        self.manager = False

    @property
    def log_key(self) -> str:
        """Whose log budget a line spends: the device once known, else the address."""
        return f"device {self.username}" if self.authed else self.source

    # ------------------------------------------------------------ connection lifecycle

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        # a connection the TLS edge relays on loopback: the device's own address (the
        # edge recorded it in-process; nothing a device sends can put it there)
        device = RELAYS.lookup(peer)
        if device is not None:
            self.peer = f"{device[0]}:{device[1]} (via edge {peer[0]}:{peer[1]})"
            self.source = source_key(device[0])
        elif isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
            self.source = source_key(str(peer[0]))
        srv = self._srv
        srv._sessions.add(self)
        loop = asyncio.get_running_loop()
        if srv._closing:
            self.gone = True
            loop.call_soon(conn.abort)  # asyncssh is still inside connection_made
            return
        refusal, victim = srv._gate.admit(self, self.source)
        if isinstance(victim, _Session):
            victim.evict()
        if refusal is not None:
            srv._rlog.warning(self.source, "refused connection from %s: %s", self.peer,
                              refusal)
            self.gone = True
            # Abort from a fresh callback: asyncssh is still inside connection_made.
            loop.call_soon(conn.abort)
            return
        self.pending = True
        self._handshake = loop.call_later(srv.settings.handshake_timeout,
                                          self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._handshake = None
        if self.pending and self._conn is not None and not self.username:
            self._srv._rlog.info(self.source, "connection from %s: no key exchange within "
                                 "%g s; dropped", self.peer, self._srv.settings.handshake_timeout)
            self.gone = True
            self._conn.abort()

    def evict(self) -> None:
        """Make room for a newcomer (the gate already chose and forgot this one)."""
        self._srv._rlog.warning(self.source, "too many unauthenticated connections; "
                                "evicting %s, the oldest of the busiest address", self.peer)
        self._end_pending("noauth")
        self.gone = True
        conn = self._conn
        if conn is not None:
            asyncio.get_running_loop().call_soon(conn.abort)

    def _end_pending(self, outcome: Outcome) -> None:
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        if self.pending:
            self.pending = False
            self._srv._gate.done(self, outcome, self.source)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.gone = True
        self._end_pending("authfail" if self.failures else "noauth")
        self.release_port("disconnected")
        srv = self._srv
        srv._sessions.discard(self)
        if self.manager:
            srv._rlog.info(self.source, "manager disconnected from %s", self.peer)
        elif self.authed and srv._by_device.get(self.username) is self:
            del srv._by_device[self.username]
        if self.authed and not self.manager:
            srv._rlog.info(self.log_key, "device %s disconnected from %s (%s)", self.username,
                           self.peer, exc or "closed")
        self._conn = None

    def close(self, reason: str) -> None:
        """Drop this connection now (kick, eviction, server close); frees the port first."""
        self.gone = True
        self._end_pending("ours")
        self.release_port(reason)
        if self._conn is not None:
            self._conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)

    async def wait_closed(self) -> None:
        conn = self._conn
        if conn is not None:
            await conn.wait_closed()

    # ------------------------------------------------------------ authentication

    def begin_auth(self, username: str) -> bool:
        # shown in logs before it is checked: escaped and capped until it proves valid
        self.username = printable(username[:80])
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        self._srv._gate.authing(self)
        return True

    def password_auth_supported(self) -> bool:
        return self.username != MANAGER_USER

    def public_key_auth_supported(self) -> bool:
        # only the manager, only by key; devices never (their secret is their identity)
        return self.username == MANAGER_USER and bool(self._srv.manager_keys)

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if username != MANAGER_USER:
            return False
        ok = any(key == k for k in self._srv.manager_keys)
        if not ok:
            self._srv._rlog.warning(self.source, "manager login from %s with an untrusted "
                                    "key refused", self.peer)
            self._count_failure()
        return ok

    def kbdint_auth_supported(self) -> bool:
        return False  # else asyncssh emulates it on top of password auth

    async def validate_password(self, username: str, password: str) -> bool:
        rlog = self._srv._rlog
        try:
            self.username = validate_device_id(username)
        except DecodeError:
            rlog.warning(self.source, "auth refused from %s: %r is not a device id", self.peer,
                         username[:80])
            self._count_failure()
            return False
        try:
            async with self._srv._verify_slots:
                ok = await asyncio.to_thread(self._srv._verify, username, password)
        except Exception:
            # the registry failed (a database outage), not the device: refused, but not
            # counted against it, or every device would be penalised once it is back
            rlog.exception(self.source, "auth for device %s from %s: verify failed", username,
                           self.peer)
            return False
        if ok:
            return not self.gone
        # Never log the secret; the device id and address are what an operator needs.
        rlog.warning(self.source, "auth failed for device %s from %s", username, self.peer)
        self._count_failure()
        return False

    def _count_failure(self) -> None:
        AUTH_FAILURES.labels("tunnel").inc()
        self.failures += 1
        conn = self._conn
        if self.failures >= MAX_AUTH_FAILURES and conn is not None:
            self.gone = True
            asyncio.get_running_loop().call_soon(
                conn.disconnect, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                "too many authentication failures")

    def auth_completed(self) -> None:
        self._end_pending("auth")
        self.authed = True
        srv = self._srv
        if self.username == MANAGER_USER:
            self.manager = True
            srv._rlog.info(self.source, "manager connected from %s", self.peer)
            return
        old = srv._by_device.get(self.username)
        if old is not None and old is not self:
            srv._rlog.info(self.log_key, "device %s reconnected from %s; evicting its stale "
                           "session from %s", self.username, self.peer, old.peer)
            old.close("replaced by a new session of the same device")
        srv._by_device[self.username] = self
        srv._rlog.info(self.log_key, "device %s authenticated from %s", self.username, self.peer)

    # ------------------------------------------------------------ what is refused

    def _refuse(self, what: str) -> Literal[False]:
        self._srv._rlog.warning(self.log_key, "device %s from %s: refused %s",
                                self.username or "?", self.peer, what)
        return False

    def session_requested(self) -> Union[Literal[False], asyncssh.SSHServerSession[str]]:
        if self.manager and self._srv.control is not None:
            return self._srv.control()  # the manager's control commands (.tsrv)
        return self._refuse("a session (shell/exec/subsystem)")

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int
                             ) -> Union[bool, Awaitable[asyncssh.SSHTCPSession[bytes]]]:
        if self.manager:
            # the manager reaches device ports through us, and nothing else: exactly our
            # bind address (loopback), exactly a port we allocated to a bound forward
            srv = self._srv
            if dest_host == srv.settings.bind_host and dest_port in srv.sessions().values():
                return forward_to(dest_host, dest_port)
            return self._refuse(f"manager direct-tcpip to {dest_host[:80]!r}:{dest_port} "
                                "(not a device port of this tunnel server)")
        return self._refuse(f"direct-tcpip to {dest_host[:80]!r}:{dest_port}")

    def unix_connection_requested(self, dest_path: str) -> Literal[False]:
        return self._refuse("a unix socket connection")

    def unix_server_requested(self, listen_path: str) -> Literal[False]:
        return self._refuse("a unix socket forward")

    def tun_requested(self, unit: Optional[int]) -> Literal[False]:
        return self._refuse("a tun device")

    def tap_requested(self, unit: Optional[int]) -> Literal[False]:
        return self._refuse("a tap device")

    # ------------------------------------------------------------ the one thing allowed

    def server_requested(self, listen_host: str, listen_port: int
                         ) -> Union[bool, Awaitable[Union[bool, asyncssh.SSHListener]]]:
        if not self.authed or self.gone:
            return False
        if self.manager:
            return self._refuse("a port forward by the manager")
        if self.forward != "none":
            return self._refuse(f"a second port forward ({listen_host[:80]!r}:{listen_port})")
        if listen_host not in ALLOWED_LISTEN_HOSTS:
            return self._refuse(f"a forward on {listen_host[:80]!r} (only loopback)")
        if listen_port != 0 and listen_port != self._srv._pool.sticky_port(self.username):
            return self._refuse(f"port {listen_port}: not this device's port (ask for 0)")
        # Set before the first await so a burst of requests cannot race past the check.
        self.forward = "pending"
        return self._open_forward(listen_host, listen_port)

    async def _still_allowed(self) -> bool:
        """Ask the registry again: a revoke may have happened since this device logged in,
        and a push from the manager (kick) can be lost, e.g. while the tunnel restarted."""
        allowed = self._srv._allowed
        if allowed is None:
            return True
        try:
            ok = await asyncio.to_thread(allowed, self.username)
        except Exception:
            # fail closed: the device retries, a revoked one must not get a port meanwhile
            self._srv._rlog.exception(self.log_key, "device %s: registry check failed; "
                                      "refusing its forward", self.username)
            return False
        if not ok:
            self._srv._rlog.warning(self.log_key, "device %s is revoked or deleted; refusing "
                                    "its forward and dropping it", self.username)
            self.close("revoked")
        return ok

    async def _open_forward(self, listen_host: str, listen_port: int
                            ) -> Union[bool, asyncssh.SSHListener]:
        rlog = self._srv._rlog
        try:
            if not await self._still_allowed() or self.gone:
                listener = None
            else:
                listener = await self._bind(listen_host, listen_port)
        except PoolExhausted as exc:
            rlog.warning(self.log_key, "device %s: %s; refused its forward", self.username, exc)
            listener = None
        except Exception:
            rlog.exception(self.log_key, "device %s: forward failed", self.username)
            listener = None
        if listener is None:
            self.release_port("forward failed")
            return False
        return listener

    async def _bind(self, listen_host: str, listen_port: int) -> Optional[asyncssh.SSHListener]:
        srv, pool, device = self._srv, self._srv._pool, self.username
        rlog = srv._rlog
        held_elsewhere: set[int] = set()
        for _ in range(srv.settings.bind_attempts):
            if listen_port:
                if not pool.claim(device, listen_port):
                    return None
                port = listen_port
            else:
                port = pool.acquire(device, avoid=held_elsewhere)
            self.port = port
            conn = self._conn
            if conn is None or self.gone:
                return None
            try:
                # The maintainer's recipe: bind our pool port, and label forwarded channels
                # with (listen_host, port), because OpenSSH clients match them literally.
                # Channel window/packet size stay at asyncssh's 2 MiB/32 KiB: measured, 8 MiB
                # windows gained nothing and 128 KiB packets halved device->manager speed.
                # The cipher is what matters (the device picks it; AES-GCM >> chacha20).
                inner = await forward_local_port(conn, srv.settings.bind_host, port,
                                                 listen_host, port)
            except OSError as exc:
                self.port = None
                pool.release(port, sticky=exc.errno != errno.EADDRINUSE)
                if exc.errno != errno.EADDRINUSE or listen_port:
                    rlog.error(self.log_key, "device %s: cannot bind %s:%d: %s", device,
                               srv.settings.bind_host, port, exc)
                    return None
                rlog.info(self.log_key, "port %d is held by another process; trying another",
                          port)
                held_elsewhere.add(port)
                continue
            if self.gone or self.port != port:
                # The connection went away (or was kicked) while we were binding.
                inner.close()
                return None
            self._listener = inner
            self.forward = "bound"
            srv._allocated(device, port)
            rlog.info(self.log_key, "device %s: forwarding %s:%d", device,
                      srv.settings.bind_host, port)
            return _PoolListener(self, inner, port)
        rlog.error(self.log_key, "device %s: no bindable port after %d attempts (other "
                   "processes hold ports of the pool %d-%d)", device,
                   srv.settings.bind_attempts, pool.lo, pool.hi)
        return None

    def release_port(self, reason: str) -> None:
        """Close the forward's socket and give its port back. Idempotent."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        port, self.port = self.port, None
        if port is not None:
            self._srv._pool.release(port)
            self._srv._rlog.info(self.log_key, "device %s: port %d released (%s)",
                                 self.username, port, reason)
        self.forward = "none"


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d: %s; at most ~%d tunnels",
                    soft, exc, soft // 2)


class TunnelServer:
    """The public tunnel. One instance per process; thousands of devices per instance."""

    def __init__(self, settings: TunnelSettings, verify: Verify, *,
                 allowed: Optional[Allowed] = None,
                 rng: Optional[random.Random] = None) -> None:
        self.settings = settings
        #: public keys of managers allowed in as MANAGER_USER (empty: none; see .tsrv)
        self.manager_keys: list[asyncssh.SSHKey] = []
        #: makes the session of a manager's control command (set by .tsrv)
        self.control: Optional[Callable[[], asyncssh.SSHServerSession[str]]] = None
        self._verify = verify
        self._allowed = allowed
        self._key = load_host_key(settings.host_key_path)
        self._pool = PortPool(settings.port_min, settings.port_max,
                              sticky_seconds=settings.sticky_seconds, rng=rng)
        self._acceptor: Optional[asyncssh.SSHAcceptor] = None
        self._sessions: set[_Session] = set()
        self._by_device: dict[str, _Session] = {}
        self._gate = PreAuthGate(
            max_unauthenticated=settings.max_unauthenticated,
            per_source=Startups.parse(settings.per_source_startups),
            penalty_authfail=settings.penalty_authfail,
            penalty_noauth=settings.penalty_noauth,
            penalty_min=settings.penalty_min, penalty_max=settings.penalty_max, rng=rng)
        # per source address / device: 10 lines, then one per 2 s; all sources: 200, then
        # 50 a second; "suppressed N ... from KEY" (flushed by the housekeeping loop)
        self._rlog = RateLimitedLog(log, rate=0.5, burst=10, global_rate=50.0,
                                    global_burst=200, max_keys=4096, report=REPORT_SOURCE)
        self._closing = False
        self._verify_slots = asyncio.Semaphore(VERIFY_CONCURRENCY)
        self._housekeeping: Optional[asyncio.Task[None]] = None
        #: the sticky map as last written, and the pending batched write
        self._sticky_saved: dict[str, int] = {}
        #: snapshots are numbered on the loop; a write older than the last one written is
        #: skipped (a batched write still in its thread when close() writes the final map)
        self._sticky_seq = 0
        self._sticky_written = 0
        self._sticky_lock = threading.Lock()
        self._sticky_dirty = False
        self._sticky_writer: Optional[asyncio.Task[None]] = None
        self._load_sticky()

    def _load_sticky(self) -> None:
        path = self.settings.sticky_path
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            ports = {validate_device_id(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring sticky port map %s: %s", path, exc)
            return
        kept = self._pool.preload(ports)
        self._sticky_saved = self._pool.export()
        log.info("sticky port map %s: %d of %d ports reserved for returning devices",
                 path, kept, len(ports))

    def _save_sticky(self) -> None:
        path = self.settings.sticky_path
        if path is None:
            return
        self._sticky_seq += 1
        self._write_sticky(path, self._pool.export(), self._sticky_seq)

    def _write_sticky(self, path: Path, ports: dict[str, int], seq: int) -> None:
        with self._sticky_lock:
            if seq <= self._sticky_written:
                return
            try:
                atomic_write(path, json.dumps(ports, indent=0) + "\n", 0o600)
            except OSError as exc:
                log.warning("cannot save sticky port map %s: %s", path, exc)
                return
            self._sticky_written = seq
            self._sticky_saved = ports

    def _allocated(self, device: str, port: int) -> None:
        """A forward was bound: persist the device's port soon if it is a new one, so a
        SIGKILLed tunnel still gives it back. Reconnects to the same port cost nothing."""
        if self.settings.sticky_path is None or self._sticky_saved.get(device) == port:
            return
        self._sticky_dirty = True
        if self._sticky_writer is None or self._sticky_writer.done():
            self._sticky_writer = asyncio.get_running_loop().create_task(self._flush_sticky())

    async def _flush_sticky(self) -> None:
        path = self.settings.sticky_path
        assert path is not None
        while self._sticky_dirty:
            # one write for every allocation of the next sticky_save_delay seconds
            await asyncio.sleep(self.settings.sticky_save_delay)
            self._sticky_dirty = False
            ports = self._pool.export()
            if ports != self._sticky_saved:
                # fsync + rename off the loop; the snapshot was taken on it
                self._sticky_seq += 1
                await asyncio.to_thread(self._write_sticky, path, ports, self._sticky_seq)

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(5)
            self._rlog.flush()  # "suppressed N" for floods that stopped

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen. Also raises this process's open-file soft limit to the hard limit:
        every tunnel costs at least two descriptors (its SSH socket and its port)."""
        if self._acceptor is not None:
            raise RuntimeError("tunnel server already started")
        _raise_fd_limit()
        s = self.settings
        self._closing = False
        self._acceptor = await asyncssh.create_server(
            lambda: _Session(self), s.listen_host, s.listen_port,
            server_host_keys=[self._key],
            password_auth=True, kbdint_auth=False,
            # the manager's key login on a remote tunnel server; devices: password only
            public_key_auth=self.control is not None,
            host_based_auth=False, gss_host=None,
            allow_pty=False, agent_forwarding=False, x11_forwarding=False,
            login_timeout=s.login_timeout,
            keepalive_interval=s.keepalive_interval, keepalive_count_max=s.keepalive_count_max,
            server_version="dpanel_tunnel",
            reuse_address=True, backlog=1024,
        )
        self._housekeeping = asyncio.create_task(self._housekeep())
        log.info("tunnel listening on %s:%d; ports %d-%d on %s", s.listen_host, self.port,
                 s.port_min, s.port_max, s.bind_host)

    async def close(self) -> None:
        """Stop accepting, drop every session, free every port."""
        self._closing = True
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.close()
        for task in (self._housekeeping, self._sticky_writer):
            if task is not None:
                task.cancel()
        self._housekeeping = self._sticky_writer = None
        sessions = list(self._sessions)
        for session in sessions:
            session.close("tunnel server shutting down")
        self._save_sticky()
        self._rlog.flush()
        if sessions:
            await asyncio.wait([asyncio.ensure_future(s.wait_closed()) for s in sessions],
                               timeout=5)
        if acceptor is not None:
            await acceptor.wait_closed()

    async def __aenter__(self) -> TunnelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ queries and control

    @property
    def port(self) -> int:
        if self._acceptor is None:
            raise RuntimeError("tunnel server not started")
        return self._acceptor.get_port()

    def host_key_line(self) -> str:
        return self._key.export_public_key().decode().strip()

    def kick(self, device: str) -> bool:
        """Drop every session of ``device`` (authenticated or still authenticating)."""
        victims = [s for s in self._sessions if s.username == device and not s.gone]
        for session in victims:
            session.close("kicked by the manager")
        if victims:
            self._rlog.info(f"device {device}", "device %s kicked (%d session(s))", device,
                            len(victims))
        return bool(victims)

    def sessions(self) -> dict[str, int]:
        """device -> port of every bound forward: the tunnel's own allocation, the only
        port the manager may believe."""
        return {dev: s.port for dev, s in self._by_device.items()
                if s.port is not None and s.forward == "bound"}

    def devices(self) -> set[str]:
        """Every authenticated device, with a forward or not (for the revocation check)."""
        return set(self._by_device)

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self._sessions),
            "unauthenticated": self._gate.pending,
            "penalised_sources": self._gate.penalised_sources,
            "devices": len(self._by_device),
            "ports_in_use": self._pool.in_use,
            "ports_reserved": self._pool.reserved,
            "pool_free": self._pool.free,
        }


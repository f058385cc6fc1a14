"""The outbound tunnel: dial the public tunnel with asyncssh and hold one reverse forward
(``ssh -R 0:127.0.0.1:<target>``; the server picks the port) for as long as it is wanted.

Lifetime rules: the forward lives until its TTL passes, a close request arrives, or nobody
has had a connection through it for ``idle_timeout`` seconds. While it is wanted and the
SSH connection drops (tunnel server restart, network cut), it is redialled with jittered
backoff and the new port is reported. Deadlines use the monotonic clock: a Raspberry Pi
without an RTC jumps its wall clock when NTP syncs, and that must not close tunnels.

Redialling never spins: a refusal by the tunnel (wrong or revoked credentials, host key,
forward refused) backs off much more slowly than an unreachable tunnel (from 5 s up to
5 minutes, jittered), a connection that drops soon after it came up waits its backoff
before the next dial, and only the connection we hold can cut a backoff wait short. All
redialling stops when the tunnel's TTL passes. A request-driven dial carries the
request's expiry: an expired request never dials, and a dial that only finished after
the expiry is undone unless the tunnel was wanted already.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import time
from typing import Callable, List, Optional, Set, Tuple

import asyncssh
from asyncssh.forward import SSHForwarder

from dpanel_proto.ports import TUNNEL_PORT
from dpanel_proto.proxy import ProxyError, select_proxy
from dpanel_proto.token import DeviceToken
from dpanel_proto.util import Backoff, parse_hostport, skip_none_auth
from dpanel_proto.wire import ErrorCode, printable

from .audit import note_origin
from .errors import TunnelError
from .netpath import Endpoint, TlsTunnel, ssh_endpoint

__all__ = ["TunnelError", "TunnelLink", "preferred_ciphers"]

log = logging.getLogger("dpanel.agent.tunnel")

#: A tunnel connection that lived this long resets the backoff; one that dropped sooner
#: (a server that accepts and then evicts us, a second agent with the same token) waits
#: its backoff before the next dial.
_STABLE_AFTER = 30.0
#: Dials per open request when the tunnel cannot be reached (see _dial_retrying).
_OPEN_ATTEMPTS = 3

#: Seconds a tunnel server named by an open request has to accept the TCP connection.
#: A site whose firewall drops packets to that one server (it is alive, and the manager
#: hears it) would otherwise hold the request until the manager gives up; answering
#: "unreachable" early lets the manager place the tunnel on another server in time.
NAMED_CONNECT_TIMEOUT = 5.0

#: Backoff after the tunnel refused us (auth, host key, forward): a revoked device must
#: settle to a slow retry, not hammer the tunnel and fill both sides' logs.
REFUSED_BACKOFF = (5.0, 300.0)


class _CountingForwarder(SSHForwarder):
    """The channel side of one forwarded connection; tells the link when it starts and
    ends, which is how "idle" is defined (no connection through the tunnel)."""

    def __init__(self, peer: SSHForwarder, link: TunnelLink) -> None:
        super().__init__(peer)
        self._link: Optional[TunnelLink] = link
        link._conn_opened(self)

    def eof_received(self) -> bool:
        # asyncssh closes a forwarded pair only when its TCP side is the second to see
        # EOF; when the device's local socket ended first and the tunnel's EOF arrives
        # second, the channel stayed open with both directions at EOF, forever: the
        # tunnel never counted as idle and each such connection leaked a socket. Both
        # ends done means done.
        keep_open = super().eof_received()
        if not keep_open:
            self.close()
        return keep_open

    def connection_lost(self, exc: Optional[Exception]) -> None:
        link, self._link = self._link, None
        if link is not None:
            link._conn_closed(self)
        super().connection_lost(exc)


class _Client(asyncssh.SSHClient):
    def __init__(self, link: TunnelLink) -> None:
        self._link = link
        self._conn: Optional[asyncssh.SSHClientConnection] = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn
        skip_none_auth(conn, b"password")

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._link._lost(self._conn, exc)


def _cpu_has_aes(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """x86 'flags' and arm64 'Features' both list 'aes' when the CPU has AES instructions."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.split(":")[0].strip().lower() in ("flags", "features"):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def preferred_ciphers(has_aes: bool) -> Optional[List[str]]:
    """AES-GCM first where the CPU accelerates it (x86, Pi 5, RK3588): measured on the
    tunnel at 0.9-1.06x OpenSSH against ~0.6x with asyncssh's default chacha20. Pi 3/4
    lack AES instructions, so they keep asyncssh's default order (chacha20 first)."""
    if not has_aes:
        return None
    return ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
            "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr"]


_CIPHERS = preferred_ciphers(_cpu_has_aes())


def _classify(exc: BaseException) -> Tuple[ErrorCode, str]:
    """Refused = the tunnel answered and said no (auth, host key, port); unreachable =
    we could not talk to it at all (DNS, TCP, timeout, dropped mid-handshake)."""
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return ErrorCode.TUNNEL_REFUSED, f"tunnel host key does not match the pinned key ({exc})"
    if isinstance(exc, asyncssh.PermissionDenied):
        return ErrorCode.TUNNEL_REFUSED, f"tunnel refused this device's credentials ({exc})"
    if isinstance(exc, asyncssh.ChannelListenError):
        return ErrorCode.TUNNEL_REFUSED, f"tunnel refused the port forward ({exc})"
    if isinstance(exc, asyncssh.ConnectionLost):
        return ErrorCode.TUNNEL_UNREACHABLE, f"tunnel connection lost ({exc})"
    if isinstance(exc, asyncssh.DisconnectError):
        return ErrorCode.TUNNEL_REFUSED, f"tunnel disconnected us ({exc})"
    if isinstance(exc, ProxyError):
        return ErrorCode.TUNNEL_UNREACHABLE, str(exc)
    if isinstance(exc, ssl.SSLError):
        return ErrorCode.TUNNEL_UNREACHABLE, f"TLS to the edge failed ({exc.reason or exc})"
    if isinstance(exc, asyncio.TimeoutError):
        return ErrorCode.TUNNEL_UNREACHABLE, "tunnel did not answer in time"
    if isinstance(exc, OSError):
        return ErrorCode.TUNNEL_UNREACHABLE, f"cannot reach the tunnel ({exc.strerror or exc})"
    return ErrorCode.TUNNEL_UNREACHABLE, f"tunnel failed: {exc}"


class TunnelLink:
    """One reverse forward to ``target_host:target_port`` through the public tunnel."""

    def __init__(self, token: DeviceToken, target: Tuple[str, int], *,
                 on_port: Callable[[Optional[int]], None], keepalive: float,
                 window: int, backoff: Backoff, connect_timeout: float = 20,
                 refused_backoff: Optional[Backoff] = None,
                 proxy_setting: Optional[str] = None) -> None:
        self._token = token
        self._proxy_setting = proxy_setting
        #: the tunnel server dialled: None = the token's; (host:port, key line) when a
        #: signed open request named one (the manager places tunnels on several servers)
        self.server: Optional[Tuple[str, str]] = None
        self._known: Tuple[List[asyncssh.SSHKey], List[asyncssh.SSHKey], List[asyncssh.SSHKey]]
        self._aim(None, connect_timeout)
        self.target = target
        self._on_port = on_port
        self._keepalive = keepalive
        self._window = window
        self._backoff = backoff
        self._refused_backoff = refused_backoff or Backoff(*REFUSED_BACKOFF, floor=0.5)
        self._up_since = 0.0  # monotonic time the current connection came up
        self._connect_timeout = connect_timeout
        self._conn: Optional[asyncssh.SSHClientConnection] = None
        self._listener: Optional[asyncssh.SSHListener] = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._supervisor: Optional[asyncio.Task[None]] = None
        self.port: Optional[int] = None
        self.wanted = False
        self.deadline = 0.0  # monotonic end of TTL
        self.idle_timeout = 0.0
        # Connections through the tunnel right now (a set, not a counter: channels of a
        # dropped SSH connection may report their end after a redial).
        self._active: Set[SSHForwarder] = set()
        self._last_active = 0.0
        self.dials = 0

    def _aim(self, server: Optional[Tuple[str, str]], connect_timeout: float) -> None:
        """Point the link at ``server`` (None: the token's tunnel or edge)."""
        token = self._token
        self.server = server
        if server is None or token.edge:
            # behind the one-port edge, only the edge is reachable: it stays the way in
            self.endpoint = ssh_endpoint(token, self._proxy_setting)
            key_line = token.tunnel_host_key
        else:
            host, port = parse_hostport(server[0], "request tunnel", TUNNEL_PORT)
            self.endpoint = Endpoint(host, port, False, None, select_proxy(
                host, configured=self._proxy_setting, from_token=token.proxy))
            key_line = server[1]
        self.host, self.port_ = self.endpoint.host, self.endpoint.port
        # a proxy and/or TLS (the edge) in front of SSH: asyncssh's tunnel= hook
        self._via: Optional[TlsTunnel] = None
        if self.endpoint.proxy is not None or self.endpoint.tls:
            self._via = TlsTunnel(self.endpoint, token.broker_ca, connect_timeout)
        # known_hosts = only the pinned key: no ~/.ssh/known_hosts, no CA, no TOFU
        self._known = ([asyncssh.import_public_key(key_line)], [], [])

    # ------------------------------------------------------------------ public API

    async def open(self, ttl: float, idle_timeout: float, *,
                   not_after: Optional[float] = None,
                   server: Optional[Tuple[str, str]] = None) -> int:
        """Make sure the forward is up and return its port; extends TTL/idle to the max
        of the old and new values. ``not_after`` (monotonic) is the expiry of the request
        asking: past it, nothing is extended or dialled. Raises :class:`TunnelError`."""
        self._check_alive(not_after, "before the tunnel was asked for")
        async with self._lock:
            # the lock may have been held by a slow dial for another request
            self._check_alive(not_after, "while waiting for another dial")
            now = time.monotonic()
            was_wanted = self.wanted
            if self.wanted:
                self.deadline = max(self.deadline, now + ttl)
                self.idle_timeout = max(self.idle_timeout, idle_timeout)
            else:
                self.deadline, self.idle_timeout = now + ttl, idle_timeout
            # A fresh request means someone is about to connect: restart the idle clock.
            self._last_active = now
            if server != self.server:
                # placed on another tunnel server (ours failed, or a first placement)
                if self._conn is not None:
                    log.info("tunnel moves to %s", server[0] if server else "the token's")
                await self._teardown("moving to another tunnel server")
                self._aim(server, self._connect_timeout)
            if self._conn is not None and self.port is not None:
                self.wanted = True
                self._wake.set()  # re-plan the supervisor's next check
                return self.port
            until = now + self._connect_timeout
            if not_after is not None:
                until = min(until, not_after)
            try:
                port = await self._dial_retrying(until)
            except TunnelError:
                if not was_wanted:
                    self.deadline = 0.0
                self._check_alive(not_after, "while the tunnel was being dialled")
                raise
            if not was_wanted and not_after is not None and time.monotonic() > not_after:
                # The caller has given up: a tunnel nobody waits for must not stay open.
                await self._teardown("the request expired while the tunnel was dialled")
                self.deadline = 0.0
                self._check_alive(not_after, "while the tunnel was being dialled")
            self.wanted = True
        self._ensure_supervisor()
        return port

    @staticmethod
    def _check_alive(not_after: Optional[float], when: str) -> None:
        if not_after is not None:
            late = time.monotonic() - not_after
            if late > 0:
                raise TunnelError(ErrorCode.EXPIRED, f"request expired {late:.1f} s ago, {when}")

    async def close(self, reason: str) -> bool:
        """Tear the forward down; True if one was up or wanted."""
        was = self.wanted or self._conn is not None
        self.wanted = False
        self._wake.set()
        async with self._lock:
            await self._teardown(reason if was else "")
        return was

    async def shutdown(self) -> None:
        await self.close("agent stopping")
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # ------------------------------------------------------------------ internals

    @property
    def active(self) -> int:
        """How many connections go through the tunnel right now."""
        return len(self._active)

    def _conn_opened(self, fwd: SSHForwarder) -> None:
        self._active.add(fwd)
        self._last_active = time.monotonic()

    def _conn_closed(self, fwd: SSHForwarder) -> None:
        self._active.discard(fwd)
        self._last_active = time.monotonic()
        self._wake.set()

    def _lost(self, conn: Optional[asyncssh.SSHClientConnection],
              exc: Optional[Exception]) -> None:
        # asyncssh calls this for every connection, also for a dial that just failed
        # (after _dial returned): only the loss of the one we hold is news, or each failed
        # dial would cut its own backoff wait short (a revoked device redialled ~150/s).
        if conn is not None and conn is self._conn:
            self._wake.set()

    async def _forward(self, orig_host: str, orig_port: int) -> SSHForwarder:
        loop = asyncio.get_running_loop()
        try:
            transport, peer = await loop.create_connection(SSHForwarder, *self.target)
        except OSError as exc:
            log.warning("tunnel: cannot reach %s:%d on this device: %s", *self.target, exc)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            # the built-in SSH server's audit names where the connection came from on the
            # tunnel side, not this loopback hop (the manager maps it to its operator)
            note_origin(f"{local[0]}:{local[1]}", f"{printable(orig_host[:64])}:{orig_port}")
        return _CountingForwarder(peer, self)

    async def _dial_retrying(self, until: float) -> int:
        """Dial, and dial again after a short jittered pause when the tunnel could not be
        reached (not when it refused): a dropped handshake is what a busy tunnel's
        per-source start-up limit does to the 20 devices of one site behind one NAT
        address, all asked to open at once. Stops at ``until`` (monotonic)."""
        for attempt in range(_OPEN_ATTEMPTS):
            left = until - time.monotonic()
            try:
                return await self._dial(max(0.1, left))
            except TunnelError as exc:
                pause = random.uniform(0.3, 1.0) * (attempt + 1)  # noqa: S311 (jitter)
                if (exc.code is not ErrorCode.TUNNEL_UNREACHABLE or exc.final
                        or attempt + 1 == _OPEN_ATTEMPTS
                        or until - time.monotonic() < pause + 2.0):
                    raise
                log.info("tunnel dial failed (%s); trying again in %.1f s", exc, pause)
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _named_tcp(self, timeout: Optional[float]) -> socket.socket:
        """The TCP connection to a server an open request named, within
        :data:`NAMED_CONNECT_TIMEOUT`; a timeout is final for this request (see there)."""
        loop = asyncio.get_running_loop()
        budget = min(NAMED_CONNECT_TIMEOUT, timeout or NAMED_CONNECT_TIMEOUT)
        where = f"{self.host}:{self.port_}"
        sock: Optional[socket.socket] = None
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(
                self.host, self.port_, type=socket.SOCK_STREAM), budget)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, addr), budget)
            return sock
        except asyncio.TimeoutError:
            if sock is not None:
                sock.close()
            message = (f"cannot reach tunnel server {where}: no TCP answer within "
                       f"{budget:g} s")
            log.warning("tunnel %s", message)
            raise TunnelError(ErrorCode.TUNNEL_UNREACHABLE, message, final=True) from None
        except OSError as exc:
            if sock is not None:
                sock.close()
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # not asyncio's text
            message = f"cannot reach tunnel server {where} ({why})"
            log.warning("tunnel %s", message)
            raise TunnelError(ErrorCode.TUNNEL_UNREACHABLE, message) from None

    async def _dial(self, timeout: Optional[float] = None) -> int:
        """Connect + request the forward. Caller holds the lock."""
        await self._teardown("")
        self.dials += 1
        t = self._token
        sock = None
        if self.server is not None and self._via is None:
            sock = await self._named_tcp(timeout)
        try:
            conn, _ = await asyncio.wait_for(asyncssh.create_connection(
                lambda: _Client(self), self.host, self.port_,
                username=t.device, password=t.secret,
                known_hosts=self._known, client_keys=None, agent_path=None, config=None,
                preferred_auth="password", gss_host=None,
                keepalive_interval=self._keepalive, keepalive_count_max=3,
                window=self._window, compression_algs=None,
                encryption_algs=_CIPHERS if _CIPHERS is not None else (),
                **({"tunnel": self._via} if self._via is not None else {}),
                **({"sock": sock} if sock is not None else {}),
            ), timeout if timeout is not None else self._connect_timeout)
        except Exception as exc:  # classified into an error code
            code, message = _classify(exc)
            log.warning("tunnel %s: %s", self.endpoint.describe(), message)
            raise TunnelError(code, message) from None
        try:
            listener = await conn.create_server(self._forward, "", 0)
        except Exception as exc:
            conn.close()
            code, message = _classify(exc)
            log.warning("tunnel %s:%d: %s", self.host, self.port_, message)
            raise TunnelError(code, message) from None
        self._conn, self._listener = conn, listener
        self.port = listener.get_port()
        self._up_since = time.monotonic()
        tls = ""
        if self._via is not None and self.endpoint.tls:
            self._via.remember()  # by now the edge's TLS 1.3 ticket has arrived
            tls = " (TLS, resumed)" if self._via.resumed else " (TLS)"
        log.info("tunnel up: %s:%d%s port %d -> %s:%d", self.host, self.port_, tls, self.port,
                 *self.target)
        self._on_port(self.port)
        return self.port

    async def _teardown(self, reason: str) -> None:
        conn, listener = self._conn, self._listener
        self._conn = self._listener = None
        had_port = self.port is not None
        self.port = None
        self._active.clear()
        if listener is not None:
            listener.close()
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except (asyncio.TimeoutError, OSError, asyncssh.Error):
                pass
        if reason and (conn is not None or had_port):
            log.info("tunnel closed: %s", reason)
        if had_port:
            self._on_port(None)

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.ensure_future(self._supervise())

    def _why_close(self, now: float) -> Tuple[str, float]:
        """(reason to close now or "", seconds until the next check)."""
        if now >= self.deadline:
            return "TTL passed", 0.0
        nxt = self.deadline - now
        if self.active == 0 and self.idle_timeout > 0:
            idle_left = self._last_active + self.idle_timeout - now
            if idle_left <= 0:
                return f"idle for {self.idle_timeout:g} s", 0.0
            nxt = min(nxt, idle_left)
        return "", nxt

    async def _supervise(self) -> None:
        """Enforce TTL/idle and redial a dropped connection while the tunnel is wanted."""
        while self.wanted:
            self._wake.clear()
            reason, wait = self._why_close(time.monotonic())
            if reason:
                self.wanted = False
                async with self._lock:
                    await self._teardown(reason)
                return
            conn = self._conn
            if conn is None or conn.is_closed():
                await self._redial()
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _redial(self) -> None:
        hold = 0.0
        async with self._lock:
            if not self.wanted or (self._conn is not None and not self._conn.is_closed()):
                return
            if self.port is not None:
                lived = time.monotonic() - self._up_since
                await self._teardown("")
                if lived >= _STABLE_AFTER:
                    self._backoff.reset()
                    self._refused_backoff.reset()
                else:  # flapping: do not come straight back
                    hold = self._backoff.next()
                log.warning("tunnel connection lost after %.0f s; redialling%s", lived,
                            f" in {hold:.1f} s" if hold else "")
        if hold:
            await self._pause(hold)
            return  # the supervisor re-checks TTL/idle, then comes back here
        async with self._lock:
            if not self.wanted or (self._conn is not None and not self._conn.is_closed()):
                return
            try:
                await self._dial()
                return
            except TunnelError as exc:
                refused = exc.code == ErrorCode.TUNNEL_REFUSED
        backoff = self._refused_backoff if refused else self._backoff
        delay = backoff.next()
        log.info("tunnel redial failed; next attempt in %.1f s%s", delay,
                 " (refused by the tunnel)" if refused else "")
        await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` s, but never past the TTL (the supervisor must get to close the
        tunnel on time) and only until the tunnel stops being wanted; other wake-ups
        (a forwarded connection of the dropped session ending) do not shorten it."""
        end = time.monotonic() + delay
        while self.wanted:
            left = min(end, self.deadline) - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                pass

"""The one-port edge: MQTT and SSH for devices on a single TLS port (443), told apart by ALPN.

Sites whose only way out is TCP 443, often through an HTTP CONNECT proxy, cannot reach
the broker's 8883 or the tunnel's 2220. The edge terminates TLS (certificate from the
stack's CA, which device tokens pin) and splices the plain stream to the local broker
or tunnel by the ALPN protocol the device asked for: ``dpanel-mqtt`` or ``dpanel-ssh``;
``http/1.1`` goes to the API when ``edge.http_upstream`` is set (the operators' HTTPS on
the same port), anything else is refused.

Why ALPN, not SNI or WebSocket paths: ALPN travels inside the ClientHello, so it passes
any CONNECT proxy untouched (the proxy sees only TLS), it works when devices dial a bare
IP address (no SNI then), it costs no extra round trip and no framing overhead on a
metered link (WebSocket adds a HTTP upgrade and per-frame headers, and would need the
broker's websocket listener plus an SSH-over-WebSocket shim). The price: TLS-inspecting
middleboxes that strip ALPN break it; those also break mqtts today.

Limits, before any byte reaches the broker or tunnel: the TLS handshake (which carries
the ALPN) must finish within ``handshake_timeout``; connections still handshaking are
admitted by the tunnel's own :class:`~dpanel_server._gate.PreAuthGate` rules (per-source
random early drop, a global cap that evicts the busiest source's oldest, penalties for
sources that never finish). Refusals are logged once per source and reason through the
rate-limited log. Splicing honours backpressure (``drain``) both ways.

The tunnel then sees every edge connection coming from loopback, which would put all
edge devices into one source for its per-source limits: the edge therefore connects to a
loopback tunnel from ``127.x.y.z`` derived from the device's address (Linux routes all
of 127/8 to lo), so the tunnel's limits still tell sources apart, and records which
device address each relay socket stands for in :data:`~dpanel_server.relaypeers.RELAYS`,
where the tunnel (in the same process) finds it for its logs and its per-source gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Optional

from dpanel_proto.ratelog import RateLimitedLog
from dpanel_proto.util import parse_hostport

from ._gate import PreAuthGate, Startups, source_key
from .config import ServerConfig
from .errors import ConfigError
from .relaypeers import RELAYS

__all__ = ["ALPN_HTTP", "ALPN_MQTT", "ALPN_SSH", "EdgeServer", "Upstream", "edge_from_config",
           "loopback_source"]

log = logging.getLogger("dpanel.edge")

ALPN_MQTT = "dpanel-mqtt"
ALPN_SSH = "dpanel-ssh"
ALPN_HTTP = "http/1.1"
#: Bytes read from one side before they must be written (and drained) to the other.
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    #: TLS to the upstream (a broker that only listens with TLS), verified with this CA
    ca_file: Optional[str] = None
    #: connect from a per-source loopback address (the tunnel's per-source limits)
    spread_source: bool = False
    #: record who each relay socket stands for (:data:`RELAYS`, read by the tunnel)
    relay_peers: bool = False


def loopback_source(source: str) -> str:
    """A stable 127.a.b.c for a device address, never 127.0.0.1 (the manager's own)."""
    d = hashlib.sha256(source.encode()).digest()
    a, b, c = d[0] % 254 + 1, d[1], d[2] % 254 + 1
    return f"127.{a}.{b}.{c}"


class EdgeServer:
    def __init__(self, host: str, port: int, *, cert_file: str, key_file: str,
                 routes: dict[str, Upstream], handshake_timeout: float = 10.0,
                 max_pending: int = 256, per_source: str = "10:30:40") -> None:
        self.host, self.port = host, port
        self._routes = dict(routes)
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(cert_file, key_file)
        self._ctx.set_alpn_protocols(list(self._routes))
        self._handshake_timeout = handshake_timeout
        self._gate = PreAuthGate(max_unauthenticated=max_pending,
                                 per_source=Startups.parse(per_source, "edge per_source"),
                                 penalty_noauth=1.0, penalty_min=30.0, penalty_max=60.0)
        self._rl = RateLimitedLog(log, burst=1, window=60.0)
        self._server: Optional[asyncio.Server] = None
        #: handshakes in progress (an eviction cancels one)
        self._pending: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.spliced = 0

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                      backlog=1024)
        except OSError as exc:
            raise ConfigError(f"edge.listen {self.host}:{self.port}: cannot listen there "
                              f"({exc.strerror or exc})") from None
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("edge listening on %s:%d (ALPN %s)", self.host, self.port,
                 ", ".join(self._routes))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        source = source_key(str(peer[0]))
        handle = id(writer)
        refusal, victim = self._gate.admit(handle, source)
        if victim is not None:
            # cancel the victim's handshake rather than abort its transport under
            # start_tls (CPython then loses the transport and logs tracebacks per eviction)
            t = self._pending.pop(victim, None)  # type: ignore[call-overload]
            if t is not None:
                t.cancel()
        if refusal is not None:
            self._rl.warning(f"refused {source}", "edge: refused %s: %s", source, refusal)
            writer.transport.abort()
            return
        me = asyncio.current_task()
        assert me is not None
        self._pending[handle] = me
        outcome = "noauth"
        try:
            try:
                await writer.start_tls(self._ctx, ssl_handshake_timeout=self._handshake_timeout)
            except asyncio.CancelledError:
                writer.transport.abort()
                if handle in self._pending:  # not an eviction: the edge is closing
                    raise
                return
            except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                # asyncio reports its ssl_handshake_timeout as ConnectionAbortedError
                late = isinstance(exc, (asyncio.TimeoutError, ConnectionAbortedError))
                why = f"TLS handshake timed out ({self._handshake_timeout:g} s)" if late else (
                    f"TLS handshake failed ({getattr(exc, 'reason', None) or exc})")
                self._rl.info(f"tls {source}", "edge: %s: %s", source, why)
                writer.transport.abort()
                return
            if handle not in self._pending:
                writer.transport.abort()  # evicted while handshaking
                return
            ssl_obj = writer.get_extra_info("ssl_object")
            alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
            up = self._routes.get(alpn or "")
            if up is None:
                self._rl.warning(f"alpn {source}", "edge: refused %s: ALPN %s is not one of %s",
                                 source, repr(alpn) if alpn else "missing",
                                 ", ".join(self._routes))
                writer.transport.abort()
                return
            outcome = "auth"  # past TLS: the broker's / tunnel's own limits apply now
        finally:
            self._pending.pop(handle, None)
            self._gate.done(handle, outcome, source)  # type: ignore[arg-type]
        await self._splice(reader, writer, up, source, alpn or "")

    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      up: Upstream, source: str, alpn: str) -> None:
        ctx: Optional[ssl.SSLContext] = None
        if up.ca_file:
            ctx = ssl.create_default_context(cafile=up.ca_file)
        peer = writer.get_extra_info("peername")
        device: Optional[tuple[str, int]] = (
            (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None)
        relay: Optional[tuple[str, int]] = None
        try:
            if up.relay_peers:
                # bind first, so that the tunnel finds who this socket stands for from
                # its very first callback (RELAYS: the edge and the tunnel share a process);
                # the tunnel listens on an address of this host, so that is a valid source
                local = loopback_source(source) if up.spread_source else up.host
                ur, uw, relay = await asyncio.wait_for(_open_relay(up, local, device), 10)
            else:
                ur, uw = await asyncio.wait_for(asyncio.open_connection(
                    up.host, up.port, ssl=ctx, server_hostname=up.host if ctx else None), 10)
        except (OSError, asyncio.TimeoutError) as exc:
            self._rl.error(f"upstream {alpn}", "edge: cannot reach %s upstream %s:%d: %s",
                           alpn, up.host, up.port, exc)
            writer.transport.abort()
            return
        self.spliced += 1
        here = uw.get_extra_info("sockname")
        self._rl.info(f"relay {source} {alpn}", "edge: %s %s -> %s:%d from %s",
                      _addr(device), alpn, up.host, up.port, _addr(here))
        pumps = [asyncio.ensure_future(_pump(reader, uw)),
                 asyncio.ensure_future(_pump(ur, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if relay is not None:
                RELAYS.discard(relay)
            for p in pumps:
                p.cancel()
            for w in (uw, writer):
                w.close()  # flushes what is buffered, then closes
            for w in (uw, writer):
                try:
                    await asyncio.wait_for(w.wait_closed(), 5)
                except (OSError, asyncio.TimeoutError, ConnectionError):
                    w.transport.abort()


def _addr(a: object) -> str:
    return f"{a[0]}:{a[1]}" if isinstance(a, tuple) and len(a) >= 2 else "?"


async def _open_relay(up: Upstream, local_ip: str, device: Optional[tuple[str, int]]
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[str, int]]:
    """A plain connection to ``up`` from ``local_ip``, recorded in :data:`RELAYS` as
    standing for ``device`` before it connects (the entry goes when the caller is done)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    relay: Optional[tuple[str, int]] = None
    try:
        sock.setblocking(False)
        sock.bind((local_ip, 0))
        name = sock.getsockname()
        relay = (str(name[0]), int(name[1]))
        if device is not None:
            RELAYS.add(relay, device)
        await loop.sock_connect(sock, (up.host, up.port))
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        if relay is not None:
            RELAYS.discard(relay)
        sock.close()
        raise
    return reader, writer, relay


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
        while True:
            data = await src.read(CHUNK)
            if not data:
                return
            dst.write(data)
            await dst.drain()  # backpressure: a slow side stops the read of the other


def _dialable(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)


def edge_from_config(cfg: ServerConfig) -> EdgeServer:
    """The edge of ``cfg.edge``, spliced to this server's broker and tunnel."""
    e = cfg.edge
    assert e.listen and e.cert_file and e.key_file
    host, port = parse_hostport(e.listen, "edge.listen", 443)
    burl = e.broker_upstream or cfg.broker.url.split(",")[0]
    bhost, bport = parse_hostport(burl.split("://", 1)[1], "edge.broker_upstream", 1883)
    mqtt = Upstream(_dialable(bhost), bport, ca_file=cfg.broker.ca_file
                    if burl.startswith("mqtts://") else None)
    thost, tport = parse_hostport(cfg.tunnel.listen, "tunnel.listen", 2220)
    thost = _dialable(thost)
    routes = {ALPN_MQTT: mqtt,
              ALPN_SSH: Upstream(thost, tport, spread_source=thost == "127.0.0.1",
                                 relay_peers=True)}
    if e.http_upstream:
        hhost, hport = parse_hostport(e.http_upstream, "edge.http_upstream", 80)
        routes[ALPN_HTTP] = Upstream(hhost, hport)
    return EdgeServer(host, port, cert_file=e.cert_file, key_file=e.key_file, routes=routes,
                      handshake_timeout=e.handshake_timeout, max_pending=e.max_pending)

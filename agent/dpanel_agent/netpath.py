"""Where the agent dials, and how: direct, through an HTTP CONNECT proxy, and/or inside
TLS to the server's one-port edge (ALPN ``dpanel-mqtt`` / ``dpanel-ssh``).

Kept apart from the MQTT and tunnel code so that both pick their path by the same rules:
a token naming an ``edge`` sends MQTT and SSH there (the broker and tunnel addresses
are then only the server's own), and the proxy is chosen per destination (``no_proxy``).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from dpanel_proto.ports import BROKER_PORT, TUNNEL_PORT
from dpanel_proto.proxy import Proxy, open_connection, select_proxy
from dpanel_proto.token import DeviceToken
from dpanel_proto.util import parse_hostport

__all__ = ["ALPN_MQTT", "ALPN_SSH", "EDGE_PORT", "Endpoint", "TlsTunnel", "mqtt_endpoint",
           "ssh_endpoint"]

ALPN_MQTT = "dpanel-mqtt"
ALPN_SSH = "dpanel-ssh"
EDGE_PORT = 443


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool
    alpn: Optional[str]
    proxy: Optional[Proxy]

    def describe(self) -> str:
        via = f" via {self.proxy}" if self.proxy else ""
        edge = f" (edge, ALPN {self.alpn})" if self.alpn else ""
        return f"{self.host}:{self.port}{edge}{via}"


def mqtt_endpoint(token: DeviceToken, proxy_setting: Optional[str]) -> Endpoint:
    if token.edge:
        host, port = parse_hostport(token.edge, "token edge", EDGE_PORT)
        return Endpoint(host, port, True, ALPN_MQTT,
                        select_proxy(host, configured=proxy_setting, from_token=token.proxy))
    scheme, rest = token.broker_urls[0].split("://", 1)  # the others: see AgentMqtt
    tls = scheme == "mqtts"
    host, port = parse_hostport(rest, "token broker", 8883 if tls else BROKER_PORT)
    return Endpoint(host, port, tls, None,
                    select_proxy(host, configured=proxy_setting, from_token=token.proxy))


def ssh_endpoint(token: DeviceToken, proxy_setting: Optional[str]) -> Endpoint:
    if token.edge:
        host, port = parse_hostport(token.edge, "token edge", EDGE_PORT)
        return Endpoint(host, port, True, ALPN_SSH,
                        select_proxy(host, configured=proxy_setting, from_token=token.proxy))
    host, port = parse_hostport(token.tunnel, "token tunnel", TUNNEL_PORT)
    return Endpoint(host, port, False, None,
                    select_proxy(host, configured=proxy_setting, from_token=token.proxy))


class _ResumingContext(ssl.SSLContext):
    """A client context that offers its last session on every new connection: asyncio
    has no ``session=`` of its own, but its TLS layer goes through ``wrap_bio``."""

    dpanel_session: Optional[ssl.SSLSession] = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,  # type: ignore[override]
                 server_side: bool = False, server_hostname: Optional[str] = None,
                 session: Optional[ssl.SSLSession] = None) -> ssl.SSLObject:
        session = session or self.dpanel_session
        try:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname,
                                    session=session)
        except ValueError:  # not a session of this context (cannot happen): start afresh
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname)


def _client_context(ca_pem: Optional[str]) -> _ResumingContext:
    """``ssl.create_default_context(cadata=...)``, as a :class:`_ResumingContext`."""
    ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and host name
    if ca_pem:
        ctx.load_verify_locations(cadata=ca_pem)
    else:
        ctx.load_default_certs()
    return ctx


class TlsTunnel:
    """What asyncssh's ``tunnel=`` takes (an object with ``create_connection``): the SSH
    transport rides on a proxy socket and/or TLS to the edge. The CONNECT exchange is
    blocking, so it runs in a worker thread; asyncio does the TLS handshake.

    A redial resumes the last TLS session (as the MQTT path does): a full handshake sends
    the certificate chain and a fresh key exchange (a few KB on a metered link), a resumed
    one a ticket. :meth:`remember` keeps the session of a connection that came up (TLS 1.3
    tickets arrive after the handshake, so it is read once SSH has logged in)."""

    def __init__(self, ep: Endpoint, ca_pem: Optional[str], timeout: float) -> None:
        self.ep = ep
        self._timeout = timeout
        self._ctx: Optional[_ResumingContext] = None
        self._last: Optional[ssl.SSLObject] = None
        #: whether the last connection resumed a session (for the "tunnel up" log line)
        self.resumed = False
        if ep.tls:
            self._ctx = _client_context(ca_pem)
            if ep.alpn:
                self._ctx.set_alpn_protocols([ep.alpn])

    def remember(self) -> None:
        """Keep the current connection's session for the next dial."""
        if self._ctx is not None and self._last is not None:
            session = self._last.session
            if session is not None:
                self._ctx.dpanel_session = session

    def __str__(self) -> str:
        return self.ep.describe()

    async def create_connection(self, factory: Callable[[], Any], _host: str,
                                _port: int) -> Tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        ep = self.ep
        if ep.proxy is not None:
            sock = await asyncio.to_thread(open_connection, ep.proxy, ep.host, ep.port,
                                           self._timeout)
            sock.setblocking(False)
            kwargs: dict[str, Any] = {"sock": sock}
        else:
            kwargs = {"host": ep.host, "port": ep.port}
        if self._ctx is not None:
            kwargs.update(ssl=self._ctx, server_hostname=ep.host,
                          ssl_handshake_timeout=self._timeout)
        if self._ctx is not None and self._last is not None:
            self.remember()  # a connection that ended before remember() was called
        transport, proto = await loop.create_connection(factory, **kwargs)
        self._last = transport.get_extra_info("ssl_object")
        self.resumed = bool(self._last is not None and self._last.session_reused)
        return transport, proto

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass

"""The HTTPS listener's own accept loop: a TLS handshake deadline and a bounded pre-handshake set.

The attack: anyone who can reach the public HTTPS port opens TCP connections and never
sends a ClientHello (or sends one byte a minute). asyncio's server keeps each one for 60 s
(its default ``ssl_handshake_timeout``) with no limit on how many, so a flood with no
credentials at all fills the manager's file descriptors and the event loop, and real
operators get no handshake. uvicorn exposes neither knob, so this module replaces its
``loop.create_server`` for the HTTPS listener only:

* every connection must finish its TLS handshake within :data:`HANDSHAKE_TIMEOUT`
  seconds (the device edge uses the same 10 s), else it is closed;
* connections still in their handshake pass the tunnel's :class:`~._gate.PreAuthGate` at
  accept: per-source random early drop (:data:`PER_SOURCE`), a global cap
  (:data:`MAX_PENDING`) that evicts the busiest source's oldest handshake instead of
  refusing the newcomer, and a penalty for sources whose handshakes time out. So an
  operator's connection, which sends its ClientHello at once, always gets a slot unless
  the attacker holds more addresses than the cap.

After the handshake the connection is uvicorn's (``_httpguard`` then bounds the wait for
the request). The peer address stays the real socket's, so ``request.client`` (the audit's
``source``) is the address the manager saw, never one a header claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any, Callable, Optional

from dpanel_proto.ratelog import RateLimitedLog

from ._gate import Outcome, PreAuthGate, Startups, source_key

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_PENDING", "PER_SOURCE", "TlsGateServer"]

log = logging.getLogger("dpanel.https")

#: seconds a connection may take from accept to a finished TLS handshake
HANDSHAKE_TIMEOUT = 10.0
#: connections in their handshake at once, all sources together
MAX_PENDING = 128
#: one source's handshakes in flight: drop from 8 (30 %), all at 24 (an office NAT of
#: operators opens a few at a time; a flooder from one address holds at most 24)
PER_SOURCE = Startups(8, 30, 24)


class TlsGateServer:
    """What uvicorn's shutdown needs of an ``asyncio.Server`` (close, wait_closed,
    sockets), serving ``protocol_factory`` over TLS through the gate."""

    def __init__(self, sock: socket.socket, ssl_ctx: ssl.SSLContext,
                 protocol_factory: Callable[[], asyncio.Protocol], *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_pending: int = MAX_PENDING, per_source: Startups = PER_SOURCE) -> None:
        self.sockets = [sock]
        self._sock = sock
        self._ssl = ssl_ctx
        self._factory = protocol_factory
        self._timeout = handshake_timeout
        self.gate = PreAuthGate(max_unauthenticated=max_pending, per_source=per_source)
        self._handshakes: dict[object, tuple[asyncio.Task[None], socket.socket]] = {}
        self._refused = RateLimitedLog(log, burst=2, window=60.0)
        self._accepting: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        self._sock.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: say so, breathe, go on
                self._refused.warning("accept", "HTTPS accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self._admit(conn, addr)

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        source = source_key(str(addr[0]) if isinstance(addr, tuple) else "?")
        handle = object()
        refusal, victim = self.gate.admit(handle, source)
        if refusal is not None:
            self._refused.warning(source, "HTTPS: refused a connection from %s: %s",
                                  source, refusal)
            conn.close()
            return
        if victim is not None:
            old = self._handshakes.pop(victim, None)
            if old is not None:
                old[0].cancel()
                old[1].close()
        task = asyncio.get_running_loop().create_task(self._handshake(handle, conn, source))
        self._handshakes[handle] = (task, conn)

    async def _handshake(self, handle: object, conn: socket.socket, source: str) -> None:
        outcome: Outcome = "ours"
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                self._factory, conn, ssl=self._ssl, ssl_handshake_timeout=self._timeout)
            outcome = "auth"
        except asyncio.CancelledError:
            conn.close()  # evicted or shutting down (closing twice is harmless)
            raise
        except ConnectionAbortedError:
            # asyncio's handshake timeout: the one outcome a flooder causes on purpose
            outcome = "noauth"
        except (OSError, ssl.SSLError, EOFError):
            pass  # a client that gave up or spoke no TLS; nothing to learn from it
        finally:
            self._handshakes.pop(handle, None)
            self.gate.done(handle, outcome, source)

    # ------------------------------------------------------------ asyncio.Server's part

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task, conn in list(self._handshakes.values()):
            task.cancel()
            conn.close()
        self._handshakes.clear()
        self._sock.close()

    async def wait_closed(self) -> None:
        if self._accepting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket as asyncio's create_server would make it (SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.setblocking(False)
    return sock

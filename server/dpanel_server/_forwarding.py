"""Port forwarding that cannot leave a channel open: two races in asyncssh's own.

1. A pair closed only when its TCP side saw EOF second; when the channel's EOF came
   second (the two ends hung up at about the same time) both stayed open for the life
   of the SSH connection.
2. A client that hung up while its channel was still being opened (asyncssh issue
   #823) left the channel open: nothing was left to close it. On the tunnel that is a
   channel, a socket on the device and a tunnel that never goes idle, per ^C at the
   wrong moment (55 of 60 connections reset at once leaked).

The tunnel server uses these for a device's port and for the manager's channel.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import asyncssh
from asyncssh.forward import SSHForwarder, SSHLocalPortForwarder
from asyncssh.listener import create_tcp_local_listener

__all__ = ["ClosingForwarder", "forward_local_port", "forward_to"]

_TCPSession = asyncssh.SSHTCPSession[bytes]


class ClosingForwarder(SSHForwarder):
    """A channel's side of a forwarded pair: both directions at EOF closes the pair."""

    def eof_received(self) -> bool:
        keep_open = super().eof_received()
        if not keep_open:
            self.close()
        return keep_open


class _LocalForwarder(SSHLocalPortForwarder):
    """One accepted connection on a forwarded port."""

    async def _forward(self, *args: object) -> None:
        await super()._forward(*args)
        if self._transport is None and self._peer is not None:
            # the client was gone before the channel was open: close the channel too
            self._peer.close()


async def forward_local_port(conn: asyncssh.SSHServerConnection, listen_host: str,
                             listen_port: int, dest_host: str,
                             dest_port: int) -> asyncssh.SSHListener:
    """``conn.forward_local_port`` without the races above (same listener, same
    labels on the channels it opens: ``dest_host``/``dest_port``)."""

    async def tunnel_connection(session_factory: Any, orig_host: str,
                                orig_port: int) -> Any:
        return await conn.create_connection(session_factory, dest_host, dest_port,
                                            orig_host, orig_port)

    loop = asyncio.get_running_loop()
    return await create_tcp_local_listener(
        cast(Any, conn), loop, lambda: _LocalForwarder(cast(Any, conn), tunnel_connection),
        listen_host, listen_port)


async def forward_to(host: str, port: int) -> _TCPSession:
    """A direct-tcpip channel's session to ``host:port`` (asyncssh's
    ``forward_connection`` with a ``ClosingForwarder``)."""
    try:
        _, peer = await asyncio.get_running_loop().create_connection(SSHForwarder, host, port)
    except OSError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
    return cast(_TCPSession, ClosingForwarder(peer))

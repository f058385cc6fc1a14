"""The tunnel's forwarded pairs close once both directions are at EOF, in either order.

asyncssh's own forwarder closed a pair only when its TCP side saw EOF second; when the
device's local socket ended first and the tunnel's EOF came second, the channel stayed
open forever (the idle timeout never fired; 20 of 150 connections under load)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from asyncssh.forward import SSHForwarder

from dpanel_agent.link import TunnelLink, _CountingForwarder


class _Transport:
    """Records what a forwarder asks of its transport (a socket's or a channel's)."""

    def __init__(self) -> None:
        self.eof_written = False
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes) -> None:
        pass

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True


class _Link:
    def __init__(self) -> None:
        self.open: set[object] = set()

    def _conn_opened(self, fwd: object) -> None:
        self.open.add(fwd)

    def _conn_closed(self, fwd: object) -> None:
        self.open.discard(fwd)


def _pair() -> tuple[SSHForwarder, _Transport, _CountingForwarder, _Transport, _Link]:
    local, chan, link = _Transport(), _Transport(), _Link()
    tcp = SSHForwarder()
    tcp.connection_made(cast(Any, local))
    fwd = _CountingForwarder(tcp, cast(TunnelLink, link))
    fwd.connection_made(cast(Any, chan))
    return tcp, local, fwd, chan, link


@pytest.mark.parametrize("first", ["local", "tunnel"])
def test_both_eofs_close_the_pair_whichever_came_first(first: str) -> None:
    tcp, local, fwd, chan, link = _pair()
    assert link.open == {fwd}
    if first == "local":
        assert tcp.eof_received() is True  # half-closed: the tunnel side may still send
        assert chan.eof_written and not chan.closed
        fwd.eof_received()
    else:
        assert fwd.eof_received() is True
        assert local.eof_written and not local.closed
        # asyncio closes a transport whose protocol answers False, then reports the loss
        assert tcp.eof_received() is False
        tcp.connection_lost(None)
    assert chan.closed and local.closed
    fwd.connection_lost(None)  # what the channel reports once its close is done
    assert link.open == set()


def test_one_eof_keeps_the_other_direction_open() -> None:
    _tcp, local, fwd, chan, link = _pair()
    assert fwd.eof_received() is True
    assert not chan.closed and not local.closed and link.open == {fwd}

"""The manager's channel to a device port closes once both directions are at EOF.

asyncssh's forwarder closed a pair only when its TCP side saw EOF second: when the
manager's EOF came second, a tunnel server kept the socket and the channel open for as
long as the manager's login lived, one more per exec."""

from __future__ import annotations

from typing import Any, cast

from asyncssh.forward import SSHForwarder

from dpanel_server._forwarding import ClosingForwarder as _ClosingForwarder


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _pair() -> tuple[SSHForwarder, _Transport, _ClosingForwarder, _Transport]:
    port, chan = _Transport(), _Transport()
    tcp = SSHForwarder()
    tcp.connection_made(cast(Any, port))
    fwd = _ClosingForwarder(tcp)
    fwd.connection_made(cast(Any, chan))
    return tcp, port, fwd, chan


def test_the_channels_eof_coming_second_closes_the_pair() -> None:
    tcp, port, fwd, chan = _pair()
    assert tcp.eof_received() is True  # the device port's side ended first
    assert not chan.closed
    fwd.eof_received()
    assert chan.closed and port.closed


def test_the_channels_eof_alone_half_closes() -> None:
    _tcp, port, fwd, chan = _pair()
    assert fwd.eof_received() is True
    assert not chan.closed and not port.closed

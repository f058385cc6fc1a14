"""An open request dials again when the tunnel could not be reached, never when it refused."""

from __future__ import annotations

import time
from typing import Any

import pytest

from dpanel_agent.errors import TunnelError
from dpanel_agent.link import _OPEN_ATTEMPTS, TunnelLink
from dpanel_proto.codes import ErrorCode

pytestmark = pytest.mark.asyncio


def _link(results: list[Any]) -> tuple[TunnelLink, list[float]]:
    link = TunnelLink.__new__(TunnelLink)  # only _dial_retrying is under test
    calls: list[float] = []

    async def dial(timeout: float | None = None) -> int:
        calls.append(time.monotonic())
        r = results.pop(0)
        if isinstance(r, Exception):
            raise r
        return int(r)

    link._dial = dial  # type: ignore[method-assign]
    return link, calls


async def test_unreachable_then_up() -> None:
    link, calls = _link([TunnelError(ErrorCode.TUNNEL_UNREACHABLE, "dropped"), 2222])
    assert await link._dial_retrying(time.monotonic() + 30) == 2222
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.3  # a pause, not a tight loop


async def test_refused_is_not_retried() -> None:
    link, calls = _link([TunnelError(ErrorCode.TUNNEL_REFUSED, "bad secret"), 2222])
    with pytest.raises(TunnelError, match="bad secret"):
        await link._dial_retrying(time.monotonic() + 30)
    assert len(calls) == 1


async def test_attempts_and_deadline_are_bounded() -> None:
    link, calls = _link([TunnelError(ErrorCode.TUNNEL_UNREACHABLE, "x")] * 10)
    with pytest.raises(TunnelError):
        await link._dial_retrying(time.monotonic() + 60)
    assert len(calls) == _OPEN_ATTEMPTS
    link, calls = _link([TunnelError(ErrorCode.TUNNEL_UNREACHABLE, "x")] * 10)
    with pytest.raises(TunnelError):
        await link._dial_retrying(time.monotonic() + 1)  # no time left for a pause
    assert len(calls) == 1


async def test_a_named_server_that_accepts_no_tcp_is_final() -> None:
    """A server named by an open request that never answers the SYN (a site firewall
    dropping it): reported unreachable within NAMED_CONNECT_TIMEOUT, not dialled again,
    so the manager still has time to place the tunnel elsewhere."""
    link, calls = _link([TunnelError(ErrorCode.TUNNEL_UNREACHABLE, "no TCP answer",
                                     final=True), 2222])
    with pytest.raises(TunnelError, match="no TCP answer"):
        await link._dial_retrying(time.monotonic() + 30)
    assert len(calls) == 1


async def test_named_tcp_times_out_and_is_refused_fast(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    import socket

    import dpanel_agent.link as link_mod

    monkeypatch.setattr(link_mod, "NAMED_CONNECT_TIMEOUT", 0.3)
    link = TunnelLink.__new__(TunnelLink)
    # a listener whose backlog is full: the kernel drops further SYNs (as a firewall does)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        fill = []
        try:
            for _ in range(8):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(srv.getsockname())
                fill.append(c)
            link.host, link.port_ = srv.getsockname()
            t0 = time.monotonic()
            with pytest.raises(TunnelError) as err:
                await link._named_tcp(30)
            assert err.value.final and err.value.code is ErrorCode.TUNNEL_UNREACHABLE
            assert "no TCP answer within 0.3 s" in str(err.value)
            assert time.monotonic() - t0 < 10  # bounds a hang only
        finally:
            for c in fill:
                c.close()
    # a closed port: refused at once, an ordinary (retried) unreachable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        link.host, link.port_ = s.getsockname()
    with pytest.raises(TunnelError) as err:
        await link._named_tcp(30)
    assert not err.value.final and "refused" in str(err.value).lower()

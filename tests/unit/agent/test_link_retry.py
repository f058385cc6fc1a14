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

"""Dispatcher with a fake tunnel and a fake transport: what each payload gets as answer."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Optional

import asyncssh
import pytest

from dpanel_agent.dispatch import Dispatcher
from dpanel_agent.errors import TunnelError
from dpanel_agent.guard import RequestGuard
from dpanel_proto import wire
from dpanel_proto.signing import ManagerKey, sign_request

MGR = asyncssh.generate_private_key("ssh-ed25519")


class FakeLink:
    """Stands in for TunnelLink: records calls, can be told to fail."""

    def __init__(self) -> None:
        self.port: Optional[int] = None
        self.opens: list[tuple[float, float]] = []
        self.fail: Optional[TunnelError] = None
        self.crash = False

    async def open(self, ttl: float, idle_timeout: float, *,
                   not_after: Optional[float] = None) -> int:
        self.opens.append((ttl, idle_timeout))
        self.not_after = not_after
        if self.crash:
            raise RuntimeError("boom")
        if self.fail:
            raise self.fail
        self.port = self.port or 20001
        return self.port

    async def close(self, reason: str) -> bool:
        was, self.port = self.port is not None, None
        return was


class Harness:
    def __init__(self) -> None:
        self.link = FakeLink()
        self.sent: list[wire.Response] = []
        guard = RequestGuard("dev-1", ManagerKey(MGR.export_public_key().decode()), skew=10)
        self.d = Dispatcher("dev-1", guard, self.link, self.sent.append, ttl_max=600,
                            idle_timeout_max=60)

    async def feed(self, payload: bytes) -> Optional[wire.Response]:
        before = len(self.sent)
        task = self.d.handle(payload)
        if task is not None:
            await task
        assert len(self.sent) <= before + 1
        return self.sent[-1] if len(self.sent) > before else None


def _req(kind: type = wire.OpenRequest, **kw: object) -> bytes:
    now = time.time()
    base: dict[str, object] = {"device": "dev-1", "id": os.urandom(8).hex(),
                               "issued_at": now, "expires_at": now + 30}
    base.update(kw)
    return wire.encode(sign_request(kind(**base), MGR))


@pytest.fixture
def h() -> Harness:
    return Harness()


async def test_open_answers_ok_with_port_and_caps_ttl(h: Harness) -> None:
    resp = await h.feed(_req(ttl=86400, idle_timeout=5))
    assert resp is not None and (resp.code, resp.port) == (wire.ErrorCode.OK, 20001)
    assert h.link.opens == [(600, 5)]


async def test_close_ok_then_not_open(h: Harness) -> None:
    await h.feed(_req())
    assert (await h.feed(_req(wire.CloseRequest))).code == wire.ErrorCode.OK  # type: ignore[union-attr]
    resp = await h.feed(_req(wire.CloseRequest))
    assert resp is not None and resp.code == wire.ErrorCode.NOT_OPEN


async def test_tunnel_failures_carry_their_code(h: Harness) -> None:
    h.link.fail = TunnelError(wire.ErrorCode.TUNNEL_UNREACHABLE, "no route")
    resp = await h.feed(_req())
    assert resp is not None and (resp.code, resp.message) == (
        wire.ErrorCode.TUNNEL_UNREACHABLE, "no route")


async def test_handler_crash_is_answered_internal_and_contained(h: Harness) -> None:
    h.link.crash = True
    resp = await h.feed(_req())
    assert resp is not None and resp.code == wire.ErrorCode.INTERNAL and "boom" in resp.message
    h.link.crash = False
    assert (await h.feed(_req())).code == wire.ErrorCode.OK  # type: ignore[union-attr]


async def test_refusals_are_answered(h: Harness) -> None:
    now = time.time()
    signed = _req()
    cases = {
        # tampered with after signing
        wire.ErrorCode.BAD_SIGNATURE: signed.replace(b'"ttl":3600', b'"ttl":3601'),
        wire.ErrorCode.WRONG_DEVICE: _req(device="dev-2"),
        wire.ErrorCode.EXPIRED: _req(issued_at=now - 100, expires_at=now - 50),
    }
    for code, payload in cases.items():
        resp = await h.feed(payload)
        assert resp is not None and resp.code == code, (code, resp)
    assert (await h.feed(signed)).code == wire.ErrorCode.OK  # type: ignore[union-attr]
    assert (await h.feed(signed)).code == wire.ErrorCode.REPLAYED  # type: ignore[union-attr]
    assert h.link.opens == [(600, 60)]


@pytest.mark.parametrize("payload", [
    b"", b"garbage", b"\xff\xfe", b"[1,2]", b"x" * (wire.MAX_PAYLOAD + 1),
    b'{"v":1,"type":"open"}', b'{"v":2,"type":"open","device":"dev-1"}',
    wire.encode(wire.Status(device="dev-1", state="online")),
    wire.encode(wire.Response(device="dev-1", id="ab" * 8, code=wire.ErrorCode.OK)),
])
async def test_garbage_is_dropped_without_answer(h: Harness, payload: bytes) -> None:
    assert await h.feed(payload) is None
    assert h.link.opens == []


async def test_concurrent_requests_are_all_answered(h: Harness) -> None:
    tasks = [h.d.handle(_req()) for _ in range(20)]
    await asyncio.gather(*[t for t in tasks if t is not None])
    assert len(h.sent) == 20 and {r.code for r in h.sent} == {wire.ErrorCode.OK}


async def test_expiry_is_checked_again_when_acting(h: Harness) -> None:
    now = time.time()
    # a second of validity: a loaded CI machine once took 50 ms to get from here to the check
    task = h.d.handle(_req(issued_at=now, expires_at=now + 1.0))
    assert task is not None  # fresh when it arrived
    time.sleep(max(0.0, now + 1.1 - time.time()))  # noqa: ASYNC251 (the loop busy past expiry)
    await task
    assert h.sent[-1].code == wire.ErrorCode.EXPIRED and h.link.opens == []
    # a request acted on in time hands its deadline to the tunnel (checked before dialling)
    await h.feed(_req())
    assert h.link.opens and h.link.not_after is not None
    assert 0 < h.link.not_after - time.monotonic() <= 30


async def test_a_flood_of_refused_requests_gets_a_bounded_number_of_answers(h: Harness) -> None:
    from dpanel_agent.dispatch import REFUSAL_ANSWERS

    for _ in range(500):
        await h.feed(_req(device="dev-2"))  # validly signed, wrong device: refused
    assert len(h.sent) == REFUSAL_ANSWERS
    assert (await h.feed(_req())).code == wire.ErrorCode.OK  # type: ignore[union-attr]


async def test_ping_is_answered_ok_without_touching_the_tunnel(h: Harness) -> None:
    resp = await h.feed(_req(wire.PingRequest))
    assert resp is not None and resp.code == wire.ErrorCode.OK
    assert h.link.opens == [] and h.link.port is None


async def test_unsigned_or_replayed_ping_is_refused(h: Harness) -> None:
    payload = _req(wire.PingRequest)
    assert (await h.feed(payload)).code == wire.ErrorCode.OK  # type: ignore[union-attr]
    again = await h.feed(payload)
    assert again is not None and again.code == wire.ErrorCode.REPLAYED
    msg = wire.decode(payload)
    assert isinstance(msg, wire.PingRequest)
    forged = wire.encode(wire.PingRequest(device="dev-1", id="c" * 32,
                                          issued_at=msg.issued_at, expires_at=msg.expires_at))
    refused = await h.feed(forged)
    assert refused is not None and refused.code == wire.ErrorCode.BAD_SIGNATURE

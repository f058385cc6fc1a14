"""Request checks: signature, addressee, expiry, lifetime, replay (clock injected)."""

from __future__ import annotations

import dataclasses

import asyncssh
import pytest

from dpanel_agent.guard import RequestGuard
from dpanel_proto import wire
from dpanel_proto.signing import ManagerKey, sign_request, verify_request

MGR = asyncssh.generate_private_key("ssh-ed25519")
MGR_LINE = MGR.export_public_key().decode().strip()
NOW = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def _open(**kw: object) -> wire.OpenRequest:
    base: dict[str, object] = {"device": "dev-1", "id": "ab" * 16, "issued_at": NOW,
                               "expires_at": NOW + 60}
    base.update(kw)
    return wire.OpenRequest(**base)  # type: ignore[arg-type]


def _signed(req: wire.Request, key: asyncssh.SSHKey = MGR) -> wire.Request:
    return sign_request(req, key)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def guard(clock: Clock) -> RequestGuard:
    return RequestGuard("dev-1", ManagerKey(MGR_LINE), skew=30, clock=clock)


def test_verify_agrees_with_asyncssh_signing() -> None:
    key = ManagerKey(MGR_LINE + " comment")
    req = _signed(_open())
    assert verify_request(req, key) and verify_request(req, asyncssh.import_public_key(MGR_LINE))
    for bad in (dataclasses.replace(req, ttl=7200),  # tampered after signing
                dataclasses.replace(req, sig=""), dataclasses.replace(req, sig="!!notb64"),
                dataclasses.replace(req, sig=wire.b64(b"\x00\x00\x00\x0bssh-ed25519")),
                _signed(_open(), asyncssh.generate_private_key("ssh-ed25519"))):
        assert not verify_request(bad, key)


def test_non_ed25519_manager_key_falls_back_to_asyncssh() -> None:
    ec = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    key = ManagerKey(ec.export_public_key().decode())
    req = dataclasses.replace(_open(), sig=wire.b64(ec.sign(wire.canonical_bytes(_open()),
                                                            b"ecdsa-sha2-nistp256")))
    assert verify_request(req, key)
    assert not verify_request(_signed(_open()), key)


def test_bad_manager_key_line() -> None:
    with pytest.raises(wire.DecodeError, match="manager_key"):
        ManagerKey("ssh-ed25519 AAAAnotakey")


def test_valid_request_passes_once_then_is_a_replay(guard: RequestGuard) -> None:
    req = _signed(_open())
    assert guard.check(req) is None
    refusal = guard.check(req)
    assert refusal is not None and refusal[0] == wire.ErrorCode.REPLAYED


@pytest.mark.parametrize(("req", "code"), [
    (_open(), wire.ErrorCode.BAD_SIGNATURE),  # unsigned
    (dataclasses.replace(_signed(_open()), ttl=99), wire.ErrorCode.BAD_SIGNATURE),
    (_signed(_open(device="dev-2")), wire.ErrorCode.WRONG_DEVICE),
    (_signed(_open(issued_at=NOW - 200, expires_at=NOW - 31)), wire.ErrorCode.EXPIRED),
    (_signed(_open(expires_at=NOW + wire.MAX_REQUEST_LIFETIME + 1)), wire.ErrorCode.BAD_REQUEST),
    (_signed(_open(expires_at=NOW - 1)), wire.ErrorCode.BAD_REQUEST),  # negative lifetime
])
def test_refusals(guard: RequestGuard, req: wire.Request, code: wire.ErrorCode) -> None:
    refusal = guard.check(req)
    assert refusal is not None and refusal[0] == code, refusal
    assert len(guard) == 0  # refused requests do not fill the replay cache


def test_skew_tolerance_and_device_clock_in_message(guard: RequestGuard, clock: Clock) -> None:
    req = _signed(_open(issued_at=NOW - 100, expires_at=NOW - 29))
    assert guard.check(req) is None  # within 30 s of tolerance
    clock.t = NOW + 10_000
    refusal = guard.check(_signed(_open(id="cd" * 16)))
    assert refusal is not None and refusal[0] == wire.ErrorCode.EXPIRED
    assert "2023-11-15T01:00:00Z" in refusal[1] and "tolerance 30 s" in refusal[1]


def test_replay_cache_forgets_expired_ids(guard: RequestGuard, clock: Clock) -> None:
    for i in range(5):
        assert guard.check(_signed(_open(id=f"{i:032x}"))) is None
    assert len(guard) == 5
    clock.t = NOW + 60 + 31  # all of them expired: a replay would now fail as EXPIRED
    assert guard.check(_signed(_open(id="ef" * 16, issued_at=clock.t,
                                     expires_at=clock.t + 60))) is None
    assert len(guard) == 1


def test_full_replay_cache_refuses_instead_of_forgetting(clock: Clock) -> None:
    guard = RequestGuard("dev-1", ManagerKey(MGR_LINE), skew=30, clock=clock, max_entries=2)
    assert guard.check(_signed(_open(id="01" * 16))) is None
    assert guard.check(_signed(_open(id="02" * 16))) is None
    refusal = guard.check(_signed(_open(id="03" * 16)))
    assert refusal is not None and refusal[0] == wire.ErrorCode.INTERNAL
    assert guard.check(_signed(_open(id="01" * 16)))[0] == wire.ErrorCode.REPLAYED  # type: ignore[index]

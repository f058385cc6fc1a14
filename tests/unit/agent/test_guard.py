"""Request checks: signature, addressee, expiry, lifetime, replay (clock injected)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from pathlib import Path

import asyncssh
import pytest

from dpanel_agent.guard import REPLAY_CACHE_NAME, RequestGuard
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
    # Changed by issue 8 A6: the tolerance no longer stretches expires_at (a request
    # delivered late must not be acted on); it is the clock difference allowed on
    # issued_at, e.g. a device clock that lags the manager's by 29 s.
    req = _signed(_open(issued_at=NOW + 29, expires_at=NOW + 60))
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


# --------------------------------------------------------------------------- freshness (A6)


@pytest.mark.parametrize(("issued", "expires", "what"), [
    (NOW + 31, NOW + 90, "in the future"),           # dated in the future, past the skew
    (NOW + 3600, NOW + 3600 + 60, "in the future"),  # stays valid for an hour: refused
    (NOW - 31, NOW + 200, "issued 31 s ago"),        # alive, but issued too long ago
    (NOW - 60, NOW - 0.5, "expired 0.5 s ago"),      # strictly expired: no tolerance
])
def test_freshness_bounds_issued_at_on_both_sides_and_expiry_strictly(
        guard: RequestGuard, issued: float, expires: float, what: str) -> None:
    refusal = guard.check(_signed(_open(issued_at=issued, expires_at=expires)))
    assert refusal is not None and refusal[0] == wire.ErrorCode.EXPIRED, refusal
    assert what in refusal[1], refusal
    assert len(guard) == 0


def test_freshness_at_the_moment_of_acting(guard: RequestGuard, clock: Clock) -> None:
    req = _signed(_open(expires_at=NOW + 5))
    assert guard.check(req) is None
    clock.t = NOW + 5.1  # acted on late (a slow dial, a stalled loop)
    refusal = guard.freshness(req)
    assert refusal is not None and refusal[0] == wire.ErrorCode.EXPIRED


# --------------------------------------------------------------------------- replay cache file


def _guard(clock: Clock, store: Path, **kw: object) -> RequestGuard:
    return RequestGuard("dev-1", ManagerKey(MGR_LINE), skew=30, clock=clock, store=store,
                        **kw)  # type: ignore[arg-type]


def test_replay_cache_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    store = tmp_path / REPLAY_CACHE_NAME
    req = _signed(_open())
    assert _guard(clock, store).check(req) is None
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    clock.t = NOW + 9  # the "9 s old request" of the issue, after a restart
    refusal = _guard(clock, store).check(req)
    assert refusal is not None and refusal[0] == wire.ErrorCode.REPLAYED


def test_replay_cache_file_is_pruned_and_bounded(tmp_path: Path, clock: Clock) -> None:
    store = tmp_path / REPLAY_CACHE_NAME
    g = _guard(clock, store, max_entries=3)
    for i in range(3):
        assert g.check(_signed(_open(id=f"{i:032x}"))) is None
    assert len(json.loads(store.read_text())["seen"]) == 3
    clock.t = NOW + 91  # all expired (+ skew)
    g2 = _guard(clock, store, max_entries=3)
    assert len(g2) == 0  # expired entries are not loaded
    assert g2.check(_signed(_open(id="ee" * 16, issued_at=clock.t,
                                  expires_at=clock.t + 60))) is None
    assert list(json.loads(store.read_text())["seen"]) == ["ee" * 16]


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"v":1,"seen":[1]}', b"[" * 20000,
                                     b'{"v":99,"seen":{}}', os.urandom(64)])
def test_corrupt_replay_cache_is_a_warning_not_a_crash(
        tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture, content: bytes) -> None:
    store = tmp_path / REPLAY_CACHE_NAME
    store.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        g = _guard(clock, store)
    assert "replay cache" in caplog.text and "unreadable" in caplog.text
    assert g.check(_signed(_open())) is None  # and it works (and rewrites the file)
    assert json.loads(store.read_text())["v"] == 1


def test_unwritable_replay_cache_refuses_instead_of_acting(tmp_path: Path,
                                                           clock: Clock) -> None:
    store = tmp_path / "missing-dir" / REPLAY_CACHE_NAME
    refusal = _guard(clock, store).check(_signed(_open()))
    assert refusal is not None and refusal[0] == wire.ErrorCode.INTERNAL

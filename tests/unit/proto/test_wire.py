"""Unit tests of the wire contract: every bad input is one DecodeError naming the field."""

from __future__ import annotations

import dataclasses
import json
import time

import asyncssh
import pytest

from dpanel_proto import wire
from dpanel_proto.signing import ManagerKey, sign_request, verify_request
from dpanel_proto.token import DeviceToken, parse_token


def _open(**kw: object) -> wire.OpenRequest:
    now = time.time()
    base: dict[str, object] = dict(device="dev-1", id="0123456789abcdef", issued_at=now,
                                   expires_at=now + 30)
    base.update(kw)
    return wire.OpenRequest(**base)  # type: ignore[arg-type]


def test_round_trip_all_types() -> None:
    msgs: list[wire.Message] = [
        _open(),
        wire.CloseRequest(device="dev-1", id="ab" * 8, issued_at=1.0, expires_at=2.0),
        wire.Status(device="dev-1", state="online", host_key="ssh-ed25519 AAAA", port=20001),
        wire.Response(device="dev-1", id="ab" * 8, code=wire.ErrorCode.REPLAYED, message="x"),
        wire.Response(device="dev-1", id="ab" * 8, code=wire.ErrorCode.TUNNEL_UNREACHABLE,
                      message="x", tunnel="10.1.2.3:2220"),
    ]
    for m in msgs:
        assert wire.decode(wire.encode(m)) == m


@pytest.mark.parametrize("payload,field", [
    (b"\xff\xfe", "payload"),
    (b"[]", "payload"),
    (b'{"v":2,"type":"open"}', "v"),
    (b'{"v":1,"type":"nope"}', "type"),
    (b'{"v":1,"type":"open","device":"A B","id":"0123456789abcdef"}', "device"),
    (b'{"v":1,"type":"open","device":"d","id":"xyz"}', "id"),
    (b'{"v":1,"type":"open","device":"d","id":"0123456789abcdef","issued_at":true}',
     "issued_at"),
    (b'{"v":1,"type":"response","device":"d","id":"0123456789abcdef","code":"bogus"}', "code"),
    (b'{"v":1,"type":"response","device":"d","id":"0123456789abcdef","code":"ok",'
     b'"tunnel":"h:1\\n"}', "tunnel"),
    (b'{"v":1,"type":"status","device":"d","state":"maybe"}', "state"),
    (b'{"v":1,"type":"status","device":"d","state":"online","port":70000}', "port"),
])
def test_bad_payloads_name_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(wire.DecodeError) as err:
        wire.decode(payload)
    assert str(err.value).startswith(field)


def test_oversized_payload_refused_before_parsing() -> None:
    big = json.dumps({"v": 1, "pad": "x" * wire.MAX_PAYLOAD}).encode()
    with pytest.raises(wire.DecodeError, match=r"payload: .* over"):
        wire.decode(big)


def test_topics_reject_wildcards_and_other_trees() -> None:
    assert wire.parse_topic(wire.req_topic("dev-1")) == ("dev-1", "req")
    for bad in ("dpanel/v1/dev/+/req", "dpanel/v1/dev/a/b/req", "other/dev-1/req"):
        with pytest.raises(wire.DecodeError):
            wire.parse_topic(bad)
    with pytest.raises(wire.DecodeError):
        wire.req_topic("#")


def test_signature_covers_every_field() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    pub = ManagerKey(key.export_public_key().decode())
    signed = sign_request(_open(), key)
    assert verify_request(signed, pub)
    for change in ({"ttl": 99}, {"device": "dev-2"}, {"expires_at": signed.expires_at + 999},
                   {"target": "sshd"}, {"id": "f" * 16}):
        assert not verify_request(dataclasses.replace(signed, **change), pub), change  # type: ignore[arg-type]
    other = asyncssh.generate_private_key("ssh-ed25519")
    assert not verify_request(signed, ManagerKey(other.export_public_key().decode()))
    assert not verify_request(_open(), pub)  # unsigned


def _token() -> DeviceToken:
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    return DeviceToken(device="dev-1", secret="s" * 43, broker="mqtts://b.example:8883",
                       tunnel="t.example:2220", tunnel_host_key=key, manager_key=key)


def test_token_round_trip_and_corruption() -> None:
    t = _token()
    text = t.encode()
    assert parse_token(text) == t
    assert parse_token(f"  {text}\n") == t
    for bad, why in ((text[:-3], "checksum"), (text[:40] + text[41:], "token"),
                     ("dpt2" + text[4:], "expected"), ("", "expected")):
        with pytest.raises(wire.DecodeError, match=why):
            parse_token(bad)


def test_token_fields_validated() -> None:
    with pytest.raises(wire.DecodeError, match="broker"):
        dataclasses.replace(_token(), broker="http://x")
    with pytest.raises(wire.DecodeError, match="tunnel_host_key"):
        dataclasses.replace(_token(), tunnel_host_key="not a key")
    with pytest.raises(wire.DecodeError, match="manager_key: key data"):
        dataclasses.replace(_token(), manager_key="ssh-ed25519 AAAAB")
    with pytest.raises(wire.DecodeError, match="secret"):
        dataclasses.replace(_token(), secret="short")

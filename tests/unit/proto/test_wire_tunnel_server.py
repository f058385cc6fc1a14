"""An open request naming a tunnel server: both fields or neither, checked, and signed."""

from __future__ import annotations

import dataclasses
import time

import asyncssh
import pytest

from dpanel_proto import wire
from dpanel_proto.signing import ManagerKey, sign_request, verify_request

KEY = " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key()
               .decode().split()[:2])


def _open(**kw: object) -> wire.OpenRequest:
    now = time.time()
    return wire.OpenRequest(device="dev-1", id="0123456789abcdef", issued_at=now,  # type: ignore[arg-type]
                            expires_at=now + 30, **kw)


def test_round_trip_and_absent_by_default() -> None:
    named = _open(tunnel="ts-a.example:2220", tunnel_host_key=KEY)
    assert wire.decode(wire.encode(named)) == named
    plain = _open()
    assert b"tunnel" not in wire.encode(plain)  # old agents' signature bytes unchanged
    assert wire.decode(wire.encode(plain)) == plain


@pytest.mark.parametrize("kw,field", [
    ({"tunnel": "h:2220"}, "tunnel/tunnel_host_key"),
    ({"tunnel_host_key": KEY}, "tunnel/tunnel_host_key"),
    ({"tunnel": "no-port", "tunnel_host_key": KEY}, "tunnel:"),
    ({"tunnel": "h:99999", "tunnel_host_key": KEY}, "tunnel:"),
    ({"tunnel": "h\n:22", "tunnel_host_key": KEY}, "tunnel:"),
    ({"tunnel": "h:22", "tunnel_host_key": KEY + " comment"}, "tunnel_host_key"),
    ({"tunnel": "h:22", "tunnel_host_key": "ssh-rsa AAAA"}, "tunnel_host_key"),
])
def test_bad_values_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(wire.DecodeError) as err:
        wire.decode(wire.encode(_open(**kw)))
    assert str(err.value).startswith(field)


def test_signature_covers_the_named_server() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    pub = ManagerKey(key.export_public_key().decode())
    signed = sign_request(_open(tunnel="ts-a.example:2220", tunnel_host_key=KEY), key)
    assert verify_request(signed, pub)
    other = " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key()
                     .decode().split()[:2])
    # a broker that swaps the server or its pin (to send devices to its own) is refused
    for change in ({"tunnel": "evil.example:2220"}, {"tunnel_host_key": other},
                   {"tunnel": None, "tunnel_host_key": None}):
        assert not verify_request(dataclasses.replace(signed, **change), pub), change  # type: ignore[arg-type]

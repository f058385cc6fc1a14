"""Unit tests of the built-in SSH server's certificate check and the user CA's wire form."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import asyncssh
import pytest

from dpanel_agent.sshd import BuiltinSSHServer
from dpanel_agent.userca import load_user_ca, store_user_ca, valid_user_ca
from dpanel_proto import wire
from dpanel_proto.token import DeviceToken


def _line(key: asyncssh.SSHKey) -> str:
    return " ".join(key.export_public_key().decode().split()[:2])


def _server(ca: asyncssh.SSHKey | None) -> BuiltinSSHServer:
    k = asyncssh.generate_private_key("ssh-ed25519")
    return BuiltinSSHServer(k, k, allow_forward_hosts=(), device="kiosk-1",
                            user_ca=_line(ca) if ca else "")


def _blob(ca: asyncssh.SSHKey, principals: list[str], after: float, before: float) -> bytes:
    user = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_user_certificate(user, "alice", principals=principals,
                                        valid_after=int(after), valid_before=int(before))
    return base64.b64decode(cert.export_certificate().split()[1])


@pytest.fixture
def ca() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def test_good_certificates_pass(ca: asyncssh.SSHKey) -> None:
    s, now = _server(ca), time.time()
    for principals in (["dpanel:kiosk-1"], ["dpanel:*"], ["dpanel:x", "dpanel:kiosk-1"]):
        assert s.cert_refusal(_blob(ca, principals, now - 60, now + 60)) == (None, "alice")


def test_refusals_say_why(ca: asyncssh.SSHKey) -> None:
    s, now = _server(ca), time.time()
    why = s.cert_refusal(_blob(ca, ["dpanel:*"], now - 7200, now - 3600))[0]
    assert why is not None and why.startswith("expired")
    why = s.cert_refusal(_blob(ca, ["dpanel:*"], now + 3600, now + 7200))[0]
    assert why is not None and "not yet valid" in why
    other = asyncssh.generate_private_key("ssh-ed25519")
    why = s.cert_refusal(_blob(other, ["dpanel:*"], now - 60, now + 60))[0]
    assert why is not None and "another CA" in why
    for principals in (["dpanel:kiosk-10"], ["dpanel:kiosk-*"], ["root"], []):
        why = s.cert_refusal(_blob(ca, principals, now - 60, now + 60))[0]
        assert why is not None and "principal mismatch" in why, principals
    why = _server(None).cert_refusal(_blob(ca, ["dpanel:*"], now - 60, now + 60))[0]
    assert why is not None and "no user CA" in why


def test_plain_keys_and_garbage_do_not_crash(ca: asyncssh.SSHKey) -> None:
    s = _server(ca)
    plain = base64.b64decode(_line(ca).split()[1])
    assert s.cert_refusal(plain) == (None, "")
    assert s.cert_refusal(b"") == (None, "")
    bad = b"\x00\x00\x00\x20ssh-ed25519-cert-v01@openssh.com" + b"\xff" * 10
    why = s.cert_refusal(bad)[0]
    assert why is not None and "malformed" in why


def test_rotation_takes_effect_at_once(ca: asyncssh.SSHKey) -> None:
    s, now = _server(ca), time.time()
    new = asyncssh.generate_private_key("ssh-ed25519")
    s.set_user_ca(_line(new))
    assert s.cert_refusal(_blob(new, ["dpanel:*"], now - 60, now + 60))[0] is None
    assert "another CA" in str(s.cert_refusal(_blob(ca, ["dpanel:*"], now - 60, now + 60))[0])


def test_stored_ca_wins_over_token_and_pin(tmp_path: Path, ca: asyncssh.SSHKey) -> None:
    a, b, c = (_line(asyncssh.generate_private_key("ssh-ed25519")) for _ in range(3))
    tok = DeviceToken(device="d1", secret="s" * 40, broker="mqtt://h:1", tunnel="h:2",
                      tunnel_host_key=a, manager_key=a)
    pins = tmp_path / "pins"
    pins.mkdir()
    assert load_user_ca(tmp_path, tok, pins) == ""
    (pins / "user_ca.pub").write_text(c + " baked\n")
    assert load_user_ca(tmp_path, tok, pins) == c
    tok2 = DeviceToken(**{**tok.__dict__, "user_ca": b})
    assert load_user_ca(tmp_path, tok2, pins) == b
    store_user_ca(tmp_path, a)
    assert load_user_ca(tmp_path, tok2, pins) == a


def test_user_ca_on_the_wire(ca: asyncssh.SSHKey) -> None:
    now = time.time()
    req = wire.OpenRequest(device="d1", id="a" * 32, issued_at=now, expires_at=now + 9,
                           user_ca=_line(ca))
    assert wire.decode(wire.encode(req)) == req
    # absent: the encoding (and so the signed bytes) is what agents before it expect
    plain = wire.OpenRequest(device="d1", id="a" * 32, issued_at=now, expires_at=now + 9)
    assert b"user_ca" not in wire.encode(plain)
    for bad in ("", "ssh-rsa AAAA", _line(ca) + " comment", _line(ca) + "\n"):
        d = {**wire._to_dict(req), "user_ca": bad}
        with pytest.raises(wire.DecodeError, match="user_ca"):
            wire._decode_open(d)
    st = wire.Status(device="d1", state="online", user_ca="")
    assert wire.decode(wire.encode(st)) == st
    assert wire.decode(wire.encode(wire.Status(device="d1", state="online"))).user_ca is None


def test_a_ca_that_is_no_key_is_never_stored(tmp_path: Path) -> None:
    bogus = "ssh-ed25519 " + base64.b64encode(b"\x01" * 51).decode()
    wire._user_ca({"user_ca": bogus}, allow_empty=False)  # the right shape on the wire...
    assert not valid_user_ca(bogus)  # ...but not a key: refused before it is stored
    (tmp_path / "user_ca.pub").write_text(bogus + "\n")
    tok = DeviceToken(device="d1", secret="s" * 40, broker="mqtt://h:1", tunnel="h:2",
                      tunnel_host_key=_line(asyncssh.generate_private_key("ssh-ed25519")),
                      manager_key=_line(asyncssh.generate_private_key("ssh-ed25519")))
    assert load_user_ca(tmp_path, tok, tmp_path / "pins") == ""

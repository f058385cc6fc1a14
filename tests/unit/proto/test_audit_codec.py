"""The audit record codec: round trips, caps, one DecodeError naming the field."""

from __future__ import annotations

import base64
import json

import pytest

from dpanel_proto import wire


def _rec(**kw: object) -> wire.AuditRecord:
    base: dict[str, object] = dict(device="dev-1", id="ab" * 16, kind="exec", operator="alice",
                                   command="uptime", exit=7, started=1.0, ended=2.0,
                                   bytes_in=3, bytes_out=4, correlation="cd" * 16)
    base.update(kw)
    return wire.AuditRecord(**base)  # type: ignore[arg-type]


def test_record_round_trip() -> None:
    rec = _rec()
    assert wire.decode_audit(wire.encode_audit(rec)) == rec
    chunk = wire.RecordingChunk(device="dev-1", id="ab" * 16, seq=3,
                                data=base64.b64encode(b"hi").decode(), last=True)
    assert wire.decode_audit(wire.encode_audit(chunk)) == chunk


def test_control_characters_are_escaped() -> None:
    out = wire.decode_audit(wire.encode_audit(_rec(command="echo \x1b[2J\nfake line",
                                                   operator="bob\r\n", source="a\x07")))
    assert isinstance(out, wire.AuditRecord)
    for text in (out.command, out.operator, out.source):
        assert text.isprintable()
    assert "\\x1b" in out.command and "\\n" in out.command


@pytest.mark.parametrize(("change", "field"), [
    ({"kind": "rootkit"}, "kind"),
    ({"exit": 300}, "exit"),
    ({"exit": True}, "exit"),
    ({"bytes_in": -1}, "bytes_in"),
    ({"id": "XYZ"}, "id"),
    ({"correlation": "nothex"}, "correlation"),
    ({"device": "Not A Device"}, "device"),
    ({"command": "x" * (wire.MAX_AUDIT_COMMAND + 1)}, "command"),
    ({"via": "root"}, "via"),
    ({"v": 9}, "v"),
    ({"type": "status"}, "type"),
])
def test_bad_fields_name_themselves(change: dict[str, object], field: str) -> None:
    d = json.loads(wire.encode_audit(_rec()))
    d.update(change)
    with pytest.raises(wire.DecodeError, match=f"^{field}:"):
        wire.decode_audit(json.dumps(d).encode())


def test_size_caps() -> None:
    with pytest.raises(wire.DecodeError, match=r"^payload:"):
        wire.decode_audit(b" " * (wire.MAX_AUDIT_PAYLOAD + 1))
    with pytest.raises(wire.DecodeError, match=r"^payload:"):
        wire.decode_audit(b"[" * 20000)
    big = base64.b64encode(b"x" * (wire.MAX_RECORDING_CHUNK + 1)).decode()
    d = {"v": 1, "type": "rec", "device": "dev-1", "id": "ab" * 16, "seq": 0, "data": big}
    with pytest.raises(wire.DecodeError, match=r"^(data|payload):"):
        wire.decode_audit(json.dumps(d).encode())


def test_topic_and_acl() -> None:
    assert wire.audit_topic("dev-1") == "dpanel/v1/dev/dev-1/audit"
    assert wire.parse_topic("dpanel/v1/dev/dev-1/audit") == ("dev-1", "audit")
    assert ("write", "dpanel/v1/dev/%u/audit") in wire.DEVICE_ACL
    assert "dpanel/v1/dev/+/audit" in wire.MANAGER_SUBSCRIPTIONS


def test_agent_caps_long_commands() -> None:
    from dpanel_agent.audit import cap_command

    cut = cap_command("y" * 100000)
    assert len(cut) <= wire.MAX_AUDIT_COMMAND and "more characters" in cut
    assert wire.decode_audit(wire.encode_audit(_rec(command=cut)))

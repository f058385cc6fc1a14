"""The protocol package's small parts: the error-code table, the exec stream, results."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from dpanel_proto import codes, events, result, wire
from dpanel_proto.util import atomic_write, parse_hostport


def test_every_code_has_one_row() -> None:
    assert set(codes.CODES) == set(codes.ErrorCode)
    for code, info in codes.CODES.items():
        assert 200 <= info.http <= 599 and info.meaning, code
        assert (info.exit == 0) == (code is codes.ErrorCode.OK), code


def test_exit_status_of_unknown_code_is_generic() -> None:
    assert codes.exit_status("offline") == codes.CODES[codes.ErrorCode.OFFLINE].exit
    assert codes.exit_status("from-a-newer-server") == 1
    assert codes.exit_status("config") == 2


@pytest.mark.parametrize("ev", [
    events.Output("stdout", b"\xff\xfeok\n"),
    events.Output("stderr", b""),
    events.Exit(0),
    events.Exit(255),
    events.Error("device x is offline", "offline"),
    events.Heartbeat(),
])
def test_event_round_trip(ev: events.StreamEvent) -> None:
    line = events.encode_event(ev)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert events.decode_event(line) == ev


@pytest.mark.parametrize("line", [b"not json", b"[1]", b'{"exit": true}', b'{"exit": "0"}',
                                  b'{"stdout": "***"}', b'{"stdout": 5}', b'{"other": 1}'])
def test_bad_event_is_a_decode_error(line: bytes) -> None:
    with pytest.raises(wire.DecodeError, match="exec stream"):
        events.decode_event(line)


def test_result_line_last_one_wins() -> None:
    out = "progress\n" + result.format_result({"a": 1}) + "\nmore\n" + \
        result.format_result({"a": 2}) + "\n"
    assert result.parse_result(out) == {"a": 2}
    assert result.parse_result("no result here\n") is None
    assert result.parse_result(result.RESULT_PREFIX + "{broken\n") is None
    assert result.parse_result(result.RESULT_PREFIX + json.dumps([1]) + "\n") is None


@pytest.mark.parametrize("value,want", [
    ("h", ("h", 7)), ("h:1", ("h", 1)), ("[::1]:22", ("::1", 22)), ("[::1]", ("::1", 7)),
])
def test_parse_hostport(value: str, want: tuple[str, int]) -> None:
    assert parse_hostport(value, "x", 7) == want


@pytest.mark.parametrize("value", ["", ":1", "h:0", "h:65536", "h:x", "[::1"])
def test_parse_hostport_names_the_field(value: str) -> None:
    with pytest.raises(wire.DecodeError, match=r"^tunnel\.listen: "):
        parse_hostport(value, "tunnel.listen", 7)


def test_atomic_write_mode_is_set_before_data(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "a" / "secret", b"s", 0o600, make_parents=True)
    finally:
        os.umask(old)
    st = (tmp_path / "a" / "secret").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["secret"]  # no temp left


def test_deeply_nested_payload_is_a_decode_error() -> None:
    for payload in (b"[" * 15000, b'{"a":' * 15000):
        with pytest.raises(wire.DecodeError):
            wire.decode(payload[: wire.MAX_PAYLOAD])


@pytest.mark.parametrize("version", ["1.0\x1b[2J", "1.0\nroot", "v 1", "1.0\u202e"])
def test_agent_version_cannot_carry_control_characters(version: str) -> None:
    payload = json.dumps({"v": 1, "type": "status", "device": "d", "state": "online",
                          "agent_version": version})
    with pytest.raises(wire.DecodeError, match="agent_version"):
        wire.decode(payload)


def test_device_message_is_escaped() -> None:
    payload = json.dumps({"v": 1, "type": "response", "device": "d", "id": "ab" * 8,
                          "code": "internal", "message": "x\n\x1b[31mfake log line"})
    msg = wire.decode(payload)
    assert isinstance(msg, wire.Response)
    assert "\n" not in msg.message and "\x1b" not in msg.message
    assert msg.message.startswith("x\\n\\x1b[31m")

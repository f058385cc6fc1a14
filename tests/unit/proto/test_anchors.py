"""Every identifier check refuses a trailing newline: Python's ``$`` matches before one.

A device id, version, request id or token secret ending in "\\n" would otherwise pass the
check and reach log lines, file names and topics.
"""

from __future__ import annotations

import pytest

from dpanel_proto import wire
from dpanel_proto.wire import DecodeError
from dpanel_server import operators


@pytest.mark.parametrize("good", ["kiosk-17", "a"])
def test_device_id_refuses_trailing_newline(good: str) -> None:
    assert wire.validate_device_id(good) == good
    with pytest.raises(DecodeError):
        wire.validate_device_id(good + "\n")


@pytest.mark.parametrize("pattern,good", [
    (wire.DEVICE_ID_RE, "kiosk-17"),
    (wire._VERSION_RE, "1.2.3"),
    (wire._REQ_ID_RE, "0123456789abcdef"),
    (wire._AUDIT_ID_RE, "0123456789abcdef"),
    (operators._NAME_RE, "alice"),
    (operators._SECRET_RE, "A" * 43),
])
def test_patterns_are_anchored_at_the_very_end(pattern: object, good: str) -> None:
    import re
    assert isinstance(pattern, re.Pattern)
    assert pattern.match(good)
    assert not pattern.match(good + "\n")


def test_operator_token_with_a_trailing_newline_is_not_a_token() -> None:
    token = "dpo1.alice." + "A" * 43
    assert operators.parse_operator_token(token) == ("alice", "A" * 43)
    assert operators.parse_operator_token(token + "\n") is None
    with pytest.raises(Exception, match="not an operator name"):
        operators.validate_name("alice\n")


def test_status_with_a_newline_in_its_version_is_refused() -> None:
    status = wire.Status(device="d1", state="online", agent_version="1.0")
    assert isinstance(wire.decode(wire.encode(status)), wire.Status)
    hostile = wire.encode(status).replace(b'"1.0"', b'"1.0\\n"')
    assert b"\\n" in hostile
    with pytest.raises(DecodeError, match="version"):
        wire.decode(hostile)

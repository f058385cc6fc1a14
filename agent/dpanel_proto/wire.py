"""The MQTT contract between agent and manager: topics, their ACL patterns, messages.

Everything that crosses the broker is
encoded and decoded here, and any bad input raises exactly one exception type,
:class:`DecodeError`, whose message names the offending field.

Topics (MQTT 3.1.1 semantics, no shared subscriptions, no v5 features required) are laid
out so that one pattern ACL per direction confines a device to its own subtree; the
broker username *is* the device id::

    dpanel/v1/dev/<id>/status   device -> all      retained; last will = offline
    dpanel/v1/dev/<id>/req      manager -> device  signed open/close requests
    dpanel/v1/dev/<id>/resp     device -> manager  answers, correlated by request id

:data:`DEVICE_ACL` and :data:`MANAGER_TOPICS` are those rules in broker-neutral form;
each broker backend renders them in its own syntax.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, Literal, Mapping, Optional, Union, cast

from .codes import ErrorCode

__all__ = [
    "DEVICE_ACL",
    "DEVICE_ID_RE",
    "MANAGER_SUBSCRIPTIONS",
    "MANAGER_TOPICS",
    "MAX_PAYLOAD",
    "MAX_REQUEST_LIFETIME",
    "PROTOCOL_VERSION",
    "TOPIC_ROOT",
    "CloseRequest",
    "DecodeError",
    "ErrorCode",
    "Message",
    "MsgType",
    "OpenRequest",
    "PingRequest",
    "Request",
    "Response",
    "Status",
    "Target",
    "canonical_bytes",
    "decode",
    "encode",
    "parse_topic",
    "printable",
    "req_topic",
    "resp_topic",
    "status_topic",
    "validate_device_id",
]

PROTOCOL_VERSION = 1
TOPIC_ROOT = "dpanel/v1/dev"
#: Everything the manager may read and write.
MANAGER_TOPICS = "dpanel/v1/#"
#: What the manager subscribes to.
MANAGER_SUBSCRIPTIONS = (f"{TOPIC_ROOT}/+/status", f"{TOPIC_ROOT}/+/resp")
#: A device's whole permission set, as (access, pattern) with ``%u`` = the username,
#: which *is* the device id. Nothing here touches another device's topics, and a device
#: can only read its request topic (it cannot forge requests, which are signed anyway).
DEVICE_ACL: tuple[tuple[Literal["read", "write"], str], ...] = (
    ("write", f"{TOPIC_ROOT}/%u/status"),
    ("write", f"{TOPIC_ROOT}/%u/resp"),
    ("read", f"{TOPIC_ROOT}/%u/req"),
)
#: Anything bigger is refused before JSON parsing, so a hostile peer cannot make us
#: allocate; real messages are well under 2 KiB (the largest carries one public key).
MAX_PAYLOAD = 16 * 1024
#: A request may not claim to be valid for longer than this, so a captured request is
#: useless after a few minutes even if the replay cache was lost (agent restart).
MAX_REQUEST_LIFETIME = 300

DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
#: What an agent version may look like (PEP 440 / semver / git describe): it is shown in
#: terminals, logs and web pages, so nothing else gets through.
_VERSION_RE = re.compile(r"^[A-Za-z0-9._+~:-]{0,64}$")
_REQ_ID_RE = re.compile(r"^[0-9a-f]{16,64}$")

Target = Literal["builtin", "sshd"]
_TARGETS = ("builtin", "sshd")


class DecodeError(ValueError):
    """A payload, topic or token is malformed; the message names the field."""


class MsgType(str, Enum):
    STATUS = "status"
    OPEN = "open"
    CLOSE = "close"
    PING = "ping"
    RESPONSE = "response"



def validate_device_id(value: object, what: str = "device") -> str:
    if not isinstance(value, str) or not DEVICE_ID_RE.match(value):
        raise DecodeError(
            f"{what}: {value!r} is not a device id (lowercase letters, digits and '-', "
            "1-63 characters, not starting with '-')"
        )
    return value


def status_topic(device: str) -> str:
    return f"{TOPIC_ROOT}/{validate_device_id(device)}/status"


def req_topic(device: str) -> str:
    return f"{TOPIC_ROOT}/{validate_device_id(device)}/req"


def resp_topic(device: str) -> str:
    return f"{TOPIC_ROOT}/{validate_device_id(device)}/resp"


def parse_topic(topic: str) -> tuple[str, Literal["status", "req", "resp"]]:
    """Split ``dpanel/v1/dev/<id>/<kind>`` into ``(id, kind)``."""
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        raise DecodeError(f"topic: {topic!r} is not under {prefix}")
    parts = topic[len(prefix):].split("/")
    if len(parts) != 2 or parts[1] not in ("status", "req", "resp"):
        raise DecodeError(f"topic: {topic!r} is not <id>/status|req|resp")
    return validate_device_id(parts[0], "topic device"), cast(Any, parts[1])


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Status:
    """Presence, published retained by the device; the broker publishes the offline
    variant as the device's last will. ``host_key`` is the device's own SSH host key
    (OpenSSH public key line), which the manager pins on first sight."""

    device: str
    state: Literal["online", "offline"]
    ts: float = 0.0
    agent_version: str = ""
    host_key: str = ""
    port: Optional[int] = None
    #: the SSH user CA the device trusts now ("" = none yet); None from agents that
    #: predate certificates, which must never be sent ``OpenRequest.user_ca``
    user_ca: Optional[str] = None
    type: MsgType = field(default=MsgType.STATUS, init=False)


@dataclass(frozen=True)
class OpenRequest:
    """Ask a device to dial the public tunnel. Signed with the manager key."""

    device: str
    id: str
    issued_at: float
    expires_at: float
    ttl: int = 3600
    idle_timeout: int = 600
    target: Target = "builtin"
    sig: str = ""
    #: a new SSH user CA for the device to trust from now on (covered by ``sig``); only
    #: sent when the device's status shows another one (CA migration and rotation)
    user_ca: Optional[str] = None
    type: MsgType = field(default=MsgType.OPEN, init=False)


@dataclass(frozen=True)
class CloseRequest:
    device: str
    id: str
    issued_at: float
    expires_at: float
    sig: str = ""
    type: MsgType = field(default=MsgType.CLOSE, init=False)


@dataclass(frozen=True)
class PingRequest:
    """Are you there? The device answers ``ok`` at once and does nothing else. The
    manager sends it to a device that stopped answering, to notice when it is back."""

    device: str
    id: str
    issued_at: float
    expires_at: float
    sig: str = ""
    type: MsgType = field(default=MsgType.PING, init=False)


@dataclass(frozen=True)
class Response:
    """Device answer to a request (``id`` is the request's id)."""

    device: str
    id: str
    code: ErrorCode
    message: str = ""
    port: Optional[int] = None
    ts: float = 0.0
    type: MsgType = field(default=MsgType.RESPONSE, init=False)


Request = Union[OpenRequest, CloseRequest, PingRequest]
Message = Union[Status, OpenRequest, CloseRequest, PingRequest, Response]


# --------------------------------------------------------------------------- field readers


def _get(d: Mapping[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    if key not in d or d[key] is None:
        if optional:
            return None
        raise DecodeError(f"{key}: missing")
    value = d[key]
    # bool is an int subclass; never accept it where a number is expected
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise DecodeError(f"{key}: expected a number, got {type(value).__name__}")
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise DecodeError(f"{key}: expected an integer, got {value!r}")
        value = int(value)
    if kind is str and not isinstance(value, str):
        raise DecodeError(f"{key}: expected a string, got {type(value).__name__}")
    if kind is float:
        value = float(value)
    return value


def _req_id(d: Mapping[str, Any]) -> str:
    value = _get(d, "id", str)
    if not _REQ_ID_RE.match(value):
        raise DecodeError("id: expected 16-64 lowercase hex characters")
    return cast(str, value)


def _port(d: Mapping[str, Any], optional: bool) -> Optional[int]:
    port = _get(d, "port", int, optional=optional)
    if port is not None and not 1 <= port <= 65535:
        raise DecodeError(f"port: {port} is outside 1-65535")
    return cast(Optional[int], port)


def _bounded_int(d: Mapping[str, Any], key: str, lo: int, hi: int, default: int) -> int:
    value = _get(d, key, int, optional=True)
    if value is None:
        return default
    if not lo <= value <= hi:
        raise DecodeError(f"{key}: {value} is outside {lo}-{hi}")
    return cast(int, value)


def _short_str(d: Mapping[str, Any], key: str, limit: int = 4096) -> str:
    value = _get(d, key, str, optional=True) or ""
    if len(value) > limit:
        raise DecodeError(f"{key}: longer than {limit} characters")
    return cast(str, value)


def _version(d: Mapping[str, Any]) -> str:
    value = _short_str(d, "agent_version", 64)
    if not _VERSION_RE.match(value):
        raise DecodeError("agent_version: only letters, digits and . _ + ~ : - are allowed")
    return value


_USER_CA_RE = re.compile(r"^ssh-ed25519 [A-Za-z0-9+/]{68}$")


def _user_ca(d: Mapping[str, Any], allow_empty: bool) -> Optional[str]:
    """An Ed25519 public key line (type + base64, no comment), "" where allowed, or None."""
    value = _get(d, "user_ca", str, optional=True)
    if value is None or (value == "" and allow_empty):
        return cast(Optional[str], value)
    if not _USER_CA_RE.fullmatch(value):
        raise DecodeError("user_ca: expected 'ssh-ed25519 <base64>' and nothing else")
    return cast(str, value)


def printable(text: str) -> str:
    """``text`` with every control character (newline, ESC, ...) shown escaped, so a
    peer-supplied string can neither forge a log line nor drive a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _decode_status(d: Mapping[str, Any]) -> Status:
    state = _get(d, "state", str)
    if state not in ("online", "offline"):
        raise DecodeError(f"state: {state!r} is not online|offline")
    return Status(
        device=validate_device_id(d.get("device")),
        state=state,
        ts=_get(d, "ts", float, optional=True) or 0.0,
        agent_version=_version(d),
        host_key=_short_str(d, "host_key"),
        port=_port(d, optional=True),
        user_ca=_user_ca(d, allow_empty=True),
    )


def _decode_open(d: Mapping[str, Any]) -> OpenRequest:
    target = _get(d, "target", str, optional=True) or "builtin"
    if target not in _TARGETS:
        raise DecodeError(f"target: {target!r} is not one of {', '.join(_TARGETS)}")
    return OpenRequest(
        device=validate_device_id(d.get("device")),
        id=_req_id(d),
        issued_at=_get(d, "issued_at", float),
        expires_at=_get(d, "expires_at", float),
        ttl=_bounded_int(d, "ttl", 10, 7 * 86400, 3600),
        idle_timeout=_bounded_int(d, "idle_timeout", 5, 7 * 86400, 600),
        target=cast(Target, target),
        sig=_short_str(d, "sig", 256),
        user_ca=_user_ca(d, allow_empty=False),
    )


def _decode_close(d: Mapping[str, Any]) -> CloseRequest:
    return CloseRequest(**_plain_request(d))


def _decode_ping(d: Mapping[str, Any]) -> PingRequest:
    return PingRequest(**_plain_request(d))


def _plain_request(d: Mapping[str, Any]) -> Dict[str, Any]:
    """The fields every request has (close and ping have nothing else)."""
    return {
        "device": validate_device_id(d.get("device")),
        "id": _req_id(d),
        "issued_at": _get(d, "issued_at", float),
        "expires_at": _get(d, "expires_at", float),
        "sig": _short_str(d, "sig", 256),
    }


def _decode_response(d: Mapping[str, Any]) -> Response:
    code = _get(d, "code", str)
    try:
        err = ErrorCode(code)
    except ValueError:
        raise DecodeError(f"code: {code!r} is not a known error code") from None
    return Response(
        device=validate_device_id(d.get("device")),
        id=_req_id(d),
        code=err,
        message=printable(_short_str(d, "message", 1024)),
        port=_port(d, optional=True),
        ts=_get(d, "ts", float, optional=True) or 0.0,
    )


_DECODERS: Dict[MsgType, Callable[[Mapping[str, Any]], Message]] = {
    MsgType.STATUS: _decode_status,
    MsgType.OPEN: _decode_open,
    MsgType.CLOSE: _decode_close,
    MsgType.PING: _decode_ping,
    MsgType.RESPONSE: _decode_response,
}


def decode(payload: Union[bytes, bytearray, str]) -> Message:
    """Decode one MQTT payload. Raises :class:`DecodeError` naming what is wrong."""
    if len(payload) > MAX_PAYLOAD:
        raise DecodeError(f"payload: {len(payload)} bytes is over the {MAX_PAYLOAD} limit")
    try:
        obj = json.loads(payload)
    except RecursionError:
        # b"[" * 15000 nests deeper than the parser recurses: a hostile payload, not a bug
        raise DecodeError("payload: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"payload: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DecodeError("payload: expected a JSON object")
    v = obj.get("v")
    if v != PROTOCOL_VERSION:
        raise DecodeError(f"v: protocol version {v!r} is not {PROTOCOL_VERSION}")
    t = obj.get("type")
    try:
        mtype = MsgType(t)
    except ValueError:
        raise DecodeError(f"type: {t!r} is not one of {[m.value for m in MsgType]}") from None
    return _DECODERS[mtype](obj)


def _to_dict(msg: Message) -> Dict[str, Any]:
    d = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(msg).items()}
    d["v"] = PROTOCOL_VERSION
    return {k: v for k, v in d.items() if v is not None}


def encode(msg: Message) -> bytes:
    return json.dumps(_to_dict(msg), separators=(",", ":"), sort_keys=True).encode()


def canonical_bytes(msg: Request) -> bytes:
    """The bytes a request signature covers: the encoding with ``sig`` removed."""
    d = _to_dict(msg)
    d.pop("sig", None)
    return b"dpanel-req-v1\0" + json.dumps(d, separators=(",", ":"), sort_keys=True).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError(f"{what}: not valid base64") from None

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
    dpanel/v1/dev/<id>/audit    device -> manager  audit records and shell recordings

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
    "AUDIT_KINDS",
    "DEVICE_ACL",
    "DEVICE_ID_RE",
    "MANAGER_SHARE_GROUP",
    "MANAGER_SUBSCRIPTIONS",
    "MANAGER_TOPICS",
    "MAX_AUDIT_COMMAND",
    "MAX_AUDIT_PAYLOAD",
    "MAX_PAYLOAD",
    "MAX_RECORDING_CHUNK",
    "MAX_REQUEST_LIFETIME",
    "PROTOCOL_VERSION",
    "TOPIC_ROOT",
    "UPDATE_STATES",
    "AuditRecord",
    "CloseRequest",
    "DecodeError",
    "ErrorCode",
    "Message",
    "MsgType",
    "OpenRequest",
    "PingRequest",
    "RecordingChunk",
    "Request",
    "Response",
    "Status",
    "Target",
    "UpdateRequest",
    "audit_topic",
    "canonical_bytes",
    "decode",
    "decode_audit",
    "encode",
    "encode_audit",
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
#: Manager replicas share a subscription (MQTT 5 ``$share``) under this group, where the
#: broker has them; its ACL must grant the prefixed filter too (Mosquitto's plugin checks
#: the whole ``$share/...`` string).
MANAGER_SHARE_GROUP = "dpanel-managers"
#: What the manager subscribes to.
MANAGER_SUBSCRIPTIONS = (f"{TOPIC_ROOT}/+/status", f"{TOPIC_ROOT}/+/resp",
                         f"{TOPIC_ROOT}/+/audit")
#: A device's whole permission set, as (access, pattern) with ``%u`` = the username,
#: which *is* the device id. Nothing here touches another device's topics, and a device
#: can only read its request topic (it cannot forge requests, which are signed anyway).
DEVICE_ACL: tuple[tuple[Literal["read", "write"], str], ...] = (
    ("write", f"{TOPIC_ROOT}/%u/status"),
    ("write", f"{TOPIC_ROOT}/%u/resp"),
    ("write", f"{TOPIC_ROOT}/%u/audit"),
    ("read", f"{TOPIC_ROOT}/%u/req"),
)
#: Anything bigger is refused before JSON parsing, so a hostile peer cannot make us
#: allocate; real messages are well under 2 KiB (the largest carries one public key).
MAX_PAYLOAD = 16 * 1024
#: A request may not claim to be valid for longer than this, so a captured request is
#: useless after a few minutes even if the replay cache was lost (agent restart).
MAX_REQUEST_LIFETIME = 300

DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
#: What an agent version may look like (PEP 440 / semver / git describe): it is shown in
#: terminals, logs and web pages, so nothing else gets through.
_VERSION_RE = re.compile(r"^[A-Za-z0-9._+~:-]{0,64}\Z")
_REQ_ID_RE = re.compile(r"^[0-9a-f]{16,64}\Z")

Target = Literal["builtin", "sshd"]
_TARGETS = ("builtin", "sshd")


class DecodeError(ValueError):
    """A payload, topic or token is malformed; the message names the field."""


class MsgType(str, Enum):
    STATUS = "status"
    OPEN = "open"
    CLOSE = "close"
    PING = "ping"
    UPDATE = "update"
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


def audit_topic(device: str) -> str:
    return f"{TOPIC_ROOT}/{validate_device_id(device)}/audit"


def parse_topic(topic: str) -> tuple[str, Literal["status", "req", "resp", "audit"]]:
    """Split ``dpanel/v1/dev/<id>/<kind>`` into ``(id, kind)``."""
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        raise DecodeError(f"topic: {topic!r} is not under {prefix}")
    parts = topic[len(prefix):].split("/")
    if len(parts) != 2 or parts[1] not in ("status", "req", "resp", "audit"):
        raise DecodeError(f"topic: {topic!r} is not <id>/status|req|resp|audit")
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
    #: the device's architecture (amd64, arm64, armhf) and its last agent update: state
    #: (one of UPDATE_STATES), the version it concerned, and why (device-supplied text)
    arch: Optional[str] = None
    update_state: Optional[str] = None
    update_version: Optional[str] = None
    update_reason: Optional[str] = None
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
    #: the tunnel server to dial, "host:port", and its host key (an Ed25519 public key
    #: line) when the manager places tunnels on several servers; both covered by ``sig``.
    #: Absent: the token's tunnel (agents that predate this refuse a request naming one,
    #: since its signature covers fields they do not know)
    tunnel: Optional[str] = None
    tunnel_host_key: Optional[str] = None
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
    #: the tunnel server ("host:port", as the open request named it) that the device
    #: could not reach or that refused it; absent otherwise and from older agents (older
    #: managers ignore it). The manager then tries another server for this device.
    tunnel: Optional[str] = None
    type: MsgType = field(default=MsgType.RESPONSE, init=False)


@dataclass(frozen=True)
class UpdateRequest:
    """An agent update offer (signed with the manager key, as every request): fetch
    ``url``, check it against the manifest fields, whose signature by the *update* key
    is ``manifest_sig``, then swap. ``commit_timeout``: seconds the new agent has to come
    back online before it is reverted."""

    device: str
    id: str
    issued_at: float
    expires_at: float
    version: str
    arch: str
    size: int
    sha256: str
    manifest_sig: str
    url: str
    commit_timeout: int = 300
    sig: str = ""
    type: MsgType = field(default=MsgType.UPDATE, init=False)


#: what a device says of its last update (Status.update_state)
UPDATE_STATES = ("downloading", "failed", "installing", "committed", "rolled_back")

Request = Union[OpenRequest, CloseRequest, PingRequest, UpdateRequest]
Message = Union[Status, OpenRequest, CloseRequest, PingRequest, UpdateRequest, Response]


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


_USER_CA_RE = re.compile(r"^ssh-ed25519 [A-Za-z0-9+/]{68}\Z")


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
        arch=_opt_word(d, "arch", ("amd64", "arm64", "armhf")),
        update_state=_opt_word(d, "update_state", UPDATE_STATES),
        update_version=_opt_version(d, "update_version"),
        update_reason=printable(_short_str(d, "update_reason", 256)) or None,
    )


def _opt_word(d: Mapping[str, Any], key: str, words: tuple[str, ...]) -> Optional[str]:
    value = _get(d, key, str, optional=True)
    if value is not None and value not in words:
        raise DecodeError(f"{key}: {value!r} is not one of {', '.join(words)}")
    return cast(Optional[str], value)


def _opt_version(d: Mapping[str, Any], key: str) -> Optional[str]:
    value = _get(d, key, str, optional=True)
    if value is not None and not (value and _VERSION_RE.match(value)):
        raise DecodeError(f"{key}: only letters, digits and . _ + ~ : - are allowed")
    return cast(Optional[str], value)


def _decode_update(d: Mapping[str, Any]) -> UpdateRequest:
    sha = _get(d, "sha256", str)
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise DecodeError("sha256: expected 64 lowercase hex characters")
    url = _short_str(d, "url", 2048)
    if not url.startswith(("http://", "https://")) or not url.isprintable() or " " in url:
        raise DecodeError("url: expected an http:// or https:// URL")
    return UpdateRequest(
        **_plain_request(d),
        version=cast(str, _opt_version(d, "version") or _get(d, "version", str)),
        arch=cast(str, _opt_word(d, "arch", ("amd64", "arm64", "armhf"))
                  or _get(d, "arch", str)),
        size=_bounded_int(d, "size", 1, 1 << 30, 0) or _get(d, "size", int),
        sha256=sha, manifest_sig=_short_str(d, "manifest_sig", 256), url=url,
        commit_timeout=_bounded_int(d, "commit_timeout", 10, 86400, 300),
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
        **_tunnel_server(d),
    )


_TUNNEL_RE = re.compile(r"^[A-Za-z0-9.:\[\]-]{1,255}:[0-9]{1,5}\Z")
_HOST_KEY_RE = re.compile(r"^ssh-ed25519 [A-Za-z0-9+/]{68}\Z")


def _tunnel_server(d: Mapping[str, Any]) -> Dict[str, Optional[str]]:
    """An open request's named tunnel server: both fields or neither."""
    tunnel = _get(d, "tunnel", str, optional=True)
    key = _get(d, "tunnel_host_key", str, optional=True)
    if tunnel is None and key is None:
        return {}
    if tunnel is None or key is None:
        raise DecodeError("tunnel/tunnel_host_key: give both or neither")
    if not _TUNNEL_RE.fullmatch(tunnel) or not 1 <= int(tunnel.rsplit(":", 1)[1]) <= 65535:
        raise DecodeError("tunnel: expected host:port")
    if not _HOST_KEY_RE.fullmatch(key):
        raise DecodeError("tunnel_host_key: expected 'ssh-ed25519 <base64>' and nothing else")
    return {"tunnel": tunnel, "tunnel_host_key": key}


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
        tunnel=_response_tunnel(d),
    )


def _response_tunnel(d: Mapping[str, Any]) -> Optional[str]:
    tunnel = _get(d, "tunnel", str, optional=True)
    if tunnel is not None and not _TUNNEL_RE.fullmatch(tunnel):
        raise DecodeError("tunnel: expected host:port")
    return cast(Optional[str], tunnel)


_DECODERS: Dict[MsgType, Callable[[Mapping[str, Any]], Message]] = {
    MsgType.STATUS: _decode_status,
    MsgType.OPEN: _decode_open,
    MsgType.CLOSE: _decode_close,
    MsgType.PING: _decode_ping,
    MsgType.UPDATE: _decode_update,
    MsgType.RESPONSE: _decode_response,
}


def _json_object(payload: Union[bytes, bytearray, str], limit: int) -> Dict[str, Any]:
    """The JSON object in ``payload`` (at most ``limit`` bytes), or :class:`DecodeError`."""
    if len(payload) > limit:
        raise DecodeError(f"payload: {len(payload)} bytes is over the {limit} limit")
    try:
        obj = json.loads(payload)
    except RecursionError:
        # b"[" * 15000 nests deeper than the parser recurses: a hostile payload, not a bug
        raise DecodeError("payload: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"payload: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DecodeError("payload: expected a JSON object")
    return obj


def decode(payload: Union[bytes, bytearray, str]) -> Message:
    """Decode one MQTT payload. Raises :class:`DecodeError` naming what is wrong."""
    obj = _json_object(payload, MAX_PAYLOAD)
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


# --------------------------------------------------------------------------- audit
#
# What the device's SSH server saw: one AuditRecord per exec, shell, SFTP session or
# direct-tcpip forward, and a shell's asciicast recording in RecordingChunks, both on
# ``dpanel/v1/dev/<id>/audit``. They are kept apart from the request/response messages
# (own decoder, own size cap) because a recording chunk is bigger than any of those.

#: The session kinds an audit record may have.
AUDIT_KINDS = ("exec", "shell", "sftp", "forward")
#: A command line longer than this is cut by the agent (and refused by the decoder): even
#: fully escaped (6 bytes a control character) it stays well inside one payload.
MAX_AUDIT_COMMAND = 2048
#: A recording chunk carries at most this much asciicast text (before base64).
MAX_RECORDING_CHUNK = 16 * 1024
#: The audit topic's payload cap (the broker's own packet cap is 64 KiB).
MAX_AUDIT_PAYLOAD = 48 * 1024
_AUDIT_ID_RE = re.compile(r"^[0-9a-f]{16,64}\Z")
_NAME_LIMIT = 64


@dataclass(frozen=True)
class AuditRecord:
    """One session served by the device's SSH server. ``operator`` is the certificate's
    key id, or what the manager said it acts for (``via`` tells which: ``cert`` or
    ``manager``); ``correlation`` links it to the manager's own record of the call.
    ``exit`` is the exit status, ``signal`` the signal name if it was killed;
    ``bytes_in`` is what the client sent, ``bytes_out`` what it was sent."""

    device: str
    id: str
    kind: str
    operator: str
    via: str = "manager"
    source: str = ""
    command: str = ""
    exit: Optional[int] = None
    signal: str = ""
    started: float = 0.0
    ended: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    correlation: str = ""
    recording: str = ""  # "", "ok", "failed" (record_failure = "allow"), "refused"
    note: str = ""
    #: SHA-256 of the whole asciicast recording: the chained record vouches for it
    recording_sha256: str = ""
    type: str = field(default="audit", init=False)


@dataclass(frozen=True)
class RecordingChunk:
    """Part ``seq`` (from 0) of the asciicast v2 recording of shell session ``id``;
    ``last`` marks the final part."""

    device: str
    id: str
    seq: int
    data: str  # base64
    last: bool = False
    type: str = field(default="rec", init=False)


AuditMessage = Union[AuditRecord, RecordingChunk]


def _clean(d: Mapping[str, Any], key: str, limit: int) -> str:
    """A device-supplied string: bounded, and never able to drive a terminal or forge a
    log line (escaped by :func:`printable`)."""
    return printable(_short_str(d, key, limit))


def _audit_id(d: Mapping[str, Any], key: str, optional: bool = False) -> str:
    value = _get(d, key, str, optional=optional)
    if value is None or (optional and value == ""):
        return ""
    if not _AUDIT_ID_RE.match(value):
        raise DecodeError(f"{key}: expected 16-64 lowercase hex characters")
    return cast(str, value)


def _count(d: Mapping[str, Any], key: str) -> int:
    value = _get(d, key, int, optional=True)
    if value is None:
        return 0
    if not 0 <= value < 2 ** 63:
        raise DecodeError(f"{key}: {value} is not a byte count")
    return cast(int, value)


def _decode_audit_record(d: Mapping[str, Any]) -> AuditRecord:
    kind = _get(d, "kind", str)
    if kind not in AUDIT_KINDS:
        raise DecodeError(f"kind: {kind!r} is not one of {', '.join(AUDIT_KINDS)}")
    via = _get(d, "via", str, optional=True) or "manager"
    if via not in ("cert", "manager"):
        raise DecodeError(f"via: {via!r} is not cert|manager")
    exit_ = _get(d, "exit", int, optional=True)
    if exit_ is not None and not 0 <= exit_ <= 255:
        raise DecodeError(f"exit: {exit_} is outside 0-255")
    recording = _get(d, "recording", str, optional=True) or ""
    if recording not in ("", "ok", "failed", "refused"):
        raise DecodeError(f"recording: {recording!r} is not ok|failed|refused")
    return AuditRecord(
        device=validate_device_id(d.get("device")), id=_audit_id(d, "id"), kind=kind,
        operator=_clean(d, "operator", _NAME_LIMIT) or "?", via=via,
        source=_clean(d, "source", 256), command=_clean(d, "command", MAX_AUDIT_COMMAND),
        exit=exit_, signal=_clean(d, "signal", 32),
        started=_get(d, "started", float, optional=True) or 0.0,
        ended=_get(d, "ended", float, optional=True) or 0.0,
        bytes_in=_count(d, "bytes_in"), bytes_out=_count(d, "bytes_out"),
        correlation=_audit_id(d, "correlation", optional=True), recording=recording,
        note=_clean(d, "note", 256), recording_sha256=_sha256(d),
    )


def _sha256(d: Mapping[str, Any]) -> str:
    value = _get(d, "recording_sha256", str, optional=True) or ""
    if value and not re.match(r"^[0-9a-f]{64}\Z", value):
        raise DecodeError("recording_sha256: expected 64 lowercase hex characters")
    return cast(str, value)


def _decode_recording(d: Mapping[str, Any]) -> RecordingChunk:
    seq = _get(d, "seq", int)
    if not 0 <= seq < 1_000_000:
        raise DecodeError(f"seq: {seq} is outside 0-999999")
    data = _get(d, "data", str)
    if len(unb64(data, "data")) > MAX_RECORDING_CHUNK:
        raise DecodeError(f"data: more than {MAX_RECORDING_CHUNK} bytes")
    last = d.get("last", False)
    if not isinstance(last, bool):
        raise DecodeError("last: expected true or false")
    return RecordingChunk(device=validate_device_id(d.get("device")), id=_audit_id(d, "id"),
                          seq=seq, data=data, last=last)


def encode_audit(msg: AuditMessage) -> bytes:
    d = asdict(msg)
    d["v"] = PROTOCOL_VERSION
    return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()


def decode_audit(payload: Union[bytes, bytearray, str]) -> AuditMessage:
    """Decode one payload of the audit topic; :class:`DecodeError` names what is wrong."""
    obj = _json_object(payload, MAX_AUDIT_PAYLOAD)
    if obj.get("v") != PROTOCOL_VERSION:
        raise DecodeError(f"v: protocol version {obj.get('v')!r} is not {PROTOCOL_VERSION}")
    t = obj.get("type")
    if t == "audit":
        return _decode_audit_record(obj)
    if t == "rec":
        return _decode_recording(obj)
    raise DecodeError(f"type: {t!r} is not audit|rec")

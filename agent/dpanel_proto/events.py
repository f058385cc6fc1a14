"""The exec event stream: what ``POST /v1/devices/<id>/exec`` sends and ``dpanel`` reads.

One JSON object per line (NDJSON), in order::

    {"stdout": "<base64>"}  {"stderr": "<base64>"}   zero or more output chunks
    {"exit": <int>}                                    the remote exit status, last
    {"error": "<message>", "code": "<ErrorCode>"}     instead of exit, on failure
    {}                                                 heartbeat, any time: ignore it

Output is base64 so that binary output survives byte for byte. The server sends a
heartbeat after every few seconds of silence, so that a reader can tell a silent command
(an apt upgrade) from a dead manager with a read timeout instead of waiting forever.

A request body of type ``application/x-ndjson`` uses the same framing the other way: the
first line is the exec request object, then ``{"stdin": "<base64>"}`` lines; the end of
the body is EOF on the remote stdin.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Literal, Union

from .wire import DecodeError

__all__ = ["Error", "Exit", "Heartbeat", "Output", "StreamEvent", "decode_event", "encode_event"]


@dataclass(frozen=True)
class Output:
    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class Exit:
    status: int


@dataclass(frozen=True)
class Error:
    message: str
    code: str


@dataclass(frozen=True)
class Heartbeat:
    """Nothing happened; the stream is alive."""


StreamEvent = Union[Output, Exit, Error, Heartbeat]


def encode_event(ev: StreamEvent) -> bytes:
    """One NDJSON line, newline included."""
    if isinstance(ev, Output):
        obj: dict[str, object] = {ev.stream: base64.b64encode(ev.data).decode()}
    elif isinstance(ev, Exit):
        obj = {"exit": ev.status}
    elif isinstance(ev, Heartbeat):
        return b"{}\n"
    else:
        obj = {"error": ev.message, "code": ev.code}
    return json.dumps(obj).encode() + b"\n"


def decode_event(line: Union[bytes, str]) -> StreamEvent:
    try:
        obj = json.loads(line)
    except ValueError:
        raise DecodeError("exec stream: a line is not JSON") from None
    if not isinstance(obj, dict):
        raise DecodeError("exec stream: a line is not an object")
    if not obj:
        return Heartbeat()
    if "exit" in obj:
        if isinstance(obj["exit"], bool) or not isinstance(obj["exit"], int):
            raise DecodeError("exec stream: exit is not an integer")
        return Exit(obj["exit"])
    if "error" in obj:
        return Error(str(obj["error"]), str(obj.get("code", "")))
    for name in ("stdout", "stderr"):
        if name in obj:
            try:
                data = base64.b64decode(obj[name], validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise DecodeError(f"exec stream: {name} is not base64") from None
            return Output(name, data)
    raise DecodeError(f"exec stream: unknown event {sorted(obj)}")

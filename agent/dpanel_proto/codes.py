"""Error codes: stable names for machines and dashboards, one table for what they mean.

A code travels end to end: the device puts it in a :class:`~dpanel_proto.wire.Response`,
the manager raises an error carrying it, the API sends it as ``{"error", "code"}`` with
the HTTP status below, and the CLI exits with the exit status below. Scripts match on
the code, never on the message text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["CODES", "CodeInfo", "ErrorCode", "exit_status", "http_status"]


class ErrorCode(str, Enum):
    """Every error code dPanel emits; values are the wire spelling."""

    OK = "ok"
    # answered by the device
    BAD_REQUEST = "bad_request"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    WRONG_DEVICE = "wrong_device"
    TUNNEL_REFUSED = "tunnel_refused"
    TUNNEL_UNREACHABLE = "tunnel_unreachable"
    NOT_OPEN = "not_open"
    INTERNAL = "internal"
    # raised by the manager
    WRONG_PORT = "wrong_port"
    OFFLINE = "offline"
    NOT_ANSWERING = "not_answering"
    TIMEOUT = "timeout"
    HOST_KEY_MISMATCH = "host_key_mismatch"
    DEVICE_ERROR = "device_error"
    CONNECTION_LOST = "connection_lost"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_EXISTS = "device_exists"
    REVOKED = "revoked"
    REGISTRY = "registry"
    BROKER_UNREACHABLE = "broker_unreachable"
    CONFIG = "config"
    INVALID = "invalid"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    TOO_MANY = "too_many"
    API_UNREACHABLE = "api_unreachable"
    # operator accounts (server/dpanel_server/operators.py)
    UNKNOWN_USER = "unknown_user"
    USER_EXISTS = "user_exists"
    UNKNOWN_JOB = "unknown_job"


@dataclass(frozen=True)
class CodeInfo:
    http: int
    exit: int
    meaning: str


# Exit statuses: 1 when the operation failed, 2 when the local configuration or usage is
# wrong (argparse's own convention). dpanel exec, ssh and proxy keep ssh's convention on
# top: the remote command's own status when it ran, 255 whenever it could not, so that
# Ansible and scripts written for ssh read them the same way. Scripts that need to know
# *why* match on the code (``--json`` prints it), not on the exit status.
CODES: dict[ErrorCode, CodeInfo] = {
    ErrorCode.OK: CodeInfo(200, 0, "success"),
    ErrorCode.BAD_REQUEST: CodeInfo(502, 1, "the device could not parse the request"),
    ErrorCode.BAD_SIGNATURE: CodeInfo(502, 1, "the device refused the request's signature"),
    ErrorCode.EXPIRED: CodeInfo(502, 1, "the request expired (clock skew?)"),
    ErrorCode.REPLAYED: CodeInfo(502, 1, "the device saw this request before"),
    ErrorCode.WRONG_DEVICE: CodeInfo(502, 1, "the request named another device"),
    ErrorCode.TUNNEL_REFUSED: CodeInfo(502, 1, "the tunnel server refused the device"),
    ErrorCode.TUNNEL_UNREACHABLE: CodeInfo(502, 1, "the device cannot reach the tunnel"),
    ErrorCode.NOT_OPEN: CodeInfo(409, 1, "no tunnel is open"),
    ErrorCode.INTERNAL: CodeInfo(500, 1, "internal error"),
    ErrorCode.WRONG_PORT: CodeInfo(502, 1, "the device reported a port it does not own"),
    ErrorCode.OFFLINE: CodeInfo(503, 1, "the device is offline"),
    ErrorCode.NOT_ANSWERING: CodeInfo(503, 1, "the device is connected but not answering"),
    ErrorCode.TIMEOUT: CodeInfo(504, 1, "no answer in time"),
    ErrorCode.HOST_KEY_MISMATCH: CodeInfo(502, 1, "the device's SSH host key is not the pin"),
    ErrorCode.DEVICE_ERROR: CodeInfo(502, 1, "talking to the device failed"),
    ErrorCode.CONNECTION_LOST: CodeInfo(502, 1, "the connection to the device was lost"),
    ErrorCode.UNKNOWN_DEVICE: CodeInfo(404, 1, "no such device"),
    ErrorCode.DEVICE_EXISTS: CodeInfo(409, 1, "the name is taken"),
    ErrorCode.REVOKED: CodeInfo(410, 1, "the device is revoked"),
    ErrorCode.REGISTRY: CodeInfo(400, 1, "the registry refused the change"),
    ErrorCode.BROKER_UNREACHABLE: CodeInfo(503, 1, "the manager cannot reach the broker"),
    ErrorCode.CONFIG: CodeInfo(400, 2, "a configuration value is invalid"),
    ErrorCode.INVALID: CodeInfo(422, 1, "the request body is invalid"),
    ErrorCode.UNAUTHORIZED: CodeInfo(401, 1, "missing or wrong credentials"),
    ErrorCode.FORBIDDEN: CodeInfo(403, 1, "the credentials do not allow this"),
    ErrorCode.TOO_MANY: CodeInfo(429, 1, "too many requests; slow down"),
    ErrorCode.API_UNREACHABLE: CodeInfo(503, 1, "the manager API is unreachable"),
    ErrorCode.UNKNOWN_USER: CodeInfo(404, 1, "no such operator"),
    ErrorCode.USER_EXISTS: CodeInfo(409, 1, "the operator name is taken"),
    ErrorCode.UNKNOWN_JOB: CodeInfo(404, 1, "no such job (or not yours)"),
}


def http_status(code: ErrorCode) -> int:
    return CODES[code].http


def exit_status(code: ErrorCode | str) -> int:
    """The CLI exit status for a code; unknown spellings (a newer server) exit 1."""
    try:
        return CODES[ErrorCode(code)].exit
    except ValueError:
        return 1

"""Errors raised by the dPanel server side.

The hierarchy, so callers can catch as broadly or narrowly as they need::

    DPanelError                      base; str(e) is for an operator, e.code for machines
    ├── ConfigError                  a config file or value is invalid (names the field)
    ├── RegistryError                registry problems
    │   ├── UnknownDevice            no such device
    │   ├── DeviceExists             enrol of a name that is taken
    │   └── DeviceRevoked            the device was revoked
    ├── DeviceError                  talking to a device failed
    │   ├── DeviceOffline            no presence on the broker
    │   ├── DeviceNotAnswering       connected, but left the last request unanswered
    │   ├── TunnelRefused            the device answered with a refusal (its code)
    │   ├── RequestTimeout           no answer within N s
    │   └── HostKeyMismatch          the device's SSH host key changed: refused
    └── BrokerError                  the manager cannot reach the broker

Protocol-level decoding errors are :class:`dpanel_proto.wire.DecodeError`.
"""

from __future__ import annotations

from dpanel_proto.codes import ErrorCode, http_status

__all__ = [
    "BrokerError",
    "ConfigError",
    "DPanelError",
    "DeviceError",
    "DeviceExists",
    "DeviceNotAnswering",
    "DeviceOffline",
    "DeviceRevoked",
    "HostKeyMismatch",
    "RegistryError",
    "RequestTimeout",
    "TunnelRefused",
    "UnknownDevice",
]


class DPanelError(Exception):
    """Base of every dPanel server error; the message is meant for an operator.

    ``code`` is the stable :class:`~dpanel_proto.codes.ErrorCode` the API sends and the
    CLI exits by; the HTTP status comes from the one table in :mod:`dpanel_proto.codes`.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)

    @property
    def http_status(self) -> int:
        return http_status(self.code)


class ConfigError(DPanelError):
    code = ErrorCode.CONFIG


class RegistryError(DPanelError):
    code = ErrorCode.REGISTRY


class UnknownDevice(RegistryError):
    code = ErrorCode.UNKNOWN_DEVICE


class DeviceExists(RegistryError):
    code = ErrorCode.DEVICE_EXISTS


class DeviceRevoked(RegistryError):
    code = ErrorCode.REVOKED


class DeviceError(DPanelError):
    code = ErrorCode.DEVICE_ERROR


class DeviceOffline(DeviceError):
    code = ErrorCode.OFFLINE


class DeviceNotAnswering(DeviceError):
    code = ErrorCode.NOT_ANSWERING


class TunnelRefused(DeviceError):
    code = ErrorCode.TUNNEL_REFUSED


class RequestTimeout(DeviceError):
    code = ErrorCode.TIMEOUT


class HostKeyMismatch(DeviceError):
    code = ErrorCode.HOST_KEY_MISMATCH


class BrokerError(DPanelError):
    code = ErrorCode.BROKER_UNREACHABLE

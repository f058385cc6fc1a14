"""Errors raised by the dPanel server side.

The hierarchy, so callers can catch as broadly or narrowly as they need::

    DPanelError                      base; str(e) is a message fit for an operator
    ├── ConfigError                  a config file or value is invalid (names the field)
    ├── RegistryError                registry problems
    │   ├── UnknownDevice            no such device
    │   ├── DeviceExists             enrol of a name that is taken
    │   └── DeviceRevoked            the device was revoked
    ├── DeviceError                  talking to a device failed
    │   ├── DeviceOffline            no presence on the broker
    │   ├── TunnelRefused            the device answered with a refusal (carries the code)
    │   ├── RequestTimeout           no answer within N s
    │   └── HostKeyMismatch          the device's SSH host key changed: refused
    └── BrokerError                  the manager cannot reach the broker

Protocol-level decoding errors are :class:`dpanel_agent.wire.DecodeError`.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "DPanelError",
    "DeviceError",
    "DeviceExists",
    "DeviceOffline",
    "DeviceRevoked",
    "HostKeyMismatch",
    "RegistryError",
    "RequestTimeout",
    "TunnelRefused",
    "UnknownDevice",
]


class DPanelError(Exception):
    """Base of every dPanel server error; the message is meant for an operator."""

    #: HTTP status the API answers with for this error.
    http_status = 500


class ConfigError(DPanelError):
    http_status = 400


class RegistryError(DPanelError):
    http_status = 400


class UnknownDevice(RegistryError):
    http_status = 404


class DeviceExists(RegistryError):
    http_status = 409


class DeviceRevoked(RegistryError):
    http_status = 410


class DeviceError(DPanelError):
    http_status = 502


class DeviceOffline(DeviceError):
    http_status = 503


class TunnelRefused(DeviceError):
    def __init__(self, message: str, code: str = "tunnel_refused") -> None:
        super().__init__(message)
        self.code = code


class RequestTimeout(DeviceError):
    http_status = 504


class HostKeyMismatch(DeviceError):
    http_status = 502


class BrokerError(DPanelError):
    http_status = 503

"""Device tokens: one copy-pasteable string that carries everything a device needs.

A token is ``dpt1.<base64url(zlib(json))>.<crc32>``. The checksum exists so that a token
mangled by a chat client or truncated in a terminal gets "token truncated or mistyped"
instead of a confusing error about the broker. The token holds a secret: treat it like
a password. The server stores only a hash of the secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .ports import BROKER_PORT, TUNNEL_PORT
from .proxy import parse_proxy
from .util import parse_hostport
from .wire import DecodeError, validate_device_id

__all__ = ["TOKEN_PREFIX", "DeviceToken", "parse_token"]

TOKEN_PREFIX = "dpt1"
_MAX_TOKEN = 16 * 1024
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{32,128}\Z")
_PUBKEY_RE = re.compile(r"^(ssh-ed25519|ecdsa-sha2-nistp256|ssh-rsa) [A-Za-z0-9+/=]+( .*)?\Z")

#: Fields a token may leave out (tokens of older servers have none of them).
_OPTIONAL = frozenset({"broker_ca", "edge", "proxy", "user_ca"})


@dataclass(frozen=True)
class DeviceToken:
    """What a device needs to come up: identity, secret, where to dial, and what to pin."""

    device: str
    secret: str
    #: mqtt://host:port or mqtts://host:port; a cluster: several, comma-separated (one
    #: scheme), dialled in turn (agents before this release read only a single URL)
    broker: str
    tunnel: str  # host:port of the public tunnel
    tunnel_host_key: str  # OpenSSH public key line of the tunnel server (pinned)
    manager_key: str  # OpenSSH public key line of the manager (pinned)
    broker_ca: Optional[str] = None  # PEM, when the broker uses a private CA
    #: host:port of the one-port TLS front (``stack up --edge-listen``): when set, the
    #: device speaks MQTT and SSH inside TLS there (ALPN dpanel-mqtt / dpanel-ssh),
    #: verified against broker_ca, instead of dialling ``broker`` and ``tunnel``
    edge: Optional[str] = None
    #: http://[user:pass@]host:port of an HTTP CONNECT proxy the device must use
    proxy: Optional[str] = None
    #: OpenSSH public key line of the manager's SSH user CA (operator certificates);
    #: absent in tokens made before certificates existed, which still parse.
    user_ca: Optional[str] = None

    def __post_init__(self) -> None:
        validate_device_id(self.device, "token device")
        if not _SECRET_RE.match(self.secret):
            raise DecodeError("token secret: expected 32-128 url-safe characters")
        urls = self.broker_urls
        for url in urls:
            if not url.startswith(("mqtt://", "mqtts://")):
                raise DecodeError(f"token broker: {url!r} is not mqtt://... or mqtts://...")
            parse_hostport(url.split("://", 1)[1], "token broker", BROKER_PORT)
        if len({u.split("://", 1)[0] for u in urls}) > 1:
            raise DecodeError("token broker: mixes mqtt:// and mqtts:// URLs")
        parse_hostport(self.tunnel, "token tunnel", TUNNEL_PORT)
        if self.edge is not None:
            parse_hostport(self.edge, "token edge", 443)
            if not self.broker_ca:
                raise DecodeError("token edge: needs broker_ca (the CA the edge's "
                                  "certificate is checked against)")
        if self.proxy is not None:
            parse_proxy(self.proxy, "token proxy")
        for name in ("tunnel_host_key", "manager_key", "user_ca"):
            line = getattr(self, name)
            if line is None and name == "user_ca":
                continue
            if not _PUBKEY_RE.match(line):
                raise DecodeError(f"token {name}: not an OpenSSH public key line")
            try:
                base64.b64decode(line.split()[1], validate=True)
            except (binascii.Error, ValueError):
                raise DecodeError(f"token {name}: key data is not valid base64") from None

    @property
    def broker_urls(self) -> list[str]:
        return [u.strip() for u in self.broker.split(",")]

    def encode(self) -> str:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        raw = zlib.compress(json.dumps(d, separators=(",", ":")).encode(), 9)
        body = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        return f"{TOKEN_PREFIX}.{body}.{zlib.crc32(raw):08x}"

    def redacted(self) -> str:
        return f"{self.device}@{self.broker} (secret ****{self.secret[-4:]})"


def parse_token(text: str) -> DeviceToken:
    """Parse a token string; raises :class:`DecodeError` saying what is wrong with it."""
    text = text.strip()
    if len(text) > _MAX_TOKEN:
        raise DecodeError("token: longer than any valid token")
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise DecodeError(f"token: expected '{TOKEN_PREFIX}.<body>.<checksum>'")
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
    except (binascii.Error, ValueError):
        raise DecodeError("token: body is not base64url (truncated or mistyped?)") from None
    if f"{zlib.crc32(raw):08x}" != parts[2].lower():
        raise DecodeError("token: checksum mismatch (truncated or mistyped?)")
    try:
        obj: Any = json.loads(zlib.decompress(raw))
    except (zlib.error, ValueError):
        raise DecodeError("token: body does not decompress to JSON") from None
    if not isinstance(obj, dict):
        raise DecodeError("token: body is not an object")
    for name in _OPTIONAL:
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise DecodeError(f"token {name}: not a string")
    fields = set(DeviceToken.__dataclass_fields__)
    unknown = set(obj) - fields
    if unknown:
        raise DecodeError(f"token: unknown field(s) {sorted(unknown)} (newer format?)")
    for name in fields - _OPTIONAL:
        if not isinstance(obj.get(name), str):
            raise DecodeError(f"token {name}: missing or not a string")
    return DeviceToken(**obj)

"""``dpanel login`` and its contexts: the CLI as a remote client, with nothing from the server.

~/.config/dpanel/config.toml ($XDG_CONFIG_HOME honoured; 0600, written atomically) holds
contexts as kubectl's kubeconfig does: each a manager URL, an operator token and the pin
its certificate is checked against, and ``current-context``. A pin is either the CA
certificate (PEM; ``--ca-file``) or the SHA-256 fingerprint of the server certificate
(``--fingerprint``, or accepted at the terminal on first use). Connections verify against
the pin only, never the system roots: a public CA cannot vouch for a manager the operator
pinned. The token is sent only after the pin matched.

Stdlib only at import time (the CLI starts fast); tomli-w is imported when writing.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import tomllib

from dpanel_proto.codes import ErrorCode

from .client import ApiError
from .errors import DPanelError

__all__ = ["Context", "LoginError", "PinnedHTTPSConnection", "config_path", "fetch_fingerprint",
           "format_fingerprint", "load_file", "parse_fingerprint", "parse_url",
           "pick_context", "save_file"]

HTTPS_DEFAULT_PORT = 443
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class LoginError(DPanelError):
    """A login/context problem on this machine: exit 2, one line naming the thing."""

    code = ErrorCode.CONFIG


@dataclass(frozen=True)
class Context:
    name: str
    server: str  # https://host:port (http:// only on loopback)
    token: str
    ca: Optional[str] = None  # PEM of the pinned CA
    fingerprint: Optional[str] = None  # hex SHA-256 of the pinned server certificate
    user: str = ""  # who the token was when logged in (informational)

    @property
    def scheme_host_port(self) -> tuple[str, str, int]:
        return parse_url(self.server)


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dpanel" / "config.toml"


def parse_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a manager URL; plain http only to a loopback address (a
    token must never cross a network in clear)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise LoginError(f"URL {url!r}: {exc}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise LoginError(f"URL {url!r}: expected https://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
        raise LoginError(f"URL {url!r}: give only https://HOST[:PORT] (no path, query or "
                         "user; the token goes in --token)")
    if parts.scheme == "http" and host not in _LOOPBACK:
        raise LoginError(f"URL {url!r}: plain http is only for loopback; use https://")
    return parts.scheme, host, port or (HTTPS_DEFAULT_PORT if parts.scheme == "https" else 80)


def parse_fingerprint(text: str) -> str:
    """``SHA256:AB:CD:..``, ``ab cd ..`` or 64 hex digits -> 64 lowercase hex digits."""
    t = text.strip()
    if t.lower().startswith("sha256:"):
        t = t[7:]
    t = re.sub(r"[\s:]", "", t).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", t):
        raise LoginError(f"--fingerprint {text[:80]!r}: expected the certificate's SHA-256 "
                         "as 64 hex digits (colons allowed), e.g. from `openssl x509 "
                         "-noout -fingerprint -sha256`")
    return t


def format_fingerprint(hexdigest: str) -> str:
    up = hexdigest.upper()
    return "SHA256:" + ":".join(up[i:i + 2] for i in range(0, len(up), 2))


def _insecure_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # checked by fingerprint right after the handshake
    return ctx


def ca_context(pem: str, what: str = "the pinned CA") -> ssl.SSLContext:
    """Verifies against ``pem`` only (cadata given: no system roots are loaded)."""
    try:
        ctx = ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise LoginError(f"{what}: not a PEM CA certificate ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def fetch_fingerprint(host: str, port: int, timeout: float = 15) -> str:
    """The server certificate's SHA-256 (hex), for trust on first use."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                _insecure_context().wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError as exc:
        raise LoginError(f"https://{host}:{port}: cannot connect ({exc})") from None
    if not der:
        raise LoginError(f"https://{host}:{port}: the server sent no certificate")
    return hashlib.sha256(der).hexdigest()


class CertificateMismatch(ApiError):
    """The server is not the one pinned (an ApiError: exec's fan-out reports it per device)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0, ErrorCode.UNAUTHORIZED.value)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS checked against a context's pin before a byte of the request is sent."""

    def __init__(self, host: str, port: int, *, timeout: float, ca: Optional[str],
                 fingerprint: Optional[str]) -> None:
        if ca is None and fingerprint is None:
            raise LoginError(f"https://{host}:{port}: no pinned CA or fingerprint")
        ctx = ca_context(ca) if ca is not None else _insecure_context()
        super().__init__(host, port, timeout=timeout, context=ctx)
        self._fingerprint = fingerprint if ca is None else None

    def connect(self) -> None:
        super().connect()
        if self._fingerprint is None:
            return
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True) or b""
        got = hashlib.sha256(der).hexdigest()
        if not hmac.compare_digest(got, self._fingerprint):
            self.close()
            raise CertificateMismatch(
                f"https://{self.host}:{self.port}: the server certificate "
                f"{format_fingerprint(got)} is not the pinned "
                f"{format_fingerprint(self._fingerprint)}; refusing to send the token (log "
                "in again if the server's certificate really changed)")


# ---------------------------------------------------------------------------- the file


def load_file(path: Optional[Path] = None) -> dict[str, Any]:
    """The login file as a dict (empty if there is none)."""
    p = path or config_path()
    try:
        text = p.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise LoginError(f"{p}: cannot read it ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LoginError(f"{p}: not valid TOML ({exc})") from None
    if not isinstance(data.get("contexts", {}), dict):
        raise LoginError(f"{p}: contexts: expected a table")
    return data


def save_file(data: dict[str, Any], path: Optional[Path] = None) -> Path:
    import tomli_w

    from dpanel_proto.util import atomic_write

    p = path or config_path()
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(p, "# dpanel login contexts (holds tokens: keep it 0600)\n"
                 + tomli_w.dumps(data), 0o600)
    return p


def _context(name: str, raw: Any, where: Path) -> Context:
    if not isinstance(raw, dict):
        raise LoginError(f"{where}: contexts.{name}: expected a table")
    vals: dict[str, Optional[str]] = {}
    for key in ("server", "token", "ca", "fingerprint", "user"):
        v = raw.get(key)
        if v is not None and not isinstance(v, str):
            raise LoginError(f"{where}: contexts.{name}.{key}: expected a string")
        vals[key] = v
    if not vals["server"] or not vals["token"]:
        raise LoginError(f"{where}: contexts.{name}: needs server and token (dpanel login)")
    return Context(name, vals["server"] or "", vals["token"] or "", vals["ca"],
                   vals["fingerprint"], vals["user"] or "")


def pick_context(name: Optional[str], *, required: bool) -> Optional[Context]:
    """The context called ``name``, else the file's current-context; None when there is
    none and ``required`` is false (then server.toml is used, as on the manager host)."""
    p = config_path()
    data = load_file(p)
    contexts = data.get("contexts", {})
    chosen = name or data.get("current-context")
    if not chosen:
        if required:
            raise LoginError(f"no context chosen and no current-context in {p} (dpanel login)")
        return None
    if chosen not in contexts:
        known = ", ".join(sorted(contexts)) or "none"
        raise LoginError(f"context {chosen!r} is not in {p} (known: {known}; dpanel login "
                         "URL --token T --context NAME)")
    return _context(str(chosen), contexts[chosen], p)

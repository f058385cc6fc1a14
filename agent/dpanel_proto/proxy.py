"""HTTP CONNECT proxies: where a site's only way out is a proxy, both the broker session
(paho) and the tunnel (asyncssh) dial through one of these sockets.

Stdlib only (no PySocks): one blocking function opens a TCP connection to the proxy,
sends ``CONNECT host:port`` (with basic auth when the proxy URL has credentials) and
returns the socket once the proxy answered 2xx, within one overall timeout. paho calls it
from its own thread; asyncssh from a worker thread. Which proxy applies follows the
usual rules: the agent's ``proxy`` setting, else the token's, else ``https_proxy`` /
``HTTPS_PROXY`` from the environment, and ``no_proxy`` / ``NO_PROXY`` (hosts, domain
suffixes, ``*``) sends a destination direct. Errors never carry the proxy's password.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Mapping, Optional

from .wire import DecodeError

__all__ = ["Proxy", "ProxyError", "bypasses", "open_connection", "parse_proxy",
           "select_proxy"]

#: The proxy's answer to CONNECT (status line + headers) may be at most this long.
_MAX_REPLY = 16 * 1024
#: Spellings of "no proxy" in the agent's config (explicitly direct, whatever the env says).
NO_PROXY_WORDS = ("", "none", "direct")


class ProxyError(OSError):
    """The proxy could not be reached or refused the CONNECT; the message is one line
    that names the proxy (without its password) and says what to fix. An OSError, so
    that paho's reconnect loop treats it as a failed connection and retries."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    username: str = ""
    password: str = ""

    def __str__(self) -> str:  # never the password
        user = f"{urllib.parse.quote(self.username)}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{user}{host}:{self.port}"

    def __repr__(self) -> str:
        return f"Proxy({self})"


def parse_proxy(url: str, what: str = "proxy") -> Proxy:
    """``http://[user:pass@]host[:port]`` (port defaults to 3128, as squid and tinyproxy
    ship; a bare ``host:port`` is taken as http). Raises DecodeError naming ``what``."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        u = urllib.parse.urlsplit(text)
        port = u.port
    except ValueError as exc:
        raise DecodeError(f"{what}: {_redact(url)!r} is not a proxy URL ({exc})") from None
    if u.scheme != "http":
        raise DecodeError(f"{what}: only http:// proxies (HTTP CONNECT) are supported, "
                          f"got {u.scheme}://")
    if not u.hostname:
        raise DecodeError(f"{what}: no host in {_redact(url)!r}")
    if u.path not in ("", "/") or u.query or u.fragment:
        raise DecodeError(f"{what}: {_redact(url)!r} has a path; expected http://host:port")
    return Proxy(u.hostname, port or 3128, urllib.parse.unquote(u.username or ""),
                 urllib.parse.unquote(u.password or ""))


def _redact(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    head, sep, rest = url.rpartition("@")
    if not sep:
        return url
    scheme, _, cred = head.rpartition("://")
    user = cred.split(":", 1)[0]
    return f"{scheme + '://' if scheme else ''}{user}:****@{rest}"


def bypasses(host: str, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (comma/space separated: ``*``, hosts, ``.suffix`` or
    ``suffix`` domains, IP addresses or CIDR networks, optional ``:port`` ignored)
    sends ``host`` direct, as curl and Python's urllib read it."""
    h = host.strip("[]").lower().rstrip(".")
    try:
        addr: Optional[ipaddress._BaseAddress] = ipaddress.ip_address(h)
    except ValueError:
        addr = None
    for raw in no_proxy.replace(",", " ").split():
        entry = raw.strip().lower()
        if entry == "*":
            return True
        if entry.startswith("[") and "]" in entry:
            entry = entry[1:entry.index("]")]
        elif entry.count(":") == 1:
            entry = entry.split(":", 1)[0]
        entry = entry.rstrip(".")
        if not entry:
            continue
        if addr is not None:
            try:
                if addr in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        suffix = entry.lstrip("*").lstrip(".")
        if h == suffix or h.endswith("." + suffix):
            return True
    return False


def select_proxy(host: str, *, configured: Optional[str] = None,
                 from_token: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None) -> Optional[Proxy]:
    """The proxy to reach ``host`` through, or None for a direct connection.

    Order: the agent's ``proxy`` setting (``"none"`` = always direct), the token's, then
    ``https_proxy`` / ``HTTPS_PROXY``. ``no_proxy`` / ``NO_PROXY`` applies to all three:
    a site's own exceptions know best which destinations are local."""
    e = os.environ if env is None else env
    if configured is not None and configured.strip().lower() in NO_PROXY_WORDS:
        return None
    url, what = configured, "proxy"
    if not url:
        url, what = from_token, "token proxy"
    if not url:
        url, what = e.get("https_proxy") or e.get("HTTPS_PROXY"), "https_proxy"
    if not url:
        return None
    no = e.get("no_proxy") or e.get("NO_PROXY") or ""
    if no and bypasses(host, no):
        return None
    return parse_proxy(url, what)


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(status: int, text: str) -> str:
    if status in (401, 407):  # 407 is the standard; tinyproxy answers CONNECT with 401
        text = text or "Proxy Authentication Required"
        return f"{status} {text} (wrong or missing proxy credentials)"
    if status == 403:
        return f"403 {text or 'Forbidden'} (the proxy does not allow this destination or port)"
    return f"{status} {text}".strip()


def open_connection(proxy: Proxy, host: str, port: int, timeout: float) -> socket.socket:
    """A blocking socket connected to ``host:port`` through ``proxy``, or ProxyError.
    ``timeout`` bounds the whole exchange (TCP connect, CONNECT, the proxy's answer)."""
    deadline = time.monotonic() + timeout
    target = _fmt(host, port)
    where = f"proxy {proxy}"
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except OSError as exc:
        raise ProxyError(f"cannot reach {where}: {exc.strerror or exc}") from None
    try:
        req = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", "User-Agent: dpanel"]
        if proxy.username or proxy.password:
            cred = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
            req.append(f"Proxy-Authorization: Basic {cred}")
        sock.sendall(("\r\n".join(req) + "\r\n\r\n").encode())
        buf = b""
        # Read byte-wise up to the blank line: nothing after it may be swallowed (the
        # server's first bytes, e.g. an SSH banner, follow at once).
        while not buf.endswith(b"\r\n\r\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProxyError(f"{where} did not answer CONNECT {target} in time")
            sock.settimeout(left)
            try:
                b = sock.recv(1)
            except socket.timeout:
                raise ProxyError(f"{where} did not answer CONNECT {target} in time") from None
            if not b:
                raise ProxyError(f"{where} closed the connection during CONNECT {target}")
            buf += b
            if len(buf) > _MAX_REPLY:
                raise ProxyError(f"{where} sent an over-long answer to CONNECT {target}")
        line = buf.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ProxyError(f"{where} is not an HTTP proxy (answered {line[:60]!r})")
        status = int(parts[1])
        if not 200 <= status < 300:
            text = "".join(c for c in (parts[2] if len(parts) > 2 else "") if c.isprintable())
            raise ProxyError(f"{where} refused CONNECT {target}: {_reason(status, text[:80])}")
        sock.settimeout(None)
        return sock
    except ProxyError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ProxyError(f"{where} failed during CONNECT {target}: {exc.strerror or exc}"
                         ) from None

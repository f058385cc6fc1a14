"""A small stdlib HTTP client for the manager API, so that ``dpanel`` starts fast.

It is built from server.toml on the manager host (plain HTTP on loopback, the admin token
file) or from a ``dpanel login`` context anywhere (HTTPS checked against the pinned CA
or fingerprint, an operator token): :func:`make_client` picks.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Optional

from dpanel_proto.codes import ErrorCode

from .config import ServerConfig, _hostport, load_config
from .errors import DPanelError

if TYPE_CHECKING:
    from .login import Context

__all__ = ["DEFAULT_CONFIG", "ApiClient", "ApiError", "ExecStream", "client_for", "find_config",
           "make_client", "when"]

DEFAULT_CONFIG = "/etc/dpanel/server.toml"

#: Seconds an exec stream may stay silent (no output, no heartbeat) before the manager is
#: taken for dead. The server sends a heartbeat after 15 s of silence
#: (DPANEL_EXEC_HEARTBEAT), so this never cuts off a live command, however quiet.
DEFAULT_STREAM_TIMEOUT = 60.0


class ApiError(DPanelError):
    """An error the API answered with (``code`` as it sent it), or no answer at all."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        known = code in ErrorCode._value2member_map_
        super().__init__(message, code if known else None)
        self.status, self.wire_code = status, code


def find_config(path: Optional[str]) -> ServerConfig:
    """--config, else $DPANEL_CONFIG, else /etc/dpanel/server.toml."""
    return load_config(path or os.environ.get("DPANEL_CONFIG") or DEFAULT_CONFIG)


def client_for(args: Any) -> ApiClient:
    """The client of a parsed ``dpanel`` command line (its --config / --context)."""
    return make_client(getattr(args, "config", None), getattr(args, "context", None))


def when(t: Any) -> str:
    """A timestamp as the CLI's tables show it (local time), "-" for none."""
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def make_client(config: Optional[str] = None, context: Optional[str] = None,
                **kw: Any) -> ApiClient:
    """The client a command uses: --context, else --config, else $DPANEL_CONTEXT, else
    $DPANEL_CONFIG, else the login file's current-context, else server.toml (today's
    zero-setup use on the manager host)."""
    from .login import LoginError, pick_context

    if config and context:
        raise LoginError("--config and --context: give one (server.toml, or a login context)")
    if config:
        return ApiClient(find_config(config), **kw)
    name = context or os.environ.get("DPANEL_CONTEXT") or None
    if name is None and os.environ.get("DPANEL_CONFIG"):
        return ApiClient(find_config(None), **kw)
    ctx = pick_context(name, required=name is not None)
    if ctx is None:
        return ApiClient(find_config(None), **kw)
    return ApiClient(context=ctx, **kw)


class ApiClient:
    """``timeout`` bounds each request up to its answer's headers; a streamed exec then
    lives as long as its command, with ``stream_timeout`` (env DPANEL_STREAM_TIMEOUT) as
    the longest silence accepted."""

    def __init__(self, cfg: Optional[ServerConfig] = None, timeout: float = 120,
                 stream_timeout: Optional[float] = None, *,
                 context: Optional[Context] = None) -> None:
        self.cfg = cfg
        self.context = context
        self.timeout = timeout
        self.stream_timeout = stream_timeout or float(
            os.environ.get("DPANEL_STREAM_TIMEOUT") or DEFAULT_STREAM_TIMEOUT)
        if context is not None:
            self.scheme, self.host, self.port = context.scheme_host_port
            self._token = context.token
            return
        if cfg is None:
            raise TypeError("ApiClient needs a ServerConfig or a login context")
        self.scheme = "http"
        self.host, self.port = _hostport(cfg.manager.api_listen, "manager.api_listen", 8780)
        token_file = Path(cfg.manager.admin_token_file)
        try:
            self._token = token_file.read_text().strip()
        except OSError as exc:
            raise ApiError(f"cannot read the admin token {token_file}: {exc.strerror} "
                           "(run as the dpanel user or root?)") from None

    @property
    def remote(self) -> bool:
        """True when built from a login context (no server file on this machine)."""
        return self.context is not None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def connection(self) -> http.client.HTTPConnection:
        """A new connection: plain on loopback, or HTTPS checked against the pin."""
        ctx = self.context
        if ctx is None or self.scheme == "http":
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        from .login import PinnedHTTPSConnection

        return PinnedHTTPSConnection(self.host, self.port, timeout=self.timeout,
                                     ca=ctx.ca, fingerprint=ctx.fingerprint)

    def authorization(self) -> str:
        """The ``Authorization`` header value of this client's requests."""
        return f"Bearer {self._token}"

    def connect_socket(self) -> socket.socket:
        """A connected *plain* socket to the API that two threads may read and write at
        once (the proxy's WebSocket and the streamed exec do): over HTTPS, TLS checked
        against the pin exactly as for every request, is relayed by a thread of its
        own (see ``_tlsrelay``). No token is sent yet."""
        ctx = self.context
        if ctx is None or self.scheme == "http":
            conn = self.connection()
            try:
                conn.connect()
            except OSError as exc:
                raise self._unreachable(exc) from None
            sock, conn.sock = conn.sock, None
            assert sock is not None
            return sock
        from ._tlsrelay import tls_socket
        from .login import CertificateMismatch, _insecure_context, ca_context, format_fingerprint

        def mismatch(got: str) -> Exception:
            return CertificateMismatch(
                f"{self.url}: the server certificate {format_fingerprint(got)} is not the "
                f"pinned {format_fingerprint(ctx.fingerprint or '')}; refusing to send the "
                "token (log in again if the server's certificate really changed)")

        tls = ca_context(ctx.ca) if ctx.ca is not None else _insecure_context()
        try:
            return tls_socket(self.host, self.port, tls, timeout=self.timeout,
                              fingerprint=ctx.fingerprint if ctx.ca is None else None,
                              on_mismatch=mismatch)
        except OSError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: OSError) -> ApiError:

        if isinstance(exc, ssl.SSLCertVerificationError):
            return ApiError(f"{self.url}: the server certificate does not verify against "
                            f"the pinned CA ({exc.verify_message}); refusing to send the "
                            "token", code="unauthorized")
        return ApiError(f"manager API at {self.url} is unreachable "
                        f"({exc}); is the manager running?", code="api_unreachable")

    def _send(self, method: str, path: str, body: Any = None,
              conn: Optional[http.client.HTTPConnection] = None) -> http.client.HTTPResponse:
        conn = conn or self.connection()
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            raise self._unreachable(exc) from None
        self._check(resp)
        return resp

    @staticmethod
    def _check(resp: http.client.HTTPResponse) -> None:
        if resp.status >= 400:
            raw = resp.read()
            try:
                detail = json.loads(raw)
            except ValueError:
                detail = {"error": raw.decode(errors="replace")}
            msg = detail.get("error") or detail.get("detail") or f"HTTP {resp.status}"
            if isinstance(msg, list):  # FastAPI validation errors
                msg = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}"
                                for e in msg)
            raise ApiError(str(msg), resp.status, str(detail.get("code", "")))

    def call(self, method: str, path: str, body: Any = None) -> Any:
        resp = self._send(method, path, body)
        return json.loads(resp.read() or b"null")

    def stream(self, method: str, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        """NDJSON objects, heartbeats included."""
        resp = self._send(method, path, body)
        while True:
            line = resp.readline()
            if not line:
                return
            yield json.loads(line)

    def exec(self, device: str, body: dict[str, Any],
             stdin: Optional[BinaryIO] = None) -> ExecStream:
        """Start an exec; ``stdin`` (a file) is streamed to the remote, then EOF."""
        return ExecStream(self, device, body, stdin)


class ExecStream:
    """One streamed exec: iterate for its events (``dpanel_proto.events`` objects as
    dicts, heartbeats dropped); :meth:`close` hangs it up (the manager then hangs up the
    remote command)."""

    def __init__(self, api: ApiClient, device: str, body: dict[str, Any],
                 stdin: Optional[BinaryIO]) -> None:
        from urllib.parse import quote

        self._api = api
        self._conn = api.connection()
        if stdin is not None and api.remote and api.scheme == "https":
            # stdin is sent from a second thread: a plain socket, TLS relayed
            self._conn = http.client.HTTPConnection(api.host, api.port, timeout=api.timeout)
            self._conn.sock = api.connect_socket()
        self._closed = False
        path = f"/v1/devices/{quote(device, safe='')}/exec"
        if stdin is None:
            self._resp = api._send("POST", path, body, self._conn)
        else:
            self._resp = self._send_streaming(path, body, stdin)
        if self._conn.sock is not None:
            self._conn.sock.settimeout(api.stream_timeout)

    def _send_streaming(self, path: str, body: dict[str, Any],
                        stdin: BinaryIO) -> http.client.HTTPResponse:
        conn = self._conn
        try:
            conn.putrequest("POST", path)
            conn.putheader("Authorization", f"Bearer {self._api._token}")
            conn.putheader("Content-Type", "application/x-ndjson")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            sock = conn.sock
            assert sock is not None
            # the first line (the request) goes now: the server answers once the command
            # runs, and the stdin that follows may wait for it
            _send_all(sock, _chunk(json.dumps(body).encode() + b"\n"), lambda: self._closed)
        except OSError as exc:
            raise self._api._unreachable(exc) from None
        threading.Thread(target=self._feed, args=(sock, stdin), daemon=True).start()
        try:
            resp = conn.getresponse()
        except OSError as exc:
            raise self._api._unreachable(exc) from None
        self._api._check(resp)
        return resp

    def _feed(self, sock: socket.socket, stdin: BinaryIO) -> None:
        fd = stdin.fileno()
        stop = lambda: self._closed  # noqa: E731
        try:
            while not self._closed:
                data = os.read(fd, 3 * 16384)
                if not data:
                    break
                line = b'{"stdin": "' + base64.b64encode(data) + b'"}\n'
                _send_all(sock, _chunk(line), stop)
            _send_all(sock, b"0\r\n\r\n", stop)
        except OSError:
            pass  # the answer (or the hang-up) tells what happened

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            while True:
                try:
                    line = self._resp.readline()
                except TimeoutError:
                    raise ApiError(f"the manager API stopped answering: no output and no "
                                   f"heartbeat for {self._api.stream_timeout:g} s",
                                   code="api_unreachable") from None
                except OSError as exc:
                    raise self._api._unreachable(exc) from None
                if not line:
                    return
                event = json.loads(line)
                if event:  # {} is a heartbeat
                    yield event
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
            except OSError:
                pass
        self._conn.close()

    def __enter__(self) -> ExecStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _send_all(sock: socket.socket, data: bytes, stopped: Any) -> None:
    """sendall that outlasts the socket's (read) timeout: a command that does not read
    its stdin for a while holds us back, which is not an error."""
    view = memoryview(data)
    while view and not stopped():
        try:
            view = view[sock.send(view):]
        except TimeoutError:
            continue

"""``dpanel proxy`` over the API's own port: stdio <-> one WebSocket to the manager.

The manager (``GET /v1/devices/{device}/proxy``, :mod:`.certapi`) checks the token and
scope, opens the tunnel and bridges binary frames to the device's tunnel port. This is
the path for an operator who can reach the API (http or https: the socket comes from
:meth:`ApiClient.connect_socket`, checked against the login context's pinned CA or
fingerprint before the token is sent) and nothing else of the manager host.
The sync client of ``websockets`` keeps start-up fast (no asyncio loop to build).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Optional
from urllib.parse import quote, urlsplit

from .client import ApiClient, ApiError

__all__ = ["is_local", "ws_proxy"]

#: stdin read size = the largest frame we send
_CHUNK = 64 * 1024


def is_local(api: ApiClient) -> bool:
    """The API is on this host's loopback: the tunnel port is reachable directly."""
    host = urlsplit(api.url).hostname or ""
    return host in ("127.0.0.1", "::1", "localhost")


def ws_proxy(api: ApiClient, device: str, stdin_fd: Optional[int] = None,
             stdout_fd: Optional[int] = None) -> int:
    """Bridge stdin/stdout to the device until either side ends; the exit status."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    base = urlsplit(api.url)
    # "ws://" even over https: TLS is already on the socket (pinned like every request)
    url = f"ws://{base.netloc}/v1/devices/{quote(device, safe='')}/proxy"
    fin = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    fout = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    sock = api.connect_socket()
    try:
        ws = connect(url, sock=sock, additional_headers={"Authorization": api.authorization()},
                     compression=None,  # SSH is encrypted: nothing to compress
                     open_timeout=60, ping_interval=30, ping_timeout=120,
                     close_timeout=5, max_size=4 * _CHUNK, user_agent_header="dpanel")
    except InvalidStatus as exc:
        sock.close()
        raise ApiError(_denial(exc), exc.response.status_code) from None
    except (OSError, WebSocketException) as exc:
        sock.close()
        raise ApiError(f"manager proxy at {api.url} is unreachable ({exc})",
                       code="api_unreachable") from None

    def upstream() -> None:
        try:
            while True:
                data = os.read(fin, _CHUNK)
                if not data:
                    break
                ws.send(data)  # blocks while the manager (or the device) is behind
        except (OSError, ConnectionClosed):
            pass
        finally:
            # ssh closed our stdin: it is done with the connection (no half-close in
            # WebSocket; the manager ends the device side)
            ws.close()

    threading.Thread(target=upstream, daemon=True).start()
    try:
        for message in ws:
            data = message.encode() if isinstance(message, str) else message
            view = memoryview(data)
            while view:
                view = view[os.write(fout, view):]
    except ConnectionClosed:
        pass
    except OSError:  # our stdout is gone: ssh exited
        ws.close()
    return 0


def _denial(exc: object) -> str:
    """The API's one-line reason from a refused upgrade's JSON body."""
    import json

    resp = getattr(exc, "response", None)
    body = getattr(resp, "body", b"") or b""
    try:
        msg = json.loads(body).get("error")
    except (ValueError, AttributeError):
        msg = None
    status = getattr(resp, "status_code", 0)
    return str(msg or f"proxy refused: HTTP {status}")

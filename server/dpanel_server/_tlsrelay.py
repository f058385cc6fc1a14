"""A plain socket whose far end is one pinned TLS connection, for two-thread clients.

Why: the streamed exec (one thread sends stdin while another reads the answer) and the
WebSocket proxy (websockets' sync client reads in a background thread) use one socket from
two threads at once. That is fine for a plain socket and not for an ``ssl.SSLSocket``:
one OpenSSL connection must not be read and written concurrently, and doing so hung a
remote ``dpanel exec -i`` now and then. Here a daemon thread runs a small event loop that
owns the TLS connection alone (asyncio's TLS works on memory buffers, one thread) and
relays it to one end of a socketpair; callers get the other end, a plain socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import ssl
import threading
from typing import Callable, Optional

__all__ = ["tls_socket"]

_CHUNK = 65536


def tls_socket(host: str, port: int, ctx: ssl.SSLContext, *, fingerprint: Optional[str],
               timeout: float, on_mismatch: Callable[[str], Exception]) -> socket.socket:
    """Connect, handshake and check ``fingerprint`` (hex SHA-256 of the server's
    certificate, when the pin is one) before returning; raises OSError (or
    ``on_mismatch(got)``) if that fails. The relay ends when either side closes."""
    mine, theirs = socket.socketpair()
    ready = threading.Event()
    failure: list[BaseException] = []

    async def relay() -> None:
        try:
            r_tls, w_tls = await asyncio.wait_for(asyncio.open_connection(
                host, port, ssl=ctx, server_hostname=host, limit=_CHUNK), timeout)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            failure.append(exc if isinstance(exc, OSError) else OSError(str(exc) or "timeout"))
            ready.set()
            return
        if fingerprint is not None:
            obj = w_tls.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else b""
            got = hashlib.sha256(der or b"").hexdigest()
            if not hmac.compare_digest(got, fingerprint):
                failure.append(on_mismatch(got))
                w_tls.close()
                ready.set()
                return
        r_loc, w_loc = await asyncio.open_connection(sock=theirs, limit=_CHUNK)
        ready.set()

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(_CHUNK):
                    w.write(data)
                    await w.drain()
            except (OSError, ssl.SSLError):
                pass

        one = asyncio.ensure_future(pump(r_loc, w_tls))
        two = asyncio.ensure_future(pump(r_tls, w_loc))
        # TLS cannot half-close: the first direction to end ends the connection
        await asyncio.wait({one, two}, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0)  # let the other direction hand over what it already read
        for w in (w_loc, w_tls):
            w.close()
        for task in (one, two):
            task.cancel()

    def run() -> None:
        try:
            asyncio.run(relay())
        except BaseException as exc:  # reported to the caller, never lost
            failure.append(exc)
            ready.set()
        finally:
            theirs.close()

    threading.Thread(target=run, name=f"tls-relay-{host}:{port}", daemon=True).start()
    ready.wait()
    if failure:
        mine.close()
        exc = failure[0]
        raise exc if isinstance(exc, Exception) else OSError(str(exc))
    return mine

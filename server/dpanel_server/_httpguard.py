"""uvicorn's HTTP/1.1 protocol with a deadline for each request, so slowloris cannot starve the API.

uvicorn has no header or request-read timeout: a connection that sends nothing, or a
byte of its request line every few seconds, is kept forever (``timeout_keep_alive`` is
reset by every byte), and ``limit_concurrency`` counts those connections and then answers
*every* request, /v1/health included, with 503. So:

* a connection must deliver each complete request (head and body) within
  ``request_timeout`` seconds of connecting or of its previous response; else it is closed;
* at most ``max_waiting`` connections may be waiting for their request at once; beyond
  that the one that has waited longest is closed, so a fresh client (which sends its
  request at once) always gets through, however many slow connections there are;
* ``limit_concurrency`` (set by the caller well above ``max_waiting``) then only bounds
  requests actually being served.

A request being served (an exec streaming for an hour) is not subject to the deadline.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["guarded_h11"]


def guarded_h11(*, request_timeout: float = 30.0, max_waiting: int = 256) -> type[H11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)``; one per server (the waiting set
    is shared by that server's connections)."""
    waiting: OrderedDict[GuardedH11, None] = OrderedDict()

    class GuardedH11(H11Protocol):
        _guard: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE and self.conn.their_state is not \
                    h11.SEND_BODY:
                self._disarm()  # the whole request is in (or the connection is ending)

        def on_response_complete(self) -> None:
            # armed before uvicorn looks at pipelined data, which may disarm it again
            if not self.transport.is_closing():
                self._arm()
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            waiting[self] = None
            self._guard = self.loop.call_later(request_timeout, self._drop)
            while len(waiting) > max_waiting:
                next(iter(waiting))._drop()

        def _disarm(self) -> None:
            waiting.pop(self, None)
            if self._guard is not None:
                self._guard.cancel()
                self._guard = None

        def _drop(self) -> None:
            self._disarm()
            if self.conn.our_state is h11.SEND_BODY:
                # answering already: a request in service, such as an exec that still
                # streams its stdin in the request body (``dpanel exec -i``)
                return
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11

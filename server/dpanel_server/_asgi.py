"""One pure-ASGI middleware that acts on each HTTP answer's status line, for the metrics
counter and the panel's security headers (BaseHTTPMiddleware would buffer exec streams)."""

from __future__ import annotations

from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["OnResponseStart"]


class OnResponseStart:
    """Calls ``hook(message)`` on every ``http.response.start``; the hook may edit the
    message's headers in place. Bodies and streams pass through untouched."""

    def __init__(self, app: ASGIApp, hook: Callable[[Message], None]) -> None:
        self.app = app
        self.hook = hook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def hooked(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.hook(message)
            await send(message)

        await self.app(scope, receive, hooked)

"""A real TunnelServer on its own event loop in a background thread, for sync tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Awaitable, Callable, TypeVar

from dpanel_server.tunnel import TunnelServer, TunnelSettings

T = TypeVar("T")


class ServerThread:
    """The public tunnel, never sharing a loop with the test (as in production it never
    shares one with an agent)."""

    def __init__(self, settings: TunnelSettings, verify: Callable[[str, str], bool]) -> None:
        self.settings = settings
        self.server = TunnelServer(settings, verify)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())

    def run(self, coro: Awaitable[T], timeout: float = 30) -> T:
        async def wrap() -> T:
            return await coro
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def go() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # pragma: no cover - surfaced to the test
                fut.set_exception(exc)
        self.loop.call_soon_threadsafe(go)
        return fut.result(30)

    @property
    def port(self) -> int:
        return self.call(lambda: self.server.port)

    def host_key_line(self) -> str:
        return self.call(self.server.host_key_line)

    def sessions(self) -> dict[str, int]:
        return self.call(self.server.sessions)

    def stats(self) -> dict[str, int]:
        return self.call(self.server.stats)

    def stop(self) -> None:
        if self.loop.is_running():
            try:
                self.run(self.server.close())
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(10)

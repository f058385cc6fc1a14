"""A byte-counting TCP proxy (asyncio, in a background thread) put between an agent and
the broker, to measure what an idle agent really sends and receives."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["CountingProxy", "Counts"]


@dataclass
class Counts:
    up_bytes: int = 0  # client -> server (what the agent sends)
    down_bytes: int = 0
    up_reads: int = 0  # one read ~ one TCP segment for small, sparse messages
    down_reads: int = 0
    connections: int = 0
    events: list[tuple[float, str, int]] = field(default_factory=list)

    def copy(self) -> Counts:
        return Counts(self.up_bytes, self.down_bytes, self.up_reads, self.down_reads,
                      self.connections, list(self.events))


class CountingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self.counts = Counts()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: Optional[asyncio.base_events.Server] = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("counting proxy did not start")
        assert self._server is not None
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        with self._lock:
            self.counts.connections += 1
        try:
            await asyncio.gather(self._pump(reader, up_w, "up"),
                                 self._pump(up_r, writer, "down"), return_exceptions=True)
        except asyncio.CancelledError:  # proxy closing: not an error worth a traceback
            writer.close()
            up_w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    direction: str) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                with self._lock:
                    c = self.counts
                    if direction == "up":
                        c.up_bytes += len(data)
                        c.up_reads += 1
                    else:
                        c.down_bytes += len(data)
                        c.down_reads += 1
                    c.events.append((time.monotonic(), direction, len(data)))
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    def snapshot(self) -> Counts:
        with self._lock:
            return self.counts.copy()

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

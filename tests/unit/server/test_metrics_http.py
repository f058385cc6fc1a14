"""The tunnel process's metrics listener: what it answers, and what it drops."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dpanel_server.db import Database
from dpanel_server.metrics import AUTH_FAILURES, serve_metrics


async def _ask(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_metrics_ready_and_bad_requests(tmp_path: Path) -> None:
    db = Database(tmp_path / "r.db")
    srv = await serve_metrics("127.0.0.1", 0, db)
    port = srv.sockets[0].getsockname()[1]
    try:
        AUTH_FAILURES.labels("tunnel").inc()
        out = await _ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200")
        assert b'dpanel_auth_failures_total{where="tunnel"}' in out
        out = await _ask(port, b"GET /ready HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200") and b'"database": true' in out
        (tmp_path / "r.db").unlink()
        out = await _ask(port, b"GET /ready HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 503") and b'"database": false' in out
        assert (await _ask(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.0 405")
        assert (await _ask(port, b"GET /x HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.0 404")
        # a head that never ends (or is huge) only loses its own connection
        assert await _ask(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000) == b""
        assert (await _ask(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.0 200")
    finally:
        srv.close()
        db.close()

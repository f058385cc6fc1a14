"""The one-port edge on loopback: ALPN routes to the right upstream with backpressure-safe
splicing, a wrong or missing ALPN is refused and logged once per source, and a client
that never finishes its TLS handshake is cut at the handshake deadline."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest

from dpanel_server.edge import ALPN_MQTT, ALPN_SSH, EdgeServer, Upstream, loopback_source
from dpanel_server.pki import ensure_broker_tls


async def _echo_server(tag: bytes) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(tag + data if tag else data)
            await w.drain()
        w.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _ctx(tls: Path, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    ensure_broker_tls(tmp_path / "tls", ["localhost", "127.0.0.1"])
    return tmp_path / "tls"


def test_alpn_routes_refusals_and_deadline(tls: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dpanel.edge")

    async def main() -> None:
        mqtt, sshd = await _echo_server(b"M"), await _echo_server(b"")
        edge = EdgeServer("127.0.0.1", 0, cert_file=str(tls / "server.crt"),
                          key_file=str(tls / "server.key"), handshake_timeout=1.0,
                          routes={ALPN_MQTT: Upstream("127.0.0.1",
                                                      mqtt.sockets[0].getsockname()[1]),
                                  ALPN_SSH: Upstream("127.0.0.1",
                                                     sshd.sockets[0].getsockname()[1],
                                                     spread_source=True)})
        await edge.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", edge.port,
                                                 ssl=_ctx(tls, [ALPN_MQTT]),
                                                 server_hostname="127.0.0.1")
            w.write(b"ping")
            assert await r.readexactly(5) == b"Mping"
            w.close()
            # SSH: a bulk transfer both ways through the splice, in order
            r, w = await asyncio.open_connection("127.0.0.1", edge.port,
                                                 ssl=_ctx(tls, [ALPN_SSH]),
                                                 server_hostname="127.0.0.1")
            blob = bytes(range(256)) * 8192  # 2 MiB

            async def send() -> None:
                w.write(blob)
                await w.drain()
            sender = asyncio.ensure_future(send())
            got = await asyncio.wait_for(r.readexactly(len(blob)), 30)
            await sender
            assert got == blob
            w.close()
            # wrong and missing ALPN: refused, connection closed, one log line per source
            for alpn in (["h2"], ["bogus"], []):
                try:
                    r, w = await asyncio.open_connection(
                        "127.0.0.1", edge.port, ssl=_ctx(tls, alpn),
                        server_hostname="127.0.0.1")
                except (ssl.SSLError, ConnectionError):
                    continue
                assert await asyncio.wait_for(r.read(10), 5) == b""
                w.close()
            # a client that never sends a ClientHello is cut at the handshake deadline
            r, w = await asyncio.open_connection("127.0.0.1", edge.port)
            assert await asyncio.wait_for(r.read(10), 10) == b""
            w.close()
        finally:
            await edge.close()
            mqtt.close()
            sshd.close()

    asyncio.run(main())
    refusals = [r for r in caplog.records if "ALPN" in r.getMessage() and "refused" in
                r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    assert any("timed out" in r.getMessage() for r in caplog.records)


def test_loopback_source_spreads_and_is_stable() -> None:
    a, b = loopback_source("203.0.113.7"), loopback_source("203.0.113.8")
    assert a != b and a == loopback_source("203.0.113.7")
    assert a.startswith("127.") and a != "127.0.0.1"


def test_stack_edge_listen_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dpanel_server.stack import prepare_stack

    cfg = prepare_stack(tmp_path / "s", edge_listen="127.0.0.1:8443")
    assert cfg.edge.listen == "127.0.0.1:8443" and cfg.edge.public_address == "127.0.0.1:8443"
    assert cfg.edge.cert_file and Path(cfg.edge.cert_file).exists()
    assert cfg.broker.ca_file and cfg.broker.url.startswith("mqtt://")  # broker stays plain
    cfg = prepare_stack(tmp_path / "s", advertise="edge.example")
    assert cfg.edge.public_address == "edge.example:8443"  # tokens name the advertised host
    cfg = prepare_stack(tmp_path / "s", edge_listen="off")
    assert cfg.edge.listen is None and cfg.broker.ca_file is None
    assert "edge_listen" in capsys.readouterr().out

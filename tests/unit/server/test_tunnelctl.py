"""Unit tests of the tunnel control channel: the real socket server, a stand-in tunnel."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any, cast

import pytest

from dpanel_server.tunnel import TunnelServer
from dpanel_server.tunnelctl import TunnelControl, TunnelControlError, serve_control


class FakeTunnel:
    def __init__(self) -> None:
        self.kicked: list[str] = []

    def kick(self, device: str) -> bool:
        self.kicked.append(device)
        return device == "dev-a"

    def sessions(self) -> dict[str, int]:
        return {"dev-a": 20001}

    def stats(self) -> dict[str, int]:
        return {"connections": 1}


async def with_server(path: Path, fn: Any) -> Any:
    tunnel = FakeTunnel()
    server = await serve_control(cast(TunnelServer, tunnel), path)
    try:
        return tunnel, await asyncio.to_thread(fn)
    finally:
        server.close()
        await server.wait_closed()


def test_round_trips_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.sock"
    ctl = TunnelControl(path)

    def calls() -> tuple[Any, ...]:
        return (ctl.kick("dev-a"), ctl.kick("dev-b"), ctl.sessions(), ctl.stats(),
                stat.S_IMODE(os.stat(path).st_mode))

    tunnel, got = asyncio.run(with_server(path, calls))
    assert got == (True, False, {"dev-a": 20001}, {"reachable": 1, "connections": 1}, 0o600)
    assert tunnel.kicked == ["dev-a", "dev-b"]


def test_a_deep_state_directory_still_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "tunnel.sock"
    _, got = asyncio.run(with_server(path, TunnelControl(path).sessions))
    assert got == {"dev-a": 20001}


def test_bad_requests_get_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.sock"

    def raw() -> list[dict[str, Any]]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            f = s.makefile("rwb")
            out = []
            for line in (b"not json\n", b'{"op": "rm -rf"}\n', b'{"op": "kick"}\n',
                         b'{"op": "kick", "device": "../x"}\n'):
                f.write(line)
                f.flush()
                out.append(json.loads(f.readline()))
            return out

    tunnel, answers = asyncio.run(with_server(path, raw))
    assert all(a["ok"] is False and a["error"] for a in answers)
    assert "unknown operation" in answers[1]["error"]
    assert tunnel.kicked == []


def test_unreachable_tunnel(tmp_path: Path) -> None:
    ctl = TunnelControl(tmp_path / "nothing.sock", timeout=0.5)
    assert ctl.kick("dev-a") is False  # logged; the tunnel's own checks catch it
    assert ctl.stats() == {"reachable": 0}
    with pytest.raises(TunnelControlError, match="cannot reach the tunnel server"):
        ctl.sessions()

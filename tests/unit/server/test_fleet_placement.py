"""Placement over tunnel servers: least-loaded, sticky while a tunnel lives, and a refusal
that names every server and why when none is up; heartbeats need the server's secret."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from dpanel_server.errors import DPanelError
from dpanel_server.fleet import Fleet, ServerState, TunnelServerDown
from dpanel_server.registry import Registry


class _Conn:
    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _fleet(url: str) -> Fleet:
    return Fleet(Registry(url), asyncssh.generate_private_key("ssh-ed25519"))


def _up(fleet: Fleet, name: str, load: int, capacity: int = 100) -> Any:
    fleet.add(name)
    fleet.servers[name] = st = ServerState(name)
    st.state, st.conn, st.load, st.capacity, st.public = "up", _Conn(), load, capacity, \
        f"{name}:2220"
    return st


def test_least_loaded_then_sticky(tmp_path: Path) -> None:
    f = _fleet(str(tmp_path / "r.db"))
    a, b = _up(f, "ts-a", 10), _up(f, "ts-b", 0)
    assert f.place("d1") is b
    f.placed("d1", b, 31001)
    # b's placement counts before b's next heartbeat: the next device goes to the emptier
    assert f.place("d1") is b                      # sticky
    b.pending = 20
    assert f.place("d2") is a
    # a device whose tunnel lives on a (its heartbeat says) stays there
    a.devices["d3"] = 31002
    assert f.place("d3") is a


def test_a_failed_server_is_skipped_and_named(tmp_path: Path) -> None:
    f = _fleet(str(tmp_path / "r.db"))
    a, b = _up(f, "ts-a", 0), _up(f, "ts-b", 50)
    f.placed("d1", a, 31001)
    a.devices["d1"] = 31001
    f._down(a, "the manager's SSH connection to it was lost")
    assert f.place("d1") is b
    f._down(b, "no heartbeat since 10:00:00Z")
    with pytest.raises(TunnelServerDown) as err:
        f.place("d1")
    msg = str(err.value)
    assert "ts-a" in msg and "connection to it was lost" in msg and "ts-b" in msg
    assert [s["state"] for s in f.list()] == ["down", "down"]


def test_heartbeat_needs_the_secret_and_pins_the_host_key(registry_url: str) -> None:
    """On each engine (pgfix: a real PostgreSQL)."""
    f = _fleet(registry_url)
    secret = f.add("ts-a")
    key = " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key()
                   .decode().split()[:2])
    body = {"public": "h:2220", "host_key": key, "bind_host": "127.0.0.1", "capacity": 10,
            "load": 0, "devices": {}}
    for name, sec in (("ts-a", "wrong"), ("ts-b", secret), ("../x", secret)):
        with pytest.raises(DPanelError, match="unknown tunnel server or wrong secret"):
            f.heartbeat(name, sec, body)
    assert f.heartbeat("ts-a", secret, body)["manager_key"] == f.manager_key_line
    other = " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key()
                     .decode().split()[:2])
    with pytest.raises(DPanelError, match="host key changed"):
        f.heartbeat("ts-a", secret, dict(body, host_key=other))
    with pytest.raises(DPanelError, match="exists"):
        f.add("ts-a")
    f._refresh_rows(f._rows())
    st = f.servers["ts-a"]
    assert (st.public, st.host_key, st.capacity) == ("h:2220", key, 10)
    f.remove("ts-a")
    f._refresh_rows(f._rows())
    assert not f.active()


def test_a_server_a_device_cannot_reach_is_skipped_for_that_device_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial partition: ts-a is up for the manager, but d1's site cannot reach it."""
    import dpanel_server.fleet as fleet_mod

    f = _fleet(str(tmp_path / "r.db"))
    a, b = _up(f, "ts-a", 0), _up(f, "ts-b", 50)
    assert f.tries() == 2
    assert f.place("d1") is a
    f.unreachable("d1", a, "cannot reach tunnel server ts-a:2220: no TCP answer\n\x1b[2J")
    # sticky placement and the stale heartbeat no longer bring it back to a
    a.devices["d1"] = 31001
    assert f.place("d1") is b
    assert f.place("d2") is a                      # other devices still use ts-a
    shown = {s["name"]: s["unreachable_from"] for s in f.list()}
    assert list(shown["ts-a"]) == ["d1"] and "\x1b" not in shown["ts-a"]["d1"]
    assert shown["ts-b"] == {}
    f.check_left("d1")                             # ts-b is left: no error
    f.unreachable("d1", b, "cannot reach tunnel server ts-b:2220 (Connection refused)")
    with pytest.raises(TunnelServerDown) as err:
        f.place("d1")
    msg = str(err.value)
    assert "d1 cannot reach any tunnel server" in msg
    assert "ts-a (ts-a:2220): up, but not reachable" in msg and "no TCP answer" in msg
    assert "ts-b (ts-b:2220): up, but not reachable" in msg and "Connection refused" in msg
    # reaching it after all clears the mark; the marks also run out
    f.placed("d1", b, 31002)
    assert f.place("d1") is b
    monkeypatch.setattr(fleet_mod, "UNREACHABLE_FOR", -1.0)
    f.unreachable("d1", a, "again")
    b.devices.pop("d1", None)
    f._placed.pop("d1", None)
    assert f.place("d1") is a
    # a revoke forgets them
    f.unreachable("d3", a, "x")
    a.conn.closed = b.conn.closed = True  # (no control channel to push the kick over)
    asyncio.run(f.kick("d3"))
    assert "d3" not in f._unreach

"""Pre-auth floods against the real tunnel: no number of unauthenticated connections, from
one address or many, keeps an authenticated device out, and no flood floods the log.

Flooders are a separate process (``tests/flood.py``) binding 127.0.0.N source addresses
(loopback accepts all of 127/8); the device dials from 127.0.0.1 with a real asyncssh
client, retrying as the agent does, and must get its forward while the flood goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import asyncssh
import pytest
from test_tunnel_server import SECRETS, EchoServer, pool_range

import tunnelfix
from dpanel_server.tunnel import MAX_AUTH_FAILURES, TunnelSettings
from support import wait_for

FLOOD = Path(__file__).resolve().parents[1] / "flood.py"
LOGGER = "dpanel.tunnel"


class Server(tunnelfix.ServerThread):
    def __init__(self, settings: TunnelSettings) -> None:
        self.verify_calls: list[str] = []
        super().__init__(settings, self._verify)

    def _verify(self, device: str, secret: str) -> bool:
        self.verify_calls.append(device)
        return SECRETS.get(device) == secret


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def make(**kw: Any) -> Server:
        lo, hi = pool_range(16)
        values: dict[str, Any] = {
            "host_key_path": tmp_path / "keys" / "tunnel_host_key", "listen_host": "127.0.0.1",
            "listen_port": 0, "port_min": lo, "port_max": hi, "keepalive_interval": 5,
        }
        values.update(kw)
        srv = Server(TunnelSettings(**values))
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    srv = EchoServer()
    yield srv
    srv.sock.close()


class Flood:
    def __init__(self, port: int, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(FLOOD), str(port), *args],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"flooding"

    def stop(self) -> dict[str, int]:
        """Counters of a finished flood (waits for its --duration)."""
        out, _ = self.proc.communicate(timeout=120)
        return dict(json.loads(out.splitlines()[-1]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def device_gets_forward(srv: Server, echo: EchoServer, source: str = "127.0.0.1",
                        deadline: float = 25.0) -> tuple[float, int]:
    """Dial as the agent does (retry after a failure) until the forward is bound; returns
    (seconds it took, attempts). Raises if the device never got in within ``deadline``."""
    async def attempt() -> None:
        async with asyncssh.connect(
                "127.0.0.1", srv.port, local_addr=(source, 0), username="dev-a",
                password=SECRETS["dev-a"], known_hosts=None, client_keys=None,
                agent_path=None, preferred_auth="password", connect_timeout=15) as conn:
            await conn.forward_remote_port("", 0, "127.0.0.1", echo.port)

    async def loop() -> tuple[float, int]:
        start = time.monotonic()
        attempts = 0
        last: Optional[BaseException] = None
        while time.monotonic() - start < deadline:
            attempts += 1
            try:
                await attempt()
                return time.monotonic() - start, attempts
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.5)
        raise AssertionError(f"device locked out for {deadline} s, {attempts} attempts; "
                             f"last error: {last!r}")

    return asyncio.run(loop())


@pytest.mark.parametrize("penalties", [True, False], ids=["defaults", "no-noauth-penalty"])
def test_banner_flood_from_many_sources_does_not_lock_out_a_device(
        make_server: Callable[..., Server], echo: EchoServer, penalties: bool) -> None:
    # 30 addresses, each holding up to 20 connections that send a banner and then nothing:
    # 600 wanted slots against a cap of 100. Without the no-auth penalty (an attacker whose
    # addresses are fresh each time) the cap is full and only eviction lets the device in.
    srv = make_server(max_unauthenticated=100, **({} if penalties else {"penalty_noauth": 0}))
    flood = Flood(srv.port, "--sources", "2-31", "--hold", "20", "--rate", "50",
                  "--duration", "40")
    try:
        wait_for(lambda: srv.stats()["unauthenticated"] >= (20 if penalties else 95),
                 "the flood fills the cap")
        took, attempts = device_gets_forward(srv, echo)
        print(f"\ndevice got its forward after {took:.2f} s ({attempts} attempt(s)) under "
              f"{srv.stats()['unauthenticated']} pending connections from 30 sources")
        assert srv.stats()["unauthenticated"] <= 100
    finally:
        flood.kill()


def test_flood_from_one_source_gets_a_few_slots_and_the_device_gets_in(
        make_server: Callable[..., Server], echo: EchoServer) -> None:
    srv = make_server()
    flood = Flood(srv.port, "--sources", "2-2", "--hold", "500", "--rate", "300",
                  "--duration", "40")
    try:
        wait_for(lambda: srv.stats()["unauthenticated"] >= 5, "the flood started")
        took, attempts = device_gets_forward(srv, echo)
        pending = srv.stats()["unauthenticated"]
        print(f"\ndevice got its forward after {took:.2f} s ({attempts} attempt(s)); the "
              f"flooding address holds {pending} slots")
        # per-source MaxStartups: one address never holds more than `full` (20) slots
        assert pending <= 20
    finally:
        flood.kill()


def test_idle_connections_are_dropped_after_the_handshake_timeout(
        make_server: Callable[..., Server]) -> None:
    srv = make_server(handshake_timeout=1, login_timeout=60)
    flood = Flood(srv.port, "--sources", "2-3", "--mode", "idle", "--hold", "3",
                  "--rate", "20", "--duration", "4")
    counts = flood.stop()
    # each of the 6 connections held was dropped by the server after ~1 s, not 60 s
    assert counts["closed_by_server"] >= 6, counts
    wait_for(lambda: srv.stats()["unauthenticated"] == 0, "idle connections dropped")


def test_garbage_flood_gets_the_source_penalised_and_others_still_get_in(
        make_server: Callable[..., Server], echo: EchoServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    srv = make_server()
    flood = Flood(srv.port, "--sources", "5-5", "--mode", "garbage", "--rate", "200",
                  "--duration", "5")
    counts = flood.stop()
    assert srv.stats()["penalised_sources"] == 1
    device_gets_forward(srv, echo)  # another address is not affected
    # the flood's lines are bounded (burst of 10 + 0.5/s) and say what they left out
    srv.call(srv.server._rlog.flush)
    flooder = [r for r in caplog.records if "127.0.0.5" in r.getMessage()]
    assert counts["opened"] > 100, counts
    assert len(flooder) <= 20, len(flooder)
    assert any("suppressed" in r.getMessage() and r.getMessage().endswith("127.0.0.5")
               for r in flooder)


def test_repeated_auth_failures_cost_a_bounded_number_of_logins(
        make_server: Callable[..., Server], echo: EchoServer) -> None:
    """B5: a revoked agent redialling as fast as it can from one address."""
    srv = make_server()

    async def hammer(seconds: float) -> dict[str, int]:
        out = {"permission_denied": 0, "refused_before_auth": 0}
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            try:
                await asyncssh.connect(
                    "127.0.0.1", srv.port, local_addr=("127.0.0.6", 0), username="dev-b",
                    password="revoked-" + "r" * 40, known_hosts=None, client_keys=None,
                    agent_path=None, preferred_auth="password", connect_timeout=5)
            except asyncssh.PermissionDenied:
                out["permission_denied"] += 1
            except (OSError, asyncssh.Error):
                out["refused_before_auth"] += 1
        return out

    got = asyncio.run(hammer(6))
    tried = srv.verify_calls.count("dev-b")
    print(f"\n6 s of redialling with a wrong secret: {got}, {tried} secret checks")
    # penalty_min / penalty_authfail = 3 failed logins, then the address is refused for
    # 15 s before any key exchange; MAX_AUTH_FAILURES bounds the checks per login
    assert got["permission_denied"] <= 4
    assert tried <= 4 * MAX_AUTH_FAILURES
    assert got["refused_before_auth"] > got["permission_denied"]
    device_gets_forward(srv, echo)  # the device at another address is unaffected


def test_an_authenticated_devices_refusal_flood_is_rate_limited_in_the_log(
        make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    srv = make_server()

    async def scenario() -> None:
        async with asyncssh.connect(
                "127.0.0.1", srv.port, username="dev-a", password=SECRETS["dev-a"],
                known_hosts=None, client_keys=None, agent_path=None,
                preferred_auth="password") as conn:
            for _ in range(300):
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection("127.0.0.1", 9)

    asyncio.run(scenario())
    srv.call(srv.server._rlog.flush)
    lines = [r.getMessage() for r in caplog.records if "dev-a" in r.getMessage()]
    assert len(lines) <= 20, len(lines)
    assert any(m.startswith("suppressed ") and m.endswith("from device dev-a") for m in lines)

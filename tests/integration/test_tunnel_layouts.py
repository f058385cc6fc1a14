"""Revocation, reported ports and sticky ports in both process layouts.

The stack runs tunnel and manager in one process; the appliance (systemd units) runs
``dpanel tunnel run`` and ``dpanel manager run`` as two processes sharing the state
directory, which is the layout where a revoked device kept its session and a device's
reported port was believed. Both are driven here as real processes with a real broker.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import asyncssh
import pytest
from test_attacks import Mqtt

from dpanel_proto import wire
from dpanel_proto.token import parse_token
from dpanel_server.config import load_config
from dpanel_server.registry import Registry
from dpanel_server.stack import prepare_stack, start_mosquitto
from dpanel_server.tunnelctl import TunnelControl, control_path
from stackfix import BIN, Stack
from support import free_port, stop_proc, wait_for


@dataclass
class Appliance(Stack):
    """Broker, ``dpanel tunnel run`` and ``dpanel manager run`` as separate processes, as
    the appliance's units run them (``proc`` is the manager)."""

    tunnel: Optional[subprocess.Popen[bytes]] = None
    broker: Optional[subprocess.Popen[bytes]] = None
    #: RLIMIT_NOFILE of the manager (None: inherited), to make fd exhaustion reachable
    manager_nofile: Optional[int] = None

    def start(self) -> None:
        cfg = prepare_stack(self.dir, broker_port=self.broker_port,
                            tunnel_port=self.tunnel_port, api_port=self.api_port,
                            port_range=self.port_range, registry=self.registry)
        if self.broker is None:
            self.broker = start_mosquitto(cfg)
        self.start_tunnel()
        self.proc = self._daemon("manager")
        wait_for(lambda: self.cli("device", "list").returncode == 0, "manager API up", 60)

    def _daemon(self, what: str) -> subprocess.Popen[bytes]:
        log = (self.dir.parent / f"{self.dir.name}-{what}.log").open("ab")
        nofile = self.manager_nofile if what == "manager" else None

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        return subprocess.Popen([str(BIN / "dpanel"), "--config", str(self.config), what,
                                 "run", "--log-level", "info"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=limit)

    def start_tunnel(self) -> None:
        self.tunnel = self._daemon("tunnel")
        wait_for(lambda: TunnelControl(control_path(self.dir)).stats().get("reachable"),
                 "tunnel control socket up", 60)

    def log(self) -> str:
        return "".join((self.dir.parent / f"{self.dir.name}-{w}.log").read_text(
            errors="replace") for w in ("tunnel", "manager")
            if (self.dir.parent / f"{self.dir.name}-{w}.log").exists())

    def close(self) -> None:
        super().close()
        for p in (self.tunnel, self.broker):
            if p is not None:
                stop_proc(p)


@pytest.fixture(params=["stack", "appliance"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    cls = Stack if request.param == "stack" else Appliance
    s = cls(dir=tmp_path / "st", broker_port=free_port(), tunnel_port=free_port(),
            api_port=free_port())
    s.start()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    s = Appliance(dir=tmp_path / "st", broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port())
    s.start()
    try:
        yield s
    finally:
        s.close()


async def login(stack: Stack, device: str, secret: str) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", stack.tunnel_port, username=device,
                                  password=secret, known_hosts=None, client_keys=None,
                                  agent_path=None, preferred_auth="password")


def test_revoke_drops_a_logged_in_device_that_has_no_forward_yet(layout: Stack) -> None:
    secret = parse_token(layout.enrol("dev-r")).secret
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)

    async def scenario() -> None:
        conn = await login(layout, "dev-r", secret)  # logged in, no forward yet
        await asyncio.to_thread(layout.cli_ok, "device", "revoke", "dev-r")
        # pushed: the session ends at once (before: it stayed for 90 s and more)
        await asyncio.wait_for(conn.wait_closed(), 10)
        with pytest.raises((asyncssh.Error, asyncssh.ChannelListenError, OSError)):
            await (await login(layout, "dev-r", secret)).forward_remote_port(
                "", 0, "127.0.0.1", sink.getsockname()[1])

    try:
        asyncio.run(scenario())
    finally:
        sink.close()
    assert "dev-r" not in layout.cli_ok("tunnel", "list")


def test_forward_is_refused_when_the_registry_says_revoked_even_without_a_push(
        appliance: Appliance) -> None:
    """A revoke the tunnel was not told about (tunnel restarted, socket unreachable): the
    registry check at the forward request catches it, not a poll a second later."""
    secret = parse_token(appliance.enrol("dev-q")).secret
    assert appliance.tunnel is not None
    registry = Registry(load_config(appliance.config).registry_url)

    async def scenario() -> None:
        conn = await login(appliance, "dev-q", secret)
        # freeze the revision poll's view: revoke straight in the registry while the
        # tunnel is stopped, then let it go on and ask for a forward at once
        appliance.tunnel.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            registry.revoke("dev-q")
        finally:
            appliance.tunnel.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        with pytest.raises((asyncssh.Error, asyncssh.ChannelListenError, OSError)):
            await conn.forward_remote_port("", 0, "127.0.0.1", 9)
        await asyncio.wait_for(conn.wait_closed(), 10)

    try:
        asyncio.run(scenario())
    finally:
        registry.close()
    assert "dev-q" not in TunnelControl(control_path(appliance.dir)).sessions()


def test_a_device_reporting_another_devices_port_is_refused(
        layout: Stack, tmp_path: Path) -> None:
    layout.start_agent(layout.enrol("dev-b"), tmp_path / "dev-b")
    layout.wait_online("dev-b")
    b_port = int(layout.cli_ok("tunnel", "open", "dev-b").rsplit(":", 1)[1])
    tok_a = parse_token(layout.enrol("dev-a"))
    key_a = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    evil = Mqtt(layout.broker_port, "dev-a", tok_a.secret)

    def on_message(_c: object, _u: object, m: object) -> None:
        req = wire.decode(m.payload)  # type: ignore[attr-defined]
        evil.c.publish(wire.resp_topic("dev-a"), wire.encode(wire.Response(
            device="dev-a", id=req.id, code=wire.ErrorCode.OK, port=b_port)), qos=1)
        # and announce it in its status too, as a tunnel list would show it
        evil.c.publish(wire.status_topic("dev-a"), wire.encode(wire.Status(
            device="dev-a", state="online", host_key=key_a, port=b_port)), qos=1,
            retain=True)

    evil.c.on_message = on_message
    evil.c.subscribe(wire.req_topic("dev-a"), qos=1)
    evil.pub(wire.status_topic("dev-a"), wire.encode(wire.Status(
        device="dev-a", state="online", host_key=key_a)), retain=True)
    try:
        layout.wait_online("dev-a")
        out = layout.cli("tunnel", "open", "dev-a")
        assert out.returncode != 0, out
        assert b"refused" in out.stderr and str(b_port).encode() in out.stderr
        listed = json.loads(layout.cli_ok("tunnel", "list", "--json"))
        assert listed == {"dev-b": b_port}
        assert layout.device("dev-a")["port"] is None
        assert layout.device("dev-b")["port"] == b_port
    finally:
        evil.close()


def test_sticky_port_survives_a_sigkilled_tunnel(appliance: Appliance) -> None:
    secret = parse_token(appliance.enrol("dev-s")).secret
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)

    async def take_port() -> int:
        async with await login(appliance, "dev-s", secret) as conn:
            listener = await conn.forward_remote_port("", 0, "127.0.0.1",
                                                      sink.getsockname()[1])
            return listener.get_port()

    try:
        port = asyncio.run(take_port())
        sticky = appliance.dir / "tunnel-ports.json"
        # persisted within sticky_save_delay (0.5 s) of the allocation, batched
        wait_for(lambda: sticky.exists() and json.loads(sticky.read_text()).get("dev-s"),
                 "port persisted", 10)
        assert sticky.stat().st_mode & 0o777 == 0o600
        assert appliance.tunnel is not None
        appliance.tunnel.kill()  # SIGKILL: no clean shutdown, no save on close
        appliance.tunnel.wait()
        appliance.start_tunnel()
        assert asyncio.run(take_port()) == port
    finally:
        sink.close()

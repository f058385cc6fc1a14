"""Harness for the agent's integration tests: a real Mosquitto (tests/conftest.py), the
real public tunnel server in its own thread and loop, a manager-side MQTT client that
signs requests with a real manager key, and agent processes. A pytest plugin (loaded by
tests/conftest.py's ``pytest_plugins``), so its fixtures reach every test that asks."""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional, TypeVar

import asyncssh
import paho.mqtt.client as mqtt
import pytest

from conftest import Mosquitto
from dpanel_agent.agent import Agent
from dpanel_agent.config import AgentConfig
from dpanel_proto import wire
from dpanel_proto.signing import sign_request
from dpanel_proto.token import DeviceToken
from dpanel_server.tunnel import TunnelSettings
from support import free_port
from tunnelfix import ServerThread

T = TypeVar("T")

#: ``python -m dpanel_agent`` (what the PyInstaller freeze runs) with this interpreter, so
#: the same tests also run under the Python 3.9 the device build uses.
AGENT = [sys.executable, "-m", "dpanel_agent"]


# --------------------------------------------------------------------------- tunnel server


class TunnelThread(ServerThread):
    """The real public tunnel for agent tests: a small random pool, short keepalives."""

    def __init__(self, key_path: Path, secrets_: dict[str, str], listen_port: int = 0) -> None:
        lo = random.randrange(20000, 31000)
        self._secrets = secrets_
        # a fixed port (not 0), so that a restarted server is found at the same address
        super().__init__(TunnelSettings(host_key_path=key_path, listen_host="127.0.0.1",
                                        listen_port=listen_port or free_port(),
                                        port_min=lo, port_max=lo + 63,
                                        keepalive_interval=5),
                         lambda d, s: self._secrets.get(d) == s)


# --------------------------------------------------------------------------- manager side


class ManagerBus:
    """The manager's side of MQTT: watches status/resp of all devices and publishes
    signed requests. Messages are handed to the test's asyncio loop."""

    def __init__(self, broker: Mosquitto, key: asyncssh.SSHKey,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.loop = loop
        self.status: dict[str, wire.Status] = {}
        self.status_log: list[wire.Status] = []
        self.responses: dict[str, wire.Response] = {}
        self._changed = asyncio.Event()
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=broker.manager_user)
        self.client.username_pw_set(broker.manager_user, broker.manager_password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_connect(self, c: mqtt.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        c.subscribe(f"{wire.TOPIC_ROOT}/+/status", qos=1)
        c.subscribe(f"{wire.TOPIC_ROOT}/+/resp", qos=1)
        self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        self.loop.call_soon_threadsafe(self._record, msg.topic, payload)

    def _record(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        m = wire.decode(payload)
        if isinstance(m, wire.Status):
            self.status[m.device] = m
            self.status_log.append(m)
        elif isinstance(m, wire.Response):
            self.responses[m.id] = m
        self._changed.set()

    async def wait(self, cond: Callable[[], Optional[T]], what: str,
                   timeout: float = 30) -> T:
        """Wait until ``cond()`` is truthy; the timeout only bounds a hang."""
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    async def wait_status(self, device: str, pred: Callable[[wire.Status], bool],
                          what: str, timeout: float = 30) -> wire.Status:
        def check() -> Optional[wire.Status]:
            s = self.status.get(device)
            return s if s is not None and pred(s) else None
        return await self.wait(check, f"{device} status: {what}", timeout)

    def publish_raw(self, device: str, payload: bytes) -> None:
        self.client.publish(wire.req_topic(device), payload, qos=1).wait_for_publish(5)

    def make_open(self, device: str, **kw: Any) -> wire.OpenRequest:
        now = time.time()
        base: dict[str, Any] = {"device": device, "id": secrets.token_hex(16),
                                "issued_at": now, "expires_at": now + 60}
        base.update(kw)
        return wire.OpenRequest(**base)

    def make_close(self, device: str, **kw: Any) -> wire.CloseRequest:
        now = time.time()
        base: dict[str, Any] = {"device": device, "id": secrets.token_hex(16),
                                "issued_at": now, "expires_at": now + 60}
        base.update(kw)
        return wire.CloseRequest(**base)

    async def send(self, req: wire.Request, *, to: Optional[str] = None, sign: bool = True,
                   timeout: float = 40) -> wire.Response:
        signed = sign_request(req, self.key) if sign else req
        self.publish_raw(to or req.device, wire.encode(signed))
        return await self.wait(lambda: self.responses.get(req.id), f"answer to {req.id}",
                               timeout)

    async def open(self, device: str, **kw: Any) -> wire.Response:
        return await self.send(self.make_open(device, **kw))

    async def close(self, device: str) -> wire.Response:
        return await self.send(self.make_close(device))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --------------------------------------------------------------------------- devices


@dataclass
class Device:
    name: str
    secret: str
    token: DeviceToken
    state_dir: Path
    agents: list[Agent] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def config(self, **kw: Any) -> AgentConfig:
        base: dict[str, Any] = {"state_dir": self.state_dir, "token": self.token,
                                "reconnect_min": 0.2, "reconnect_max": 2.0,
                                "request_clock_skew": 5, "log_level": "debug"}
        base.update(kw)
        return AgentConfig(**base)

    async def start(self, **kw: Any) -> Agent:
        agent = Agent(self.config(**kw))
        self.agents.append(agent)
        self.tasks.append(asyncio.ensure_future(agent.run()))
        return agent

    async def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        for task in self.tasks:
            try:
                await asyncio.wait_for(task, 20)
            except Exception:  # pragma: no cover - surfaced by the test itself
                task.cancel()
        self.agents.clear()
        self.tasks.clear()


@dataclass
class World:
    broker: Mosquitto
    tunnel: TunnelThread
    bus: ManagerBus
    manager_key: asyncssh.SSHKey
    tmp: Path
    secrets: dict[str, str]
    devices: list[Device] = field(default_factory=list)

    def device(self, name: str = "dev-1", **token_kw: Any) -> Device:
        secret = secrets.token_urlsafe(32)
        self.secrets[name] = secret
        self.broker.add_user(name, secret)
        token = DeviceToken(
            device=name, secret=secret, broker=self.broker.url,
            tunnel=f"127.0.0.1:{self.tunnel.port}",
            tunnel_host_key=self.tunnel.host_key_line(),
            manager_key=self.manager_key.export_public_key().decode().strip(),
        )
        token = replace(token, **token_kw) if token_kw else token
        dev = Device(name, secret, token, self.tmp / name)
        self.devices.append(dev)
        return dev

    async def connect_ssh(self, port: int, device: Device,
                          key: Optional[asyncssh.SSHKey] = None) -> asyncssh.SSHClientConnection:
        """Connect like the manager does: its key, the device's announced host key pinned."""
        status = self.bus.status[device.name]
        return await asyncssh.connect(
            "127.0.0.1", port, username="dpanel", client_keys=[key or self.manager_key],
            known_hosts=([asyncssh.import_public_key(status.host_key)], [], []),
            agent_path=None, config=None, connect_timeout=15,
        )


@pytest.fixture
def manager_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture
async def world(mosquitto: Mosquitto, tmp_path: Path,
                manager_key: asyncssh.SSHKey) -> AsyncIterator[World]:
    secrets_: dict[str, str] = {}
    tunnel = TunnelThread(tmp_path / "tunnel_host_key", secrets_)
    bus = ManagerBus(mosquitto, manager_key, asyncio.get_running_loop())
    w = World(mosquitto, tunnel, bus, manager_key, tmp_path, secrets_)
    try:
        await asyncio.get_running_loop().run_in_executor(None, bus.connected.wait, 10)
        yield w
    finally:
        for dev in w.devices:
            await dev.stop()
        bus.stop()
        tunnel.stop()


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP echo service on the device (stands in for a web UI on :80)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield sock.getsockname()[1]
    sock.close()


class Proc:
    """A running agent process; killed at teardown whatever happens."""

    def __init__(self, argv: list[str], log: Path, *, stdin: Optional[str] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.log = log
        self.p = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                  stdin=subprocess.PIPE if stdin is not None else
                                  subprocess.DEVNULL, env=env)
        if stdin is not None:
            assert self.p.stdin is not None
            self.p.stdin.write(stdin.encode())
            self.p.stdin.close()

    def cmdline(self) -> str:
        return Path(f"/proc/{self.p.pid}/cmdline").read_text()

    def rss_kb(self) -> int:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{self.p.pid}/status").read_text())
        assert m
        return int(m.group(1))

    async def wait(self, timeout: float = 30) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.p.wait, timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
async def procs() -> AsyncIterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()

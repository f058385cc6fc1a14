"""Thousands of simulated agents in one process, for the scale section.

Each simulated agent is a minimal MQTT 3.1.1 client (asyncio Protocol, no thread, a few KB
each) with its own device credentials: it connects with a retained offline last will,
subscribes to its request topic, publishes a retained online status, answers PINGs, and
answers open/close requests the way the real agent does, by dialling the tunnel with
asyncssh and holding a reverse forward (``fwd_clients.dial_forward``), and pings by
publishing its status again. Request signatures are not checked: the simulator's CPU
is not what is measured.

``python -m tests.bench.simagents SPEC.json`` reads JSON lines on stdin: ``{"cmd":
"status"}`` answers counters. Closing stdin disconnects everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import time
from typing import Any, Optional

import asyncssh

from dpanel_proto import wire
from dpanel_proto.mqtt import STABLE_AFTER
from dpanel_proto.util import Backoff

from ._util import rss_kb
from .fwd_clients import dial_forward

__all__ = ["main"]

_PINGREQ = b"\xc0\x00"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, user: str, password: str, will_topic: str,
                   will: bytes, keepalive: int) -> bytes:
    # flags: username, password, will retain, will QoS 1, will, clean session
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02
    body = (_str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _str(client_id)
            + _str(will_topic) + _str(will) + _str(user) + _str(password))
    return _packet(0x10, body)


def publish_packet(topic: str, payload: bytes, pid: int, retain: bool = False) -> bytes:
    return _packet(0x32 | int(retain), _str(topic) + struct.pack("!H", pid) + payload)


def subscribe_packet(topic: str, pid: int) -> bytes:
    return _packet(0x82, struct.pack("!H", pid) + _str(topic) + b"\x01")


class Sim:
    """Counters and settings shared by every simulated agent of this process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.broker = (spec["broker"][0], int(spec["broker"][1]))
        self.tunnel = (spec["tunnel"][0], int(spec["tunnel"][1]))
        self.keepalive = int(spec.get("keepalive", 60))
        self.target = int(spec.get("target_port", 9))
        #: the SSH host key the forward's target serves (jobs bench), announced as a real
        #: agent does, so that the manager can pin it and log in
        self.host_key = str(spec.get("host_key", ""))
        self.concurrency = int(spec.get("connect_concurrency", 100))
        self.rate = float(spec.get("connect_rate", 0))
        #: reconnect schedule: the real agent's Backoff (reconnect_min, reconnect_max)
        self.backoff = tuple(spec.get("backoff", (1.0, 120.0)))
        #: spread connections over this many loopback source addresses (127.0.N.1):
        #: one source address has ~28k ephemeral ports towards one broker port
        self.sources = int(spec.get("sources", 1))
        # [device, secret] or, for the jobs bench, [device, secret, target port, host key]
        self.agents = [Agent(self, *dev) for dev in spec["devices"]]
        self.connected = 0
        self.refused: dict[str, int] = {}
        self.connect_errors = 0
        self.disconnects = 0
        self.tunnels = 0
        self.tunnel_errors: list[str] = []
        self.requests = 0
        self.pings = 0
        #: connections whose online status the broker has acknowledged (PUBACK: routed)
        self.status_acked = 0
        self.t_start = time.monotonic()
        self.t_all: Optional[float] = None
        self.t_full_wall: Optional[float] = None
        self.tasks: set[asyncio.Future[None]] = set()

    def status(self) -> dict[str, Any]:
        return {"agents": len(self.agents), "connected": self.connected,
                "refused": self.refused, "connect_errors": self.connect_errors,
                "disconnects": self.disconnects, "tunnels": self.tunnels,
                "tunnel_errors": len(self.tunnel_errors),
                "tunnel_error_sample": self.tunnel_errors[:3], "requests": self.requests,
                "pings": self.pings, "status_acked": self.status_acked,
                "all_connected_s": self.t_all, "all_connected_at": self.t_full_wall,
                "rss_kb": rss_kb(os.getpid())}

    async def connect_all(self) -> None:
        sem = asyncio.Semaphore(self.concurrency)

        async def one(agent: Agent) -> None:
            async with sem:
                await agent.connect()

        self.t_start = time.monotonic()
        if not self.rate:
            await asyncio.gather(*(one(a) for a in self.agents))
            return
        tasks = []
        for i, a in enumerate(self.agents):
            delay = self.t_start + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(a)))
        await asyncio.gather(*tasks)

    async def pinger(self) -> None:
        """One task for every keepalive: PINGREQ to whoever has been quiet for 3/4 of it."""
        while True:
            await asyncio.sleep(1)
            limit = time.monotonic() - self.keepalive * 0.75
            for a in self.agents:
                if a.up and a.last_sent < limit:
                    a.send(_PINGREQ)


class Agent(asyncio.Protocol):
    def __init__(self, sim: Sim, device: str, secret: str, target: int = 0,
                 host_key: str = "") -> None:
        self.sim, self.device, self.secret = sim, device, secret
        self.target = target or sim.target
        self.host_key = host_key or sim.host_key
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.up = False
        self.last_sent = 0.0
        self.pid = 0
        self.connack: Optional[asyncio.Future[int]] = None
        self.ssh: Optional[asyncssh.SSHClientConnection] = None
        self.port: Optional[int] = None
        self.req_topic = wire.req_topic(device)
        self.backoff = Backoff(*sim.backoff)
        self.up_since = 0.0
        #: packet id of this connection's first online status, until its PUBACK
        self.status_pid = 0

    # ------------------------------------------------------------ connection
    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.connack = loop.create_future()
        try:
            local = None
            if self.sim.sources > 1:
                local = (f"127.0.{1 + hash(self.device) % self.sim.sources}.1", 0)
            await loop.create_connection(lambda: self, *self.sim.broker, local_addr=local)
            rc = await asyncio.wait_for(self.connack, 60)
        except (OSError, asyncio.TimeoutError):
            self.sim.connect_errors += 1
            self._retry()
            return
        if rc != 0:
            self.sim.refused[str(rc)] = self.sim.refused.get(str(rc), 0) + 1

    def _retry(self) -> None:
        # like the real agent (dpanel_proto.mqtt): the session's Backoff, reset once a
        # connection had lived STABLE_AFTER seconds
        if self.up_since and time.monotonic() - self.up_since > STABLE_AFTER:
            self.backoff.reset()
        self.up_since = 0.0
        asyncio.get_running_loop().call_later(self.backoff.next(), self._reconnect)

    def _reconnect(self) -> None:
        task = asyncio.ensure_future(self.connect())
        self.sim.tasks.add(task)
        task.add_done_callback(self.sim.tasks.discard)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        offline = wire.encode(wire.Status(device=self.device, state="offline"))
        self.send(connect_packet(self.device, self.device, self.secret,
                                 wire.status_topic(self.device), offline, self.sim.keepalive))

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.up:
            self.up = False
            self.sim.connected -= 1
            self.sim.disconnects += 1
            self._retry()
        elif self.connack is not None and not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        self.transport = None

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.last_sent = time.monotonic()

    def _next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    # ------------------------------------------------------------ packets in
    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            length, mult, i = 0, 1, 1
            while True:
                if i >= len(self.buf):
                    return
                byte = self.buf[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            if len(self.buf) < i + length:
                return
            first, body = self.buf[0], bytes(self.buf[i:i + length])
            del self.buf[:i + length]
            self._packet(first, body)

    def _packet(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 2:  # CONNACK
            rc = body[1]
            if rc == 0:
                self.up = True
                self.up_since = time.monotonic()
                self.sim.connected += 1
                if self.sim.connected == len(self.sim.agents):
                    # wall clock: the bench compares it with when it restarted the broker
                    self.sim.t_full_wall = time.time()
                    if self.sim.t_all is None:
                        self.sim.t_all = round(time.monotonic() - self.sim.t_start, 2)
                self.send(subscribe_packet(self.req_topic, self._next_pid()))
                self._publish_status()
                self.status_pid = self.pid
            if self.connack is not None and not self.connack.done():
                self.connack.set_result(rc)
        elif kind == 3:  # PUBLISH
            qos = (first >> 1) & 3
            tlen = struct.unpack("!H", body[:2])[0]
            topic = body[2:2 + tlen].decode()
            off = 2 + tlen
            if qos:
                self.send(b"\x40\x02" + body[off:off + 2])  # PUBACK
                off += 2
            if topic == self.req_topic:
                task = asyncio.ensure_future(self._request(body[off:]))
                self.sim.tasks.add(task)  # a reference, or the task may be collected
                task.add_done_callback(self.sim.tasks.discard)
        elif kind == 4 and self.status_pid and body[:2] == struct.pack("!H", self.status_pid):
            self.status_pid = 0
            self.sim.status_acked += 1
        # SUBACK, other PUBACKs, PINGRESP: nothing to do

    def _publish_status(self) -> None:
        online = wire.encode(wire.Status(device=self.device, state="online", ts=time.time(),
                                         agent_version="sim", host_key=self.host_key))
        self.send(publish_packet(wire.status_topic(self.device), online, self._next_pid(),
                                 retain=True))

    # ------------------------------------------------------------ requests
    async def _request(self, payload: bytes) -> None:
        self.sim.requests += 1
        try:
            req = wire.decode(payload)
        except wire.DecodeError:
            return
        if isinstance(req, wire.OpenRequest):
            code, message = await self._open()
        elif isinstance(req, wire.CloseRequest):
            code, message = self._close(), ""
        elif isinstance(req, wire.PingRequest):
            # as the real agent (dispatch on_ping): answer, and publish the status again
            # (a manager that (re)connected to a RabbitMQ node hears no retained status)
            self.sim.pings += 1
            code, message = wire.ErrorCode.OK, ""
            self._publish_status()
        else:
            return
        resp = wire.Response(device=self.device, id=req.id, code=code, message=message,
                             port=self.port if code == wire.ErrorCode.OK else None,
                             ts=time.time())
        self.send(publish_packet(wire.resp_topic(self.device), wire.encode(resp),
                                 self._next_pid()))

    async def _open(self) -> tuple[wire.ErrorCode, str]:
        if self.ssh is not None and not self.ssh.is_closed():
            return wire.ErrorCode.OK, ""
        try:
            self.ssh, self.port = await dial_forward(*self.sim.tunnel, self.device, self.secret,
                                                     self.target)
        except (OSError, asyncssh.Error) as exc:
            self.sim.tunnel_errors.append(f"{self.device}: {type(exc).__name__}: {exc}")
            return wire.ErrorCode.TUNNEL_UNREACHABLE, str(exc)[:200]
        self.sim.tunnels += 1
        return wire.ErrorCode.OK, ""

    def _close(self) -> wire.ErrorCode:
        if self.ssh is not None:
            self.ssh.close()
            self.ssh = None
            self.port = None
            self.sim.tunnels -= 1
        return wire.ErrorCode.OK


async def _main(spec: dict[str, Any]) -> None:
    sim = Sim(spec)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pinger = asyncio.create_task(sim.pinger())
    connecting = asyncio.create_task(sim.connect_all())
    sys.stdout.write(json.dumps({"pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    while True:
        line = await reader.readline()
        if not line:
            break
        sys.stdout.write(json.dumps(sim.status()) + "\n")
        sys.stdout.flush()
    pinger.cancel()
    connecting.cancel()
    for a in sim.agents:
        if a.ssh is not None:
            a.ssh.close()
        if a.transport is not None:
            a.transport.abort()


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    asyncio.run(_main(spec))


if __name__ == "__main__":
    main()

"""The manager: registry, presence, signed open/close requests, pooled SSH to devices."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Optional, Union

import asyncssh

from dpanel_proto import wire
from dpanel_proto.signing import sign_request
from dpanel_proto.token import DeviceToken

from ._files import atomic_write, ensure_private_key, ensure_secret
from ._mqtt import ManagerMqtt
from .broker import mosquitto_hash, write_broker_files
from .config import ServerConfig
from .errors import (
    BrokerError,
    DeviceError,
    DeviceOffline,
    DeviceRevoked,
    DPanelError,
    HostKeyMismatch,
    RequestTimeout,
    TunnelRefused,
)
from .registry import Device, Registry

__all__ = ["ExecEvent", "Manager", "Presence", "fingerprint", "sync_broker_files"]

log = logging.getLogger("dpanel.manager")

#: (kind, data): ("stdout"|"stderr", bytes) while running, then ("exit", int).
ExecEvent = tuple[str, Union[bytes, int]]


@dataclass
class Presence:
    online: bool = False
    since: float = 0.0
    agent_version: str = ""
    port: Optional[int] = None
    host_key_ok: bool = True
    host_key: str = ""  # as last announced, pinned or not


@dataclass
class _Pooled:
    conn: asyncssh.SSHClientConnection
    port: int
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0


def sync_broker_files(cfg: ServerConfig, registry: Registry, manager_password: str,
                      reload: Optional[str] = None) -> None:
    """Regenerate the broker's password + ACL files from the registry (the only source
    of truth), then have the broker re-read them."""
    entries = registry.broker_entries()
    entries.append((cfg.broker.username, mosquitto_hash(manager_password)))
    write_broker_files(cfg.broker.passwd_path, cfg.broker.acl_path, entries,
                       cfg.broker.username, cfg.broker.reload if reload is None else reload)


def fingerprint(key_line: str) -> str:
    try:
        return str(asyncssh.import_public_key(key_line).get_fingerprint())
    except (asyncssh.KeyImportError, ValueError):
        return "<unparseable key>"


class Manager:
    """Everything the CLI/API need; one instance per manager process."""

    def __init__(self, cfg: ServerConfig,
                 kick: Optional[Callable[[str], object]] = None,
                 tunnel_sessions: Optional[Callable[[], dict[str, int]]] = None,
                 tunnel_stats: Optional[Callable[[], dict[str, int]]] = None) -> None:
        self.cfg = cfg
        self.registry = Registry(cfg.registry_path)
        self.key = ensure_private_key(cfg.manager.ssh_key)
        self.manager_key_line = self.key.export_public_key().decode().strip()
        self._broker_password = ensure_secret(cfg.broker.password_file)
        self._kick = kick
        # Only when the tunnel runs in this process (the stack): lets us check that a
        # reported port really is the device's own, on top of the host key check.
        self._tunnel_sessions = tunnel_sessions
        self.tunnel_stats = tunnel_stats
        self.presence: dict[str, Presence] = {}
        self._pending: dict[str, tuple[str, asyncio.Future[wire.Response]]] = {}
        self._pool: dict[str, _Pooled] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._mqtt: Optional[ManagerMqtt] = None
        self._reaper: Optional[asyncio.Task[None]] = None
        self._handlers: dict[str, Callable[[str, bytes], None]] = {
            "status": self._on_status,
            "resp": self._on_resp,
        }

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.sync_broker_files()
        host, port = self.cfg.broker.host_port
        self._mqtt = ManagerMqtt(
            asyncio.get_running_loop(), host, port, self.cfg.broker.username,
            self._broker_password,
            list(wire.MANAGER_SUBSCRIPTIONS),
            self._dispatch, on_connected=self._on_broker, tls_ca=self.cfg.broker.ca_file
            if self.cfg.broker.url.startswith("mqtts://") else None,
        )
        self._mqtt.start()
        self._reaper = asyncio.create_task(self._reap_idle())

    def _on_broker(self, up: bool) -> None:
        if up:
            # Rebuild presence from what the broker holds now (retained statuses arrive
            # right after we subscribe). A broker that restarted without persistence
            # has forgotten devices that died meanwhile: they must not stay "online".
            self.presence.clear()

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for dev in list(self._pool):
            self._drop(dev)
        if self._mqtt:
            await asyncio.to_thread(self._mqtt.stop)
        self.registry.close()

    def broker_connected(self) -> bool:
        return bool(self._mqtt and self._mqtt.connected.is_set())

    async def wait_broker(self, timeout: float) -> None:
        assert self._mqtt is not None
        if not await asyncio.to_thread(self._mqtt.connected.wait, timeout):
            raise BrokerError(f"manager could not connect to the broker at {self.cfg.broker.url}")

    # ------------------------------------------------------------------ registry
    def sync_broker_files(self) -> None:
        sync_broker_files(self.cfg, self.registry, self._broker_password)

    def tunnel_host_key_line(self) -> str:
        pub = Path(self.cfg.tunnel.host_key + ".pub")
        if not pub.exists():
            ensure_private_key(self.cfg.tunnel.host_key)
        return pub.read_text().strip()

    def enrol(self, name: str, labels: Optional[dict[str, str]] = None) -> tuple[Device, str]:
        """Add a device; returns it and its token (the only time the secret exists)."""
        device, secret = self.registry.add(name, labels)
        ca = Path(self.cfg.broker.ca_file).read_text() if self.cfg.broker.ca_file else None
        token = DeviceToken(
            device=name, secret=secret, broker=self.cfg.broker.public_url,
            tunnel=self.cfg.tunnel.public_address,
            tunnel_host_key=self.tunnel_host_key_line(), manager_key=self.manager_key_line,
            broker_ca=ca,
        ).encode()
        self.sync_broker_files()
        log.info("enrolled device %s", name)
        return device, token

    def revoke(self, name: str) -> Device:
        device = self.registry.revoke(name)
        self.sync_broker_files()  # the broker drops the session on reload
        if self._kick:
            self._kick(name)  # the tunnel drops it too (other process: it polls)
        self._drop(name)
        self.presence.pop(name, None)
        log.warning("revoked device %s", name)
        return device

    # ------------------------------------------------------------------ MQTT in
    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            device, kind = wire.parse_topic(topic)
            self._handlers[kind](device, payload)
        except wire.DecodeError as exc:
            log.warning("dropped message on %s: %s", topic, exc)
        except KeyError:
            log.warning("dropped message on unexpected topic %s", topic)

    def _on_status(self, device: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        msg = wire.decode(payload)
        if not isinstance(msg, wire.Status) or msg.device != device:
            raise wire.DecodeError(f"device: status for {getattr(msg, 'device', '?')} on "
                                   f"{device}'s topic")
        p = self.presence.setdefault(device, Presence())
        was_online = p.online
        p.online = msg.state == "online"
        p.agent_version = msg.agent_version
        p.port = msg.port
        if p.online and not was_online:
            p.since = time.time()
        if not p.online:
            self._drop(device)
        if msg.host_key and msg.host_key != p.host_key:
            # statuses repeat the key every time; the registry only needs to see a new one
            p.host_key = msg.host_key
            self._check_host_key(device, msg.host_key, p)
        if p.online != was_online:
            # one write per change of state, not per status: a fleet reconnecting after a
            # broker restart is thousands of statuses in seconds
            with contextlib.suppress(Exception):
                self.registry.touch(device, time.time())

    def _check_host_key(self, device: str, key: str, p: Presence) -> None:
        # The status arrives over the device's own authenticated broker session, which
        # the ACL confines to its own topic: that is what makes first-sight pinning safe.
        try:
            pinned = self.registry.pin_host_key(device, key)
        except Exception:  # unknown device (e.g. revoked and deleted)
            return
        p.host_key_ok = pinned == key
        if p.host_key_ok and not self.cfg.known_hosts_path.exists():
            self.write_known_hosts()
        if not p.host_key_ok and pinned is None:
            log.error("device %s announces host key %s, which another device already holds: "
                      "refusing it (cloned card?)", device, fingerprint(key))
        elif not p.host_key_ok:
            log.error("device %s presents host key %s but %s is pinned: refusing it",
                      device, fingerprint(key), fingerprint(pinned or ""))

    def reset_host_key(self, device: str) -> None:
        """Forget the pinned key and pin the one the device presents now, if online (the
        operator re-imaged it on purpose)."""
        self.registry.reset_host_key(device)
        self._drop(device)
        p = self.presence.get(device)
        if p is not None:
            p.host_key_ok = True
            if p.online and p.host_key:
                self._check_host_key(device, p.host_key, p)
        self.write_known_hosts()

    def _on_resp(self, device: str, payload: bytes) -> None:
        msg = wire.decode(payload)
        if not isinstance(msg, wire.Response) or msg.device != device:
            raise wire.DecodeError("device: response does not match its topic")
        pending = self._pending.get(msg.id)
        if pending is None or pending[0] != device:
            log.info("unsolicited response %s from %s ignored", msg.id, device)
            return
        if not pending[1].done():
            pending[1].set_result(msg)

    # ------------------------------------------------------------------ requests
    def _check_reachable(self, device: str) -> Presence:
        dev = self.registry.get(device)
        if dev.revoked:
            raise DeviceRevoked(f"device {device} is revoked")
        if not self.broker_connected():
            raise BrokerError(f"manager is not connected to the broker at {self.cfg.broker.url}")
        p = self.presence.get(device)
        if p is None or not p.online:
            raise DeviceOffline(f"device {device} is offline")
        if not p.host_key_ok:
            raise HostKeyMismatch(
                f"device {device} changed its SSH host key; refused. If it was re-imaged "
                f"on purpose: dpanel device reset-hostkey {device}")
        return p

    async def _request(self, req: wire.Request) -> wire.Response:
        assert self._mqtt is not None
        fut: asyncio.Future[wire.Response] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = (req.device, fut)
        try:
            signed = sign_request(req, self.key)
            self._mqtt.publish(wire.req_topic(req.device), wire.encode(signed))
            timeout = self.cfg.manager.request_timeout
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"device {req.device}: timed out after {timeout:g} s waiting for an answer"
                ) from None
        finally:
            self._pending.pop(req.id, None)

    def _times(self) -> tuple[float, float]:
        now = time.time()
        return now, now + self.cfg.manager.request_lifetime

    async def open_tunnel(self, device: str, ttl: Optional[int] = None,
                          idle_timeout: Optional[int] = None) -> int:
        """Ask the device to dial the tunnel; returns the loopback port of its forward."""
        self._check_reachable(device)
        issued, expires = self._times()
        resp = await self._request(wire.OpenRequest(
            device=device, id=secrets.token_hex(16), issued_at=issued, expires_at=expires,
            ttl=ttl or self.cfg.manager.tunnel_ttl,
            idle_timeout=idle_timeout or self.cfg.manager.tunnel_idle_timeout,
        ))
        if resp.code != wire.ErrorCode.OK or resp.port is None:
            raise TunnelRefused(f"device {device}: tunnel refused ({resp.code.value}: "
                                f"{resp.message or 'no detail'})", resp.code)
        if self._tunnel_sessions is not None:
            owned = self._tunnel_sessions().get(device)
            if owned != resp.port:
                raise TunnelRefused(f"device {device} reported port {resp.port}, but the tunnel "
                                    f"gave it {owned or 'no port'}; refused",
                                    wire.ErrorCode.WRONG_PORT)
        self.presence[device].port = resp.port
        return resp.port

    async def close_tunnel(self, device: str) -> bool:
        self._drop(device)
        self._check_reachable(device)
        issued, expires = self._times()
        resp = await self._request(wire.CloseRequest(
            device=device, id=secrets.token_hex(16), issued_at=issued, expires_at=expires))
        self.presence[device].port = None
        return resp.code == wire.ErrorCode.OK

    def tunnels(self) -> dict[str, int]:
        """device -> port of open tunnels: the tunnel server's own allocation, never a port
        a device reported (one may report another's); empty if the tunnel cannot say."""
        if self._tunnel_sessions is None:
            return {d: p.port for d, p in self.presence.items() if p.online and p.port}
        try:
            owned = self._tunnel_sessions()
        except DPanelError as exc:
            log.warning("tunnel list: %s", exc)
            return {}
        return {d: port for d, port in owned.items()
                if (p := self.presence.get(d)) is not None and p.online}

    # ------------------------------------------------------------------ SSH
    def _drop(self, device: str) -> None:
        pooled = self._pool.pop(device, None)
        if pooled:
            pooled.conn.close()

    async def connection(self, device: str) -> asyncssh.SSHClientConnection:
        """A pooled SSH connection to the device, opening its tunnel if needed."""
        pooled = self._pool.get(device)
        if pooled and not pooled.conn.is_closed():
            pooled.last_used = time.monotonic()
            return pooled.conn
        lock = self._connecting.setdefault(device, asyncio.Lock())
        async with lock:
            pooled = self._pool.get(device)
            if pooled and not pooled.conn.is_closed():
                return pooled.conn
            port = await self.open_tunnel(device)
            pinned = self.registry.get(device).host_key
            if not pinned:
                raise HostKeyMismatch(f"device {device} has not announced a host key yet")
            try:
                conn = await asyncssh.connect(
                    "127.0.0.1", port, username=self.cfg.manager.ssh_user,
                    client_keys=[self.key],
                    known_hosts=([asyncssh.import_public_key(pinned)], [], []),
                    agent_path=None, config=None, connect_timeout=10,
                    keepalive_interval=15, keepalive_count_max=3,
                )
            except asyncssh.HostKeyNotVerifiable:
                raise HostKeyMismatch(
                    f"device {device}: the SSH server on port {port} does not hold the "
                    f"pinned host key {fingerprint(pinned)}; refused") from None
            except (OSError, asyncssh.Error) as exc:
                raise DeviceError(f"device {device}: SSH through the tunnel failed: "
                                  f"{exc}") from None
            self._pool[device] = _Pooled(conn, port)
            return conn

    async def exec(self, device: str, command: str, stdin: Optional[bytes] = None,
                   timeout: Optional[float] = None) -> AsyncIterator[ExecEvent]:
        """Run ``command`` on the device; yields output chunks, then the exit code."""
        conn = await self.connection(device)
        pooled = self._pool.get(device)
        if pooled is None:
            raise DeviceError(f"device {device}: connection lost before the command started")
        pooled.busy += 1
        try:
            async for event in self._run(device, conn, command, stdin, timeout):
                yield event
        finally:
            pooled.busy -= 1
            pooled.last_used = time.monotonic()

    async def _run(self, device: str, conn: asyncssh.SSHClientConnection, command: str,
                   stdin: Optional[bytes], timeout: Optional[float]) -> AsyncIterator[ExecEvent]:
        try:
            proc = await conn.create_process(command, encoding=None,
                                             stdin=asyncssh.PIPE if stdin is not None else None)
        except (OSError, asyncssh.Error) as exc:
            self._drop(device)
            raise DeviceError(f"device {device}: could not start the command: {exc}") from None
        if stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.write_eof()
        queue: asyncio.Queue[Union[ExecEvent, BaseException, None]] = asyncio.Queue(maxsize=64)

        async def pump(name: str, reader: asyncssh.SSHReader[bytes]) -> None:
            try:
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    await queue.put((name, chunk))
            except (OSError, asyncssh.Error) as exc:
                # the connection died under us: hand it to the consumer, never hang it
                await queue.put(exc)
                return
            await queue.put(None)

        pumps = [asyncio.create_task(pump("stdout", proc.stdout)),
                 asyncio.create_task(pump("stderr", proc.stderr))]
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        finished = False
        try:
            while done < 2:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    proc.close()
                    raise RequestTimeout(f"device {device}: command timed out after "
                                         f"{timeout:g} s") from None
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
            result = await proc.wait()
            finished = True
        except (OSError, asyncssh.Error, asyncssh.misc.ChannelOpenError) as exc:
            self._drop(device)
            raise DeviceError(f"device {device}: connection lost mid-command ({exc})") from None
        finally:
            for t in pumps:
                t.cancel()
            if not finished:
                # the caller went away (Ctrl-C, HTTP client gone): the agent hangs up
                # the command, as sshd does when its client disconnects
                proc.close()
        if conn.is_closed() and result.exit_status is None:
            self._drop(device)
            raise DeviceError(f"device {device}: connection lost mid-command")
        if result.exit_status is not None and result.exit_status >= 0:
            yield ("exit", result.exit_status)
        elif result.exit_signal:
            yield ("stderr", f"killed by signal {result.exit_signal[0]}\n".encode())
            yield ("exit", 255)
        else:
            self._drop(device)
            raise DeviceError(f"device {device}: connection lost mid-command")

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(5)
            limit = time.monotonic() - self.cfg.manager.connection_idle
            for dev, pooled in list(self._pool.items()):
                if pooled.conn.is_closed() or (pooled.busy == 0 and pooled.last_used < limit):
                    self._drop(dev)

    def known_hosts_text(self) -> str:
        """OpenSSH known_hosts lines for ``HostKeyAlias``-based ssh-config entries."""
        # both spellings: `ssh -o ProxyCommand=.. DEVICE` and the `DEVICE.dpanel` config
        return "".join(f"{d.id},{d.id}.dpanel {d.host_key}\n"
                       for d in self.registry.devices(False) if d.host_key)

    def write_known_hosts(self) -> Path:
        path = self.cfg.known_hosts_path
        atomic_write(path, self.known_hosts_text(), 0o644)
        return path

"""The manager: one facade over the registry, presence, requests and the SSH pool.

The CLI and the API use only this class. Each job lives in its own module:
:mod:`.presence` (who is online), :mod:`.requests` (signed MQTT requests and their
answers), :mod:`.sshpool` (pooled SSH through tunnels), :mod:`.registry` (SQLite). The
facade keeps registry calls off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Coroutine, Optional

import asyncssh

from dpanel_proto import wire
from dpanel_proto.token import DeviceToken

from ._files import atomic_write, ensure_private_key, ensure_secret
from .audit import AuditLog
from .broker import mosquitto_hash, write_broker_files
from .brokerauth import kick_broker_user
from .config import ServerConfig
from .dynsec import RESPONSE_TOPIC, Dynsec
from .errors import (
    BrokerError,
    DeviceError,
    DeviceNotAnswering,
    DeviceOffline,
    DeviceRevoked,
    DPanelError,
    HostKeyMismatch,
    RegistryError,
    RequestTimeout,
    TunnelRefused,
)
from .fleet import Fleet
from .hostkeys import InvalidHostKey, fingerprint, normalize_host_key
from .jobs import Jobs
from .leases import Leases
from .metrics import BROKER_RECONNECTS, exec_timer, register_manager_metrics
from .presence import Presence, PresenceTracker
from .presencesync import PresenceStore, Resync, needs_resync
from .registry import Device, Registry
from .requests import Requests
from .sshpool import ExecEvent, Pooled, RemoteCommand, SshPool
from .updates import Updates
from .usercert import UserCA

__all__ = ["ExecEvent", "Manager", "Presence", "fingerprint", "sync_broker_files"]

log = logging.getLogger("dpanel.manager")

#: known_hosts is rewritten at most this often: a fleet reconnecting pins thousands of
#: keys in seconds, and each rewrite is O(fleet).
_KNOWN_HOSTS_DEBOUNCE = 0.5
#: A device marked not answering is pinged this often until it answers again.
_PROBE_INTERVAL = 5.0
#: Presence resync after a broker connect (see presencesync.py).
_SWEEP_SETTLE = 3.0
_SWEEP_PARALLEL = 200
#: A resync ping's wait: generous, since on RabbitMQ with the HTTP auth backend each ping
#: and each answer waits for a topic check (one HTTP request each) behind the others;
#: giving up too early would show a live device offline until its status arrives.
_SWEEP_TIMEOUT = 10.0


def sync_broker_files(cfg: ServerConfig, registry: Registry, manager_password: str,
                      reload: Optional[str] = None) -> None:
    """Regenerate the broker's password + ACL files from the registry (the only source
    of truth), then have the broker re-read them."""
    entries = registry.broker_entries()
    entries.append((cfg.broker.username, mosquitto_hash(manager_password)))
    write_broker_files(cfg.broker.passwd_path, cfg.broker.acl_path, entries,
                       cfg.broker.username, cfg.broker.reload if reload is None else reload)


class Manager:
    """Everything the CLI/API need; one instance per manager process.

    ``kick``, ``tunnel_sessions`` and ``tunnel_stats`` reach the tunnel server (in this
    process for the stack, over its control channel otherwise). ``tunnel_sessions`` is
    the one source of truth for a device's tunnel port.
    """

    def __init__(self, cfg: ServerConfig,
                 kick: Optional[Callable[[str], object]] = None,
                 tunnel_sessions: Optional[Callable[[], dict[str, int]]] = None,
                 tunnel_stats: Optional[Callable[[], dict[str, int]]] = None) -> None:
        self.cfg = cfg
        self.registry = Registry(cfg.registry_url)
        self.key = ensure_private_key(cfg.manager.ssh_key)
        self.manager_key_line = self.key.export_public_key().decode().strip()
        #: the SSH user CA of operator certificates (its key lives in the state dir)
        self.user_ca = UserCA(cfg.state_dir, cfg.manager.cert_ttl_max)
        self._broker_password = ensure_secret(cfg.broker.password_file)
        self._kick = kick
        self._tunnel_sessions = tunnel_sessions
        self.tunnel_stats = tunnel_stats
        self._known_hosts_due: Optional[asyncio.TimerHandle] = None
        self._broker_was_up = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._probing: set[str] = set()
        #: enrolled tunnel servers on other hosts, and placement (empty: the built-in one)
        self.fleet = Fleet(self.registry, self.key)
        self.pool = SshPool(cfg, self.key, open_tunnel=self.open_tunnel,
                            pinned_key=self._pinned_key, on_silent=self._not_answering,
                            route=self.route)
        # jobs: parts for offline devices run when presence says they came online
        self.jobs = Jobs(self, runner=cfg.manager.replica)
        #: agent updates: rollouts offered to devices as they come online (replicas may
        #: all schedule: a part moves pending -> offered by compare-and-set, once)
        self.updates = Updates(self)
        #: replicas: a lease each, so that a live one settles a dead one's parts
        self.leases = Leases(self, cfg.manager.replica) if cfg.manager.replica else None
        #: RabbitMQ or a broker cluster: presence from the shared store + a resync, not
        #: from retained statuses (presencesync.py)
        self._presence_store = (PresenceStore(self.registry.db) if needs_resync(cfg)
                                else None)
        self._presence = PresenceTracker(self.registry, on_offline=self.pool.drop,
                                         on_pinned=self._known_hosts_changed,
                                         on_online=self._came_online,
                                         store=self._presence_store)
        self.resync: Optional[Resync] = None
        if self._presence_store is not None:
            self.resync = Resync(targets=self._resync_targets, ping=self._resync_ping,
                                 still_unverified=self._presence.unverified,
                                 give_up=self._presence.give_up, settle=_SWEEP_SETTLE,
                                 parallel=_SWEEP_PARALLEL)
        #: device id -> Presence (read-only for callers; ``Presence.state`` is
        #: online | offline | not_answering)
        self.presence: dict[str, Presence] = self._presence.devices
        #: the audit trail (devices' records over MQTT, the API's own; see audit.py)
        self.audit = AuditLog(self.registry, Path(cfg.state_dir))
        self._requests = Requests(cfg, self.key, self._broker_password,
                                  on_status=self._on_status, on_broker=self._on_broker,
                                  on_alive=self._presence.alive,
                                  on_late_open=self._late_open, on_audit=self._on_audit)
        #: broker.auth = "dynsec": per-device credentials over the broker's control API
        self.dynsec: Optional[Dynsec] = None
        if cfg.broker.auth == "dynsec":
            self.dynsec = Dynsec(self._requests.publish)
            self._requests.extra[RESPONSE_TOPIC] = self.dynsec.on_response

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        register_manager_metrics(self)
        await asyncio.to_thread(self.sync_broker_files)
        if self._presence_store is not None:
            # before the broker session and the API: a restarted replica shows the fleet
            # as the other replicas (or its previous run) last heard it, not offline
            seeded = self._presence.seed(await asyncio.to_thread(self._presence_store.online))
            log.info("presence: %s device(s) online in the shared store, to be verified",
                     seeded)
        self._requests.start()
        self.pool.start()
        self.fleet.start()
        await self.jobs.start()
        await self.updates.start()
        if self.leases is not None:
            await self.leases.start()

    def _came_online(self, device: str) -> None:
        self.jobs.kick(device)
        self.updates.kick(device)

    def _on_broker(self, up: bool) -> None:
        if up and self._broker_was_up:
            BROKER_RECONNECTS.inc()
        self._broker_was_up = self._broker_was_up or up
        if up:
            self._presence.clear()  # retained statuses arrive right after we subscribe
            if self.dynsec is not None:
                self._spawn(self._reconcile())
            if self.resync is not None:
                self.resync.start()

    async def _resync_targets(self) -> list[tuple[str, bool]]:
        """(device, shown online) for each device not heard from in this broker session."""
        out = []
        for d in await self.devices(False):
            p = self.presence.get(d.id)
            if p is None or not p.verified:
                out.append((d.id, p is not None and p.online))
        return out

    async def _resync_ping(self, device: str) -> Optional[bool]:
        """An agent answers a ping and publishes its status again, which reaches us live
        whatever node it is on. None: no broker session (a new resync comes with it)."""
        if not self.broker_connected():
            return None
        issued, expires = self._times()
        try:
            await self._requests.request(wire.PingRequest(
                device=device, id=secrets.token_hex(16), issued_at=issued,
                expires_at=expires), timeout=_SWEEP_TIMEOUT)
        except RequestTimeout:
            return False if self.broker_connected() else None
        except BrokerError:
            return None
        self._presence.answered(device)
        return True

    async def _reconcile(self) -> None:
        """On every (re)connect: only what differs from the registry is changed."""
        assert self.dynsec is not None
        active = {d.id for d in await self.devices(False)}
        try:
            done = await self.dynsec.reconcile(active, self.cfg.broker.username)
        except BrokerError as exc:
            log.error("broker reconcile failed: %s", exc)
            return
        if done["disabled"] or done["enabled"]:
            log.info("broker reconciled: disabled %s, enabled %s", done["disabled"],
                     done["enabled"])

    async def close(self) -> None:
        if self.leases is not None:
            await self.leases.close()
        await self.jobs.close()
        await self.updates.close()
        await self.fleet.close()
        if self.resync is not None:
            await self.resync.close()
        for task in list(self._tasks):
            task.cancel()
        self.pool.close()
        await self._requests.stop()
        await self._presence.drain()
        if self._known_hosts_due is not None:
            self._known_hosts_due.cancel()
        self.registry.close()

    def on_presence(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(device)`` ("*": every device) when a presence may have changed."""
        self._presence.listeners.append(listener)

    def broker_connected(self) -> bool:
        return self._requests.connected()

    async def wait_broker(self, timeout: float) -> None:
        await self._requests.wait_connected(timeout)

    # ------------------------------------------------------------------ registry
    def sync_broker_files(self) -> None:
        if self.cfg.broker.auth == "files":
            sync_broker_files(self.cfg, self.registry, self._broker_password)

    def tunnel_host_key_line(self) -> str:
        pub = Path(self.cfg.tunnel.host_key + ".pub")
        if not pub.exists():
            ensure_private_key(self.cfg.tunnel.host_key)
        return pub.read_text().strip()

    async def device(self, name: str) -> Device:
        return await asyncio.to_thread(self.registry.get, name)

    async def devices(self, include_revoked: bool = True) -> list[Device]:
        return await asyncio.to_thread(self.registry.devices, include_revoked)

    async def enrol(self, name: str, labels: Optional[dict[str, str]] = None, *,
                    proxy: Optional[str] = None) -> tuple[Device, str]:
        """Add a device; returns it and its token (the only time the secret exists).
        ``proxy``: an HTTP CONNECT proxy the token tells the device to use."""
        if self.dynsec is None:
            return await asyncio.to_thread(self._enrol, name, labels, proxy)
        device, secret = await asyncio.to_thread(self.registry.add, name, labels)
        try:
            await self.dynsec.create_device(name, secret)
        except BrokerError as exc:
            def undo() -> None:  # the secret is gone: an enrolment without it is useless
                self.registry.revoke(name)
                self.registry.delete(name)
            await asyncio.to_thread(undo)
            raise BrokerError(f"enrolment of {name} undone: {exc}") from None
        return await asyncio.to_thread(self._enrol, name, labels, proxy, (device, secret))

    def _enrol(self, name: str, labels: Optional[dict[str, str]],
               proxy: Optional[str] = None,
               added: Optional[tuple[Device, str]] = None) -> tuple[Device, str]:
        device, secret = added or self.registry.add(name, labels)
        ca = Path(self.cfg.broker.ca_file).read_text() if self.cfg.broker.ca_file else None
        token = DeviceToken(
            device=name, secret=secret, broker=self.cfg.broker.public_url,
            tunnel=self.cfg.tunnel.public_address,
            tunnel_host_key=self.tunnel_host_key_line(), manager_key=self.manager_key_line,
            broker_ca=ca, edge=self.cfg.edge.public_address if self.cfg.edge.listen else None,
            proxy=proxy, user_ca=self.user_ca.public_line,
        ).encode()
        self.sync_broker_files()
        log.info("enrolled device %s", name)
        return device, token

    async def revoke(self, name: str) -> Device:
        def revoke() -> Device:
            device = self.registry.revoke(name)
            self.sync_broker_files()  # the broker drops the session on reload
            return device

        device = await asyncio.to_thread(revoke)
        await self._broker_cut(name, delete=False)
        if self._kick:
            self._kick(name)  # the tunnel drops it too
        await self.fleet.kick(name)  # and every remote tunnel server, pushed now
        self.pool.drop(name)
        self._presence.forget(name)
        log.warning("revoked device %s", name)
        return device

    async def delete(self, name: str, force: bool = False) -> dict[str, object]:
        """Free a revoked device's name; its record moves to ``deleted_devices``.
        ``force`` revokes it first (cut off everywhere, as ``revoke``)."""
        if not (await self.device(name)).revoked:
            if not force:
                raise RegistryError(f"device {name} is not revoked; revoke it first "
                                    f"(dpanel device revoke {name}) or use --force")
            await self.revoke(name)
        record = await asyncio.to_thread(self.registry.delete, name)
        await self._broker_cut(name, delete=True)
        log.warning("deleted device %s (its name is free again)", name)
        return record

    async def _broker_cut(self, name: str, delete: bool) -> None:
        """Per-device broker change of a revoke/delete (files mode did it by the rewrite).
        A broker that cannot be told now is told by the reconcile on reconnect."""
        try:
            if self.dynsec is not None:
                await (self.dynsec.delete_device(name) if delete
                       else self.dynsec.disable_device(name))
            elif self.cfg.broker.auth == "http" and not delete:
                await asyncio.to_thread(kick_broker_user, self.cfg.broker.kick, name)
        except BrokerError as exc:
            log.error("revoke of %s: broker not told (%s); it will be on reconnect",
                      name, exc)

    async def deleted_devices(self) -> list[dict[str, object]]:
        return await asyncio.to_thread(self.registry.deleted)

    async def reset_host_key(self, device: str) -> None:
        """Forget the pinned key and pin the one the device presents now, if online (the
        operator re-imaged it on purpose)."""
        await asyncio.to_thread(self.registry.reset_host_key, device)
        self.pool.drop(device)
        p = self.presence.get(device)
        if p is not None:
            p.host_key_ok = True
            if p.online and p.host_key:
                await self._presence.check_host_key(device, p.host_key, p)
        await self.write_known_hosts()

    async def _pinned_key(self, device: str) -> Optional[str]:
        return (await self.device(device)).host_key

    # ------------------------------------------------------------------ requests
    async def _check_reachable(self, device: str) -> Presence:
        dev = await self.device(device)
        if dev.revoked:
            raise DeviceRevoked(f"device {device} is revoked")
        if not self.broker_connected():
            raise BrokerError(f"manager is not connected to the broker at {self.cfg.broker.url}")
        p = self.presence.get(device)
        if p is None or not p.online:
            raise DeviceOffline(f"device {device} is offline")
        if p.not_answering_since is not None:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.not_answering_since))
            raise DeviceNotAnswering(f"device {device} is connected but not answering "
                                     f"(since {since})")
        if not p.host_key_ok:
            raise HostKeyMismatch(
                f"device {device} changed its SSH host key; refused. If it was re-imaged "
                f"on purpose: dpanel device reset-hostkey {device}")
        return p

    def _times(self) -> tuple[float, float]:
        now = time.time()
        return now, now + self.cfg.manager.lifetime

    async def _request(self, req: wire.Request) -> wire.Response:
        try:
            return await self._requests.request(req)
        except RequestTimeout:
            self._not_answering(req.device)
            raise

    def _on_audit(self, device: str, payload: bytes) -> None:
        if len(payload) <= wire.MAX_AUDIT_PAYLOAD and self.audit.admit(device):
            self._spawn(self._ingest_audit(device, payload))
        else:
            log.debug("audit message from %s dropped (size or rate)", device)

    async def _ingest_audit(self, device: str, payload: bytes) -> None:
        try:
            await asyncio.to_thread(self.audit.ingest, device, payload)
        except wire.DecodeError as exc:
            log.warning("dropped audit message from %s: %s", device, exc)

    # ------------------------------------------------------------------ liveness
    def _on_status(self, device: str, payload: bytes) -> None:
        self._presence.on_status(device, payload)
        p = self.presence.get(device)
        if p is not None and p.port and self._requests.abandoned_open(device):
            # the open's answer may have been lost with our broker session; the status
            # says a tunnel is up all the same
            self._late_open(device)

    def _not_answering(self, device: str) -> None:
        """The device let a request or an SSH session time out: fail fast from now on,
        and ping it until it answers again."""
        self._presence.mark_not_answering(device)
        p = self.presence.get(device)
        if p is not None and p.not_answering_since is not None and device not in self._probing:
            self._spawn(self._probe(device))

    async def _probe(self, device: str) -> None:
        self._probing.add(device)
        try:
            while True:
                p = self.presence.get(device)
                if p is None or p.not_answering_since is None:
                    return  # answered, went offline, or was revoked
                if self.broker_connected():
                    issued, expires = self._times()
                    try:
                        await self._requests.request(wire.PingRequest(
                            device=device, id=secrets.token_hex(16), issued_at=issued,
                            expires_at=expires), timeout=_PROBE_INTERVAL)
                        continue  # any answer cleared the mark (on_alive)
                    except RequestTimeout:
                        continue  # the ping's own wait was the pause
                await asyncio.sleep(_PROBE_INTERVAL)
        finally:
            self._probing.discard(device)

    def _late_open(self, device: str) -> None:
        """A device opened a tunnel for a caller that had given up: close it, unless
        someone uses the device now (a newer caller's open, a pooled SSH connection)."""
        if self.pool.live(device) or self._requests.pending_open(device):
            return
        self._requests.forget_abandoned(device)
        self._spawn(self._close_orphan(device))

    async def _close_orphan(self, device: str) -> None:
        log.warning("closing the tunnel of %s: its open request had been given up", device)
        issued, expires = self._times()
        try:
            resp = await self._requests.request(wire.CloseRequest(
                device=device, id=secrets.token_hex(16), issued_at=issued, expires_at=expires))
        except (DeviceError, BrokerError) as exc:
            log.warning("could not close the orphan tunnel of %s: %s", device, exc)
            return
        p = self.presence.get(device)
        if p is not None and resp.code == wire.ErrorCode.OK:
            p.port = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bug: background task failed", exc_info=task.exception())

    async def open_tunnel(self, device: str, ttl: Optional[int] = None,
                          idle_timeout: Optional[int] = None) -> int:
        """Ask the device to dial the tunnel; returns the loopback port of its forward."""
        p = await self._check_reachable(device)
        for _ in range(self.fleet.tries() if self.fleet.active() else 1):
            server = self.fleet.place(device) if self.fleet.active() else None
            issued, expires = self._times()
            resp = await self._request(wire.OpenRequest(
                device=device, id=secrets.token_hex(16), issued_at=issued,
                expires_at=expires, ttl=ttl or self.cfg.manager.tunnel_ttl,
                idle_timeout=idle_timeout or self.cfg.manager.tunnel_idle_timeout,
                # a device that trusts another (or no) user CA learns ours, signed:
                # migration of old-token devices and CA rotation; never sent to agents
                # that predate it
                user_ca=(self.user_ca.public_line if p.user_ca is not None
                         and p.user_ca != self.user_ca.public_line else None),
                tunnel=server.public if server else None,
                tunnel_host_key=server.host_key if server else None,
            ))
            if server is None or resp.code != wire.ErrorCode.TUNNEL_UNREACHABLE:
                break
            # alive for us, not for the device's site (a partial partition): elsewhere
            self.fleet.unreachable(device, server, resp.message or "no detail")
            self.fleet.check_left(device)  # none left: each server named, with why
        if resp.code == wire.ErrorCode.OK:
            self._requests.forget_abandoned(device)  # the tunnel has a caller again
        at = f" on tunnel server {server.name} ({server.public})" if server else ""
        if resp.code != wire.ErrorCode.OK or resp.port is None:
            raise TunnelRefused(f"device {device}: tunnel refused{at} ({resp.code.value}: "
                                f"{resp.message or 'no detail'})", resp.code)
        if server is not None:
            # that server's own allocation, asked over the manager's channel to it
            owned = await self.fleet.port_of(server, device)
            if owned != resp.port:
                raise TunnelRefused(f"device {device} reported port {resp.port}, but tunnel "
                                    f"server {server.name} gave it {owned or 'no port'}; "
                                    "refused", wire.ErrorCode.WRONG_PORT)
            self.fleet.placed(device, server, resp.port)
        elif self._tunnel_sessions is not None:
            owned = self._tunnel_sessions().get(device)
            if owned != resp.port:
                raise TunnelRefused(f"device {device} reported port {resp.port}, but the tunnel "
                                    f"gave it {owned or 'no port'}; refused",
                                    wire.ErrorCode.WRONG_PORT)
        p.port = resp.port
        return resp.port

    async def close_tunnel(self, device: str) -> bool:
        self.pool.drop(device)
        p = await self._check_reachable(device)
        issued, expires = self._times()
        resp = await self._request(wire.CloseRequest(
            device=device, id=secrets.token_hex(16), issued_at=issued, expires_at=expires))
        p.port = None
        return resp.code == wire.ErrorCode.OK

    def tunnels(self) -> dict[str, int]:
        """Open tunnels, device -> loopback port: the tunnel's own allocations when it can
        be asked (a device may report another's port), else what the devices last
        reported; empty if the tunnel cannot be asked."""
        if self.fleet.active():
            return self.fleet.tunnels()
        if self._tunnel_sessions is not None:
            try:
                return dict(self._tunnel_sessions())
            except DPanelError as exc:
                log.warning("tunnel list: %s", exc)
                return {}
        return {d: p.port for d, p in self.presence.items() if p.online and p.port}

    # ------------------------------------------------------------------ SSH
    def route(self, device: str) -> tuple[str, Optional[asyncssh.SSHClientConnection]]:
        """Where the device's tunnel port is: (host, None) on this host's loopback, or
        (the server's bind address, the manager's SSH connection to that server)."""
        if self.fleet.active():
            st = self.fleet.server_of(device)
            if st is not None:
                return st.bind_host, self.fleet.via(device)
        return "127.0.0.1", None

    async def open_stream(self, device: str, port: int) -> tuple[Any, Any]:
        """A byte stream to the device's tunnel port (the WebSocket proxy's), wherever
        its tunnel server is."""
        host, via = self.route(device)
        if via is None:
            return await asyncio.open_connection(host, port)
        return await via.open_connection(host, port, encoding=None)

    async def connection(self, device: str) -> Pooled:
        """The pooled SSH connection to the device, opening its tunnel if needed."""
        return await self.pool.connection(device)

    def exec(self, device: str, command: str, stdin: Optional[bytes] = None,
             timeout: Optional[float] = None) -> AsyncIterator[ExecEvent]:
        """Run ``command`` on the device; yields output chunks, then the exit code."""
        return self.pool.exec(device, command, stdin, timeout)

    async def start_exec(self, device: str, command: str, stdin: Optional[bytes] = None, *,
                         stream_stdin: bool = False, timeout: Optional[float] = None,
                         env: Optional[dict[str, str]] = None) -> RemoteCommand:
        """Start ``command`` and return it running (the API streams it; see sshpool).
        ``env`` goes to the device's SSH server (the audit's DPANEL_* names)."""
        with exec_timer():
            return await self.pool.start_command(device, command, stdin,
                                                 stream_stdin=stream_stdin, timeout=timeout,
                                                 env=env)

    # ------------------------------------------------------------------ known_hosts
    async def known_hosts_text(self) -> str:
        """OpenSSH known_hosts lines for ``HostKeyAlias``-based ssh-config entries."""
        devices = await self.devices(False)
        lines = []
        for d in devices:
            if not d.host_key:
                continue
            try:
                # pins made before keys were parsed (an older manager) are re-checked
                # here: a pin can never add a line of its own to known_hosts
                key = normalize_host_key(d.host_key)
            except InvalidHostKey as exc:
                log.error("device %s: pinned host key left out of known_hosts: %s", d.id, exc)
                continue
            # both spellings: `ssh -o ProxyCommand=.. DEVICE` and the `DEVICE.dpanel` config
            lines.append(f"{d.id},{d.id}.dpanel {key}\n")
        return "".join(lines)

    async def write_known_hosts(self) -> Path:
        path = self.cfg.known_hosts_path
        text = await self.known_hosts_text()
        await asyncio.to_thread(atomic_write, path, text, 0o644)
        return path

    def _known_hosts_changed(self) -> None:
        # A newly pinned device must reach known_hosts at once; coalesce a burst of pins.
        if self._known_hosts_due is None:
            self._known_hosts_due = asyncio.get_running_loop().call_later(
                _KNOWN_HOSTS_DEBOUNCE, self._flush_known_hosts)

    def _flush_known_hosts(self) -> None:
        self._known_hosts_due = None
        task = asyncio.ensure_future(self.write_known_hosts())
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future[Path]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("could not write known_hosts: %s", task.exception())

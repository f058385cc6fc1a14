"""The agent: presence on MQTT, signed requests in, one on-demand reverse tunnel out.

Memory matters on a 512 MB board, so asyncssh (about 20 MB resident once imported) is
only loaded when the first tunnel is requested: an idle agent is paho + ``cryptography``
(signature checks) and nothing else. The built-in SSH server starts at that moment too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import TYPE_CHECKING, Optional, Tuple

from dpanel_proto.signing import ManagerKey
from dpanel_proto.token import DeviceToken
from dpanel_proto.util import Backoff
from dpanel_proto.wire import Response, Status, encode, resp_topic

from . import __version__
from .audit import AuditShipper
from .config import AgentConfig
from .dispatch import Dispatcher
from .errors import AgentError
from .files import ensure_private_dir, load_or_create_host_key, read_public_key_line
from .guard import REPLAY_CACHE_NAME, RequestGuard
from .mqtt import AgentMqtt
from .tokensrc import resolve_token
from .updater import Updater
from .userca import load_user_ca, publish_for_sshd, store_user_ca, valid_user_ca

if TYPE_CHECKING:
    from .link import TunnelLink
    from .sshd import BuiltinSSHServer

__all__ = ["Agent"]

log = logging.getLogger("dpanel.agent")


class _LazyLink:
    """Creates the real :class:`TunnelLink` (and the built-in SSH server it points at)
    on the first open request, so asyncssh is not imported before it is needed."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.real: Optional[TunnelLink] = None

    @property
    def port(self) -> Optional[int]:
        return self.real.port if self.real is not None else None

    async def open(self, ttl: float, idle_timeout: float, *,
                   not_after: Optional[float] = None,
                   server: Optional[Tuple[str, str]] = None) -> int:
        if self.real is None:
            self.real = await self._agent._make_link()
        return await self.real.open(ttl, idle_timeout, not_after=not_after, server=server)

    async def close(self, reason: str) -> bool:
        return await self.real.close(reason) if self.real is not None else False


class Agent:
    """``await Agent(config).run()`` until :meth:`stop`. ``config.token`` or the token
    file/import named in the config supplies the token."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.token: Optional[DeviceToken] = config.token
        self.host_key_line = ""
        #: the SSH user CA trusted for operator certificates ("" = none)
        self.user_ca = ""
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopped: Optional[asyncio.Event] = None
        self._stop_requested = False
        self._mqtt: Optional[AgentMqtt] = None
        self._link = _LazyLink(self)
        self._sshd: Optional[BuiltinSSHServer] = None
        self.dispatcher: Optional[Dispatcher] = None
        self.audit: Optional[AuditShipper] = None
        self.updater: Optional[Updater] = None
        #: set when the agent stops to be restarted into an update
        self.restart_for_update = False

    # ------------------------------------------------------------------ observable state

    @property
    def tunnel_port(self) -> Optional[int]:
        """The public tunnel's loopback port of our forward, while a tunnel is up."""
        return self._link.port

    @property
    def connected(self) -> bool:
        """Connected to the broker right now."""
        return self._mqtt is not None and self._mqtt.connected.is_set()

    @property
    def link(self) -> Optional[TunnelLink]:
        return self._link.real

    @property
    def sshd(self) -> Optional[BuiltinSSHServer]:
        return self._sshd

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask :meth:`run` to return; safe from any thread and before run() starts."""
        self._stop_requested = True
        loop, evt = self._loop, self._stopped
        if loop is not None and evt is not None:
            try:
                loop.call_soon_threadsafe(evt.set)
            except RuntimeError:
                pass

    async def run(self) -> None:
        """Run until stopped. Raises TokenError / AgentError for problems the operator
        must fix (bad token, unwritable state dir); everything at runtime is retried."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        if self._stop_requested:
            return
        token = self.token = resolve_token(cfg)
        try:
            ensure_private_dir(cfg.state_dir)
        except OSError as exc:
            raise AgentError(f"state_dir: cannot create {cfg.state_dir}: {exc.strerror}") from None
        if cfg.ssh_target == "builtin":
            self.host_key_line = load_or_create_host_key(cfg.host_key_path)
        else:
            self.host_key_line = read_public_key_line(cfg.sshd_host_key)
        self.user_ca = load_user_ca(cfg.state_dir, token, cfg.pins_dir)
        self._publish_for_sshd()
        self.updater = Updater(state_dir=cfg.state_dir, update_root=cfg.update_root,
                               update_key=_update_key(cfg), token=token,
                               version=__version__, publish_status=self._publish_status,
                               restart=self._restart_for_update)
        self.updater.startup()
        # persisted, so that a restarted agent still refuses a request it already honoured
        guard = RequestGuard(token.device, ManagerKey(token.manager_key),
                             cfg.request_clock_skew, store=cfg.state_dir / REPLAY_CACHE_NAME)
        self.dispatcher = Dispatcher(token.device, guard, self._link, self._respond,
                                     ttl_max=cfg.ttl_max, idle_timeout_max=cfg.idle_timeout_max,
                                     target=cfg.ssh_target, on_ping=self._publish_status,
                                     on_user_ca=self._set_user_ca,
                                     on_update=self.updater.offer)
        self._mqtt = AgentMqtt(
            self._loop, token, offline_payload=encode(self._status("offline")),
            keepalive=cfg.mqtt_keepalive, protocol=cfg.mqtt_protocol,
            backoff=Backoff(cfg.reconnect_min, cfg.reconnect_max),
            on_request=self.dispatcher.handle, on_connected=self._on_connected,
            proxy_setting=cfg.proxy,
        )
        self._mqtt.publish_status(encode(self._status("online")))
        mqtt_session = self._mqtt
        self.audit = AuditShipper(token.device, cfg.state_dir, mqtt_session.publish_tracked,
                                  lambda: mqtt_session.connected.is_set())
        self.audit.start()  # ships what a previous run left in the spool, too
        log.info("dpanel-tunnel %s starting for %s, ssh target %s, broker %s, profile %s",
                 __version__, token.redacted(), cfg.ssh_target,
                 self._mqtt.endpoint.describe(), cfg.profile)
        self._mqtt.start()
        try:
            await self._stopped.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        log.info("stopping")
        if self.updater is not None:
            self.updater.stop()
        if self.dispatcher is not None:
            try:
                await asyncio.wait_for(self.dispatcher.drain(), 5)
            except asyncio.TimeoutError:
                pass
        if self._link.real is not None:
            await self._link.real.shutdown()
        if self._mqtt is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, self._mqtt.stop, encode(self._status("offline")))
        if self._sshd is not None:
            await self._sshd.close()
        if self.audit is not None:
            await self.audit.stop()

    # ------------------------------------------------------------------ internals

    def _status(self, state: str) -> Status:
        assert self.token is not None
        online = state == "online"
        upd = self.updater.status_fields() if (online and self.updater) else {}
        return Status(device=self.token.device, state="online" if online else "offline",
                      ts=time.time(), agent_version=__version__,
                      host_key=self.host_key_line if online else "",
                      port=self._link.port if online else None,
                      user_ca=self.user_ca if online else None, **upd)

    def _restart_for_update(self) -> None:
        """The new binary is in place: exit, so the supervisor starts it."""
        self.restart_for_update = True
        self.stop()

    def _publish_status(self) -> None:
        if self._mqtt is not None:
            self._mqtt.publish_status(encode(self._status("online")))

    def _set_user_ca(self, line: str) -> None:
        """A verified request named a new user CA: persist it, then use it at once."""
        if line == self.user_ca:
            return
        if not valid_user_ca(line):
            raise OSError(errno.EINVAL, "not a valid ssh-ed25519 key")
        store_user_ca(self.config.state_dir, line)
        log.info("SSH user CA is now %s (was %s)", line[:40] + "...",
                 (self.user_ca[:40] + "...") if self.user_ca else "none")
        self.user_ca = line
        if self._sshd is not None:
            self._sshd.set_user_ca(line)
        self._publish_for_sshd()
        self._publish_status()

    def _publish_for_sshd(self) -> None:
        """ssh_target = "sshd": the CA and principals for the device's own OpenSSH."""
        if self.config.ssh_target != "sshd" or self.token is None:
            return
        try:
            publish_for_sshd(self.config.state_dir, self.token.device, self.user_ca)
        except OSError as exc:  # certificates then fail at sshd; the agent goes on
            log.error("cannot write the SSH user CA for sshd under %s: %s",
                      self.config.state_dir, exc)

    def _on_connected(self, up: bool) -> None:
        log.debug("broker connection %s", "up" if up else "down")
        if up and self.audit is not None:
            self.audit.kick()
        if up and self.updater is not None and self._loop is not None:
            # a new agent on trial commits once the broker acknowledged it
            self._loop.call_soon_threadsafe(self.updater.on_online)

    def _respond(self, resp: Response) -> None:
        if self._mqtt is not None:
            self._mqtt.publish(resp_topic(resp.device), encode(resp))

    def _on_port(self, port: Optional[int]) -> None:
        log.info("tunnel port now %s", port if port is not None else "closed")
        self._publish_status()

    async def _target(self) -> Tuple[str, int]:
        cfg = self.config
        if cfg.ssh_target == "sshd":
            return "127.0.0.1", cfg.sshd_port
        if self._sshd is None:
            import asyncssh

            from .sshd import BuiltinSSHServer

            assert self.token is not None
            try:
                key = asyncssh.read_private_key(str(cfg.host_key_path))
            except (OSError, asyncssh.KeyImportError, ValueError) as exc:
                raise AgentError(f"host key {cfg.host_key_path} is unreadable: {exc}") from None
            line = " ".join(key.export_public_key().decode().split()[:2])
            if line != self.host_key_line:
                # someone replaced the key under us: announce the key actually served
                log.error("host key %s does not match its .pub file; announcing the key "
                          "in use (the manager will refuse it if it pinned the old one)",
                          cfg.host_key_path)
                self.host_key_line = line
                self._publish_status()
            self._sshd = BuiltinSSHServer(
                key,
                asyncssh.import_public_key(self.token.manager_key),
                allow_forward_hosts=cfg.allow_forward_hosts, shell=cfg.shell,
                window=cfg.ssh_window, keepalive=cfg.tunnel_keepalive,
                audit=self.audit, device=self.token.device,
                record_failure=cfg.record_failure, user_ca=self.user_ca,
            )
            await self._sshd.start()
        return "127.0.0.1", self._sshd.port

    async def _make_link(self) -> TunnelLink:
        from .link import TunnelLink

        assert self.token is not None
        cfg = self.config
        return TunnelLink(self.token, await self._target(), on_port=self._on_port,
                          keepalive=cfg.tunnel_keepalive, window=cfg.ssh_window,
                          backoff=Backoff(cfg.reconnect_min, min(cfg.reconnect_max, 60.0)),
                          proxy_setting=cfg.proxy)


def _update_key(cfg: AgentConfig) -> Optional[str]:
    """The pinned update key: the config's, else the image's pin file, else none."""
    if cfg.update_key:
        return cfg.update_key.strip()
    try:
        line = (cfg.pins_dir / "update_key.pub").read_text().strip()
    except OSError:
        return None
    return line or None

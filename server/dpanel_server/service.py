"""Long-running server processes: ``tunnel run``, ``manager run`` and the all-in-one stack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Optional

import uvicorn

from ._files import ensure_secret
from ._httpguard import guarded_h11
from ._sdnotify import notify, watchdog_loop
from .api import create_app
from .brokerauth import broker_auth_secret_path, create_auth_app
from .config import TUNNEL_METRICS_PORT, ServerConfig, _hostport
from .errors import BrokerError, UnknownDevice
from .manager import Manager
from .metrics import register_tunnel_metrics, serve_metrics
from .registry import Registry
from .tunnel import TunnelServer, TunnelSettings
from .tunnelctl import TunnelControl, control_path, serve_control

__all__ = ["run_manager", "run_services", "run_tunnel", "watch_revocations"]

log = logging.getLogger("dpanel.service")

#: The API's limits (see :mod:`dpanel_server._httpguard`): each request must arrive
#: within API_REQUEST_TIMEOUT s; at most API_MAX_WAITING connections may be waiting for
#: theirs (the longest-waiting is closed beyond); API_LIMIT_CONCURRENCY requests in service.
API_REQUEST_TIMEOUT = 30.0
API_MAX_WAITING = 256
API_LIMIT_CONCURRENCY = 2048


def registry_allows(registry: Registry) -> Callable[[str], bool]:
    """The tunnel's check at every forward request: enrolled, and not revoked."""
    def allowed(device: str) -> bool:
        try:
            return not registry.get(device).revoked
        except UnknownDevice:
            return False
    return allowed


async def watch_revocations(registry: Registry, tunnel: TunnelServer,
                            interval: float = 1.0) -> None:
    """Kick revoked (or deleted) devices off the tunnel: the fallback behind the
    manager's push (``kick``, over the control socket when the manager is another
    process) and the registry check at every forward request. One indexed row read per
    second is the cheapest portable signal (SQLite and PostgreSQL alike). Every
    authenticated device is checked, not only those with a forward: one that logged in
    before the revoke must not keep its session to ask for a forward later."""
    seen = -1
    failing = False
    while True:
        try:
            rev = await asyncio.to_thread(registry.revision)
            if rev != seen:
                seen = rev
                active = {d.id for d in await asyncio.to_thread(registry.devices, False)}
                for device in sorted(tunnel.devices() - active):
                    log.warning("kicking revoked device %s off the tunnel", device)
                    tunnel.kick(device)
            if failing:
                failing = False
                log.warning("revocation watch: the registry answers again")
        except Exception:  # a locked/busy/stopped DB must not kill the tunnel
            if not failing:  # once per outage, not once a second
                log.exception("revocation watch failed; retrying every %g s", interval)
            failing = True
        await asyncio.sleep(interval)


def _tunnel_settings(cfg: ServerConfig) -> TunnelSettings:
    # the sticky map lets devices get their old port back across a tunnel restart
    return TunnelSettings.from_config(
        cfg.tunnel, sticky_path=Path(cfg.state_dir) / "tunnel-ports.json")


def _wait_for_signal() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_tunnel(cfg: ServerConfig) -> None:
    """The tunnel alone (the appliance's dpanel-tunnel.service), with its control socket
    for the manager in the other process."""
    registry = Registry(cfg.registry_url)
    tunnel = TunnelServer(_tunnel_settings(cfg), registry.verify,
                          allowed=registry_allows(registry))
    await tunnel.start()
    register_tunnel_metrics(tunnel)
    metrics_srv = None
    if cfg.tunnel.metrics_listen:
        host, port = _hostport(cfg.tunnel.metrics_listen, "tunnel.metrics_listen",
                               TUNNEL_METRICS_PORT)
        metrics_srv = await serve_metrics(host, port, registry.db)
        log.info("tunnel metrics on http://%s/metrics (readiness: /ready)",
                 cfg.tunnel.metrics_listen)
    control = await serve_control(tunnel, control_path(cfg.state_dir))
    stop = _wait_for_signal()
    tasks = [asyncio.create_task(watch_revocations(registry, tunnel)),
             asyncio.create_task(watchdog_loop())]
    log.info("tunnel listening on %s, ports %s", cfg.tunnel.listen, cfg.tunnel.port_range)
    notify("READY=1\nSTATUS=tunnel up")
    await stop.wait()
    notify("STOPPING=1")
    for t in tasks:
        t.cancel()
    control.close()
    if metrics_srv is not None:
        metrics_srv.close()
    await tunnel.close()
    registry.close()


class _ApiServer(uvicorn.Server):
    """uvicorn, minus its signal handling: it re-raises SIGTERM after shutting down, which
    kills the process before our own cleanup (closing devices' tunnels, stopping the
    stack's broker) can run. We stop it ourselves instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_api(cfg: ServerConfig, manager: Manager,
                     tunnel: Optional[TunnelServer]) -> None:
    host, port = _hostport(cfg.manager.api_listen, "manager.api_listen", 8780)
    app = create_app(manager, ensure_secret(cfg.manager.admin_token_file))
    server = _api_server(app, host, port)
    servers = [server]
    if cfg.manager.https_listen is not None:
        # the same app over HTTPS, for operators anywhere (manager.https_listen)
        from .https_listener import https_files

        cert, key = await asyncio.to_thread(https_files, cfg)
        h_host, h_port = _hostport(cfg.manager.https_listen, "manager.https_listen", 443)
        servers.append(_api_server(app, h_host, h_port, ssl_certfile=cert, ssl_keyfile=key,
                                   cls=_HttpsServer))
        log.info("manager API over HTTPS on https://%s:%d", h_host, h_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop_all, servers)
    tasks = [asyncio.create_task(watchdog_loop())]
    if tunnel is not None:
        tasks.append(asyncio.create_task(watch_revocations(manager.registry, tunnel)))

    tasks.append(asyncio.create_task(_ready(manager, server, f"http://{host}:{port}")))
    for t in tasks:
        t.add_done_callback(_log_crash)
    try:
        # returns once a signal set should_exit (or one listener failed to start)
        await asyncio.gather(*(s.serve() for s in servers))
    finally:
        _stop_all(servers)
        notify("STOPPING=1")
        for t in tasks:
            t.cancel()


def _stop_all(servers: list[uvicorn.Server]) -> None:
    for s in servers:
        s.should_exit = True


class _HttpsServer(_ApiServer):
    """The public HTTPS listener: our own accept loop with a TLS handshake deadline and
    a bounded pre-handshake set (:mod:`._tlsgate`) instead of asyncio's create_server."""

    async def startup(self, sockets: Optional[list[socket.socket]] = None) -> None:
        from ._tlsgate import TlsGateServer, listen_socket

        config = self.config
        assert config.ssl is not None
        await self.lifespan.startup()

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state,
                app_state=self.lifespan.state)

        try:
            sock = listen_socket(config.host, config.port, config.backlog)
        except OSError as exc:
            log.error("manager.https_listen %s:%d: %s", config.host, config.port,
                      exc.strerror)
            self.should_exit = True
            return
        gate = TlsGateServer(sock, config.ssl, protocol)
        gate.start()
        # uvicorn's shutdown only calls close() and wait_closed() on these
        self.servers = [gate]  # type: ignore[list-item]
        self.started = True


def _api_server(app: object, host: str, port: int, cls: type[_ApiServer] = _ApiServer,
                **ssl: str) -> uvicorn.Server:
    return cls(uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", access_log=False,  # type: ignore[arg-type]
        # uvicorn has no request-read deadline: without this a slowloris client holds its
        # connection forever and limit_concurrency then turns away /v1/health (503)
        http=guarded_h11(request_timeout=API_REQUEST_TIMEOUT, max_waiting=API_MAX_WAITING),
        # requests in service at once (exec streams included); far above max_waiting, so
        # connections still sending their request can never fill it
        limit_concurrency=API_LIMIT_CONCURRENCY,
        timeout_keep_alive=5,                     # idle keep-alive connections, seconds
        # the audit's source is the socket's peer: never an X-Forwarded-For a client
        # (on loopback, which uvicorn trusts by default) made up
        proxy_headers=False,
        h11_max_incomplete_event_size=16 * 1024,  # request line + headers, bytes
        backlog=1024,
        **ssl,  # type: ignore[arg-type]
    ))


@contextlib.asynccontextmanager
async def _broker_auth(cfg: ServerConfig) -> AsyncIterator[None]:
    """broker.auth = "http": answer the broker *before* the manager dials it (its own
    login is asked of us too), until the manager is closed."""
    if cfg.broker.auth != "http":
        yield
        return
    server = _broker_auth_server(cfg)
    task = asyncio.create_task(server.serve())
    task.add_done_callback(_log_crash)
    while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn's flag)
        await asyncio.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _broker_auth_server(cfg: ServerConfig) -> uvicorn.Server:
    """broker.auth = "http": the broker's own listener (see :mod:`.brokerauth`), with its
    own registry connection (the broker asks on every login)."""
    host, port = _hostport(cfg.broker.auth_listen, "broker.auth_listen", 8884)
    registry = Registry(cfg.registry_url)
    app = create_auth_app(ensure_secret(broker_auth_secret_path(cfg)), cfg.broker.username,
                          ensure_secret(cfg.broker.password_file), registry.verify)
    return _ApiServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                     lifespan="off", access_log=False,
                                     timeout_keep_alive=30))


def _log_crash(task: asyncio.Task[None]) -> None:
    # a helper task must never die silently: say what and where, with the traceback
    if not task.cancelled() and task.exception() is not None:
        log.error("bug: %s failed", task.get_coro(), exc_info=task.exception())


async def _ready(manager: Manager, server: uvicorn.Server, url: str) -> None:
    """READY=1 means: the API answers *and* the manager is on the broker (systemd's
    TimeoutStartSec bounds the wait, then Restart= tries again). Afterwards STATUS=
    follows the broker connection, so `systemctl status` shows a lost broker."""
    while not server.started:  # noqa: ASYNC110 (uvicorn exposes only a flag)
        await asyncio.sleep(0.05)
    log.info("manager API on %s", url)
    broker = manager.cfg.broker.url
    notify(f"STATUS=waiting for the broker at {broker}")
    while True:
        try:
            await manager.wait_broker(10)
            break
        except BrokerError:
            log.warning("still waiting for the broker at %s", broker)
    notify("READY=1\nSTATUS=manager up")
    up = True
    while True:
        await asyncio.sleep(2)
        now = manager.broker_connected()
        if now != up:
            up = now
            notify("STATUS=manager up" if up else f"STATUS=broker unreachable at {broker}")


async def run_manager(cfg: ServerConfig) -> None:
    """The manager alone (dpanel-manager.service): it reaches the tunnel, another process,
    over the control socket, so revocation is pushed and ports are the tunnel's own."""
    ctl = TunnelControl(control_path(cfg.state_dir))
    manager = Manager(cfg, kick=ctl.kick, tunnel_sessions=ctl.sessions,
                      tunnel_stats=ctl.stats)
    async with _broker_auth(cfg):
        await manager.start()
        try:
            await _serve_api(cfg, manager, None)
        finally:
            await manager.close()


async def run_services(cfg: ServerConfig) -> None:
    """Tunnel + manager + API in one process (the stack; the broker runs beside it)."""
    registry = Registry(cfg.registry_url)
    tunnel = TunnelServer(_tunnel_settings(cfg), registry.verify,
                          allowed=registry_allows(registry))
    await tunnel.start()
    register_tunnel_metrics(tunnel)
    manager = Manager(cfg, kick=tunnel.kick, tunnel_sessions=tunnel.sessions,
                      tunnel_stats=tunnel.stats)
    async with _broker_auth(cfg):
        await manager.start()
        edge = None
        if cfg.edge.listen:
            from .edge import edge_from_config

            edge = edge_from_config(cfg)
            await edge.start()
        try:
            await _serve_api(cfg, manager, tunnel)
        finally:
            if edge is not None:
                await edge.close()
            await manager.close()
            await tunnel.close()
            registry.close()

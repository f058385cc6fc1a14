"""A tunnel server on its own host (``dpanel tunnel serve --manager URL``), apart from the manager.

What it adds to :class:`~.tunnel.TunnelServer`:

* a heartbeat to the manager's API every few seconds, under the secret that ``dpanel
  tunnel-server add NAME`` printed: public address, host key, the loopback address of
  its device ports, capacity (its port pool) and load (devices holding a port), and each
  device's port. The answer names the manager key to trust (or ``--manager-key`` pins it);
* the manager's SSH login (:data:`~.tunnel.MANAGER_USER`, that key only), whose session
  channels run control commands, one JSON request per exec (as the control socket's,
  see :mod:`.tunnelctl`: kick, sessions, devices, stats), and whose direct-tcpip reaches
  only ports this server allocated, on its own bind address;
* devices are authenticated against the registry URL (PostgreSQL on another host);
  revocations are pushed by the manager over its SSH connection (at once, and reconciled
  whenever it reconnects); the registry is re-read at every forward request, and its
  revision is polled every ``SAFETY_POLL`` s only as a slow safety net.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import asyncssh

from dpanel_proto.wire import printable

from .registry import Registry
from .tunnel import TunnelServer, TunnelSettings
from .tunnelctl import _answer

__all__ = ["SAFETY_POLL", "RemoteOptions", "heartbeat_body", "run_remote_tunnel"]

log = logging.getLogger("dpanel.tsrv")

#: The revision poll behind the manager's push (seconds): a safety net only.
SAFETY_POLL = float(os.environ.get("DPANEL_TUNNEL_SAFETY_POLL") or 30)


class ControlSession(asyncssh.SSHServerSession[str]):
    """One control command of the manager: the exec'd command is the JSON request."""

    def __init__(self, tunnel: TunnelServer) -> None:
        self._tunnel = tunnel
        self._chan: Optional[asyncssh.SSHServerChannel[str]] = None
        self._command = ""

    def connection_made(self, chan: asyncssh.SSHServerChannel[str]) -> None:
        self._chan = chan

    def shell_requested(self) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        if len(command) > 4096:
            return False
        self._command = command
        return True

    def session_started(self) -> None:
        chan = self._chan
        assert chan is not None
        answer = _answer(self._tunnel, self._command.encode())
        if answer.get("ok") and "kicked" in answer:  # only a well-formed kick has it
            log.warning("manager kicked device %s", printable(str(
                json.loads(self._command).get("device"))[:63]))
        chan.write(json.dumps(answer) + "\n")
        chan.exit(0)


@dataclass(frozen=True)
class RemoteOptions:
    manager_url: str
    name: str
    secret: str
    #: host:port the devices (and the manager) dial
    public: str
    manager_key: Optional[str] = None
    #: PEM file of the CA the manager's HTTPS certificate is checked against
    manager_ca: Optional[str] = None
    #: HOST:PORT of this process's /metrics and /ready (None: off)
    metrics_listen: Optional[str] = None


def heartbeat_body(tunnel: TunnelServer, public: str) -> dict[str, Any]:
    s = tunnel.settings
    sessions = tunnel.sessions()
    return {"public": public, "host_key": " ".join(tunnel.host_key_line().split()[:2]),
            "bind_host": s.bind_host, "capacity": s.port_max - s.port_min + 1,
            "load": len(sessions), "devices": sessions}


def _post(url: str, secret: str, body: dict[str, Any],
          ctx: Optional[ssl.SSLContext] = None) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--manager: {url!r} is not an http(s):// URL")
    req = urllib.request.Request(  # noqa: S310 (http(s) only, checked above)
        url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {secret}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:  # noqa: S310 (checked above)
        answer = json.loads(resp.read())
    if not isinstance(answer, dict):
        raise ValueError("answer is not an object")
    return answer


async def heartbeat_loop(tunnel: TunnelServer, opts: RemoteOptions) -> None:
    url = f"{opts.manager_url.rstrip('/')}/v1/tunnel-servers/{opts.name}/heartbeat"
    if opts.manager_key:
        tunnel.manager_keys = [asyncssh.import_public_key(opts.manager_key)]
    failing = False
    interval = 5.0
    ctx = ssl.create_default_context(cafile=opts.manager_ca) if opts.manager_ca else None
    while True:
        try:
            answer = await asyncio.to_thread(_post, url, opts.secret,
                                             heartbeat_body(tunnel, opts.public), ctx)
            line = answer.get("manager_key")
            if not opts.manager_key and isinstance(line, str):
                key = asyncssh.import_public_key(line)
                if not tunnel.manager_keys or tunnel.manager_keys[0] != key:
                    log.info("trusting manager key %s", line.split()[1][:16] + "...")
                    tunnel.manager_keys = [key]
            interval = float(answer.get("interval") or interval)
            if failing:
                log.warning("heartbeat: the manager answers again")
            failing = False
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            log.error("heartbeat to %s refused: HTTP %d %s", url, exc.code, printable(detail))
            failing = True
        except (OSError, ValueError, asyncssh.Error) as exc:
            if not failing:
                log.warning("heartbeat to %s failed: %s", url, exc)
            failing = True
        await asyncio.sleep(interval)


async def run_remote_tunnel(settings: TunnelSettings, registry_url: str,
                            opts: RemoteOptions) -> None:
    """The tunnel server process for another host; runs until SIGTERM/SIGINT."""
    from .service import registry_allows, watch_revocations

    registry = Registry(registry_url)
    tunnel = TunnelServer(settings, registry.verify, allowed=registry_allows(registry))
    tunnel.control = lambda: ControlSession(tunnel)
    await tunnel.start()
    metrics_srv = None
    if opts.metrics_listen:
        from .config import TUNNEL_METRICS_PORT, _hostport
        from .metrics import register_tunnel_metrics, serve_metrics

        register_tunnel_metrics(tunnel)
        host, port = _hostport(opts.metrics_listen, "--metrics-listen", TUNNEL_METRICS_PORT)
        metrics_srv = await serve_metrics(host, port, registry.db)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(heartbeat_loop(tunnel, opts)),
             asyncio.create_task(watch_revocations(registry, tunnel, SAFETY_POLL))]
    log.info("tunnel server %s on %s:%d (public %s), device ports on %s; manager %s",
             opts.name, settings.listen_host, tunnel.port, opts.public, settings.bind_host,
             opts.manager_url)
    print(f"dpanel tunnel serve: {opts.name} listening on {opts.public}", flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    if metrics_srv is not None:
        metrics_srv.close()
    await tunnel.close()
    registry.close()


def read_secret(path: Path) -> str:
    return path.read_text().strip()

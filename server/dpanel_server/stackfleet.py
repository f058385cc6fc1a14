"""``stack up --tunnel-servers N``: N tunnel servers beside the stack, as on other hosts.

Each is a real ``dpanel tunnel serve`` process (the layout of a tunnel server on another
host), enrolled as ``ts-1`` ... ``ts-N`` with its secret in ``DIR/tunnel-servers/NAME``.
Server i listens on its own loopback address 127.0.0.(1+i) (or on the stack's public
host, on a port of its own) and binds its device ports on 127.0.0.(1+i), so no two share
a loopback address; each gets its own slice of the stack's port range. Its pid is in
``DIR/tunnel-servers/NAME/pid``; its ``/metrics`` on 127.0.0.(1+i) at the port in
``DIR/tunnel-servers/NAME/metrics_port``. A server that dies is not restarted: the manager places
its devices elsewhere and says it failed (tests kill one on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ._files import atomic_write
from .config import ServerConfig, _hostport
from .registry import Registry

__all__ = ["MAX_SERVERS", "run_stack_fleet"]

log = logging.getLogger("dpanel.stack")

MAX_SERVERS = 16


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _kept_port(path: Path, host: str) -> int:
    """A free port picked once and kept in ``path`` (the same one on every stack up)."""
    if path.exists():
        return int(path.read_text())
    port = _free_port(host)
    atomic_write(path, f"{port}\n", 0o600)
    return port


def _plan(cfg: ServerConfig, n: int) -> list[dict[str, str]]:
    lo, hi = cfg.tunnel.ports
    size = (hi - lo + 1) // n
    if size < 1:
        raise ValueError(f"--tunnel-servers: {n} servers cannot share {lo}-{hi}")
    listen_host, _ = _hostport(cfg.tunnel.listen, "tunnel.listen", 2220)
    public_host, _ = _hostport(cfg.tunnel.public_address, "tunnel.public_address", 2220)
    loopback = listen_host.startswith("127.")
    base = Path(cfg.state_dir) / "tunnel-servers"
    plans = []
    for i in range(1, n + 1):
        name = f"ts-{i}"
        d = base / name
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        bind = f"127.0.0.{1 + i}"
        host = bind if loopback else listen_host
        port = _kept_port(d / "port", host if host != "0.0.0.0" else "127.0.0.1")
        metrics = _kept_port(d / "metrics_port", bind)
        plans.append({"name": name, "dir": str(d), "listen": f"{host}:{port}",
                      "metrics": f"{bind}:{metrics}",
                      "public": f"{bind if loopback else public_host}:{port}", "bind": bind,
                      "ports": f"{lo + (i - 1) * size}-{lo + i * size - 1}"})
    return plans


def _enrol(cfg: ServerConfig, plans: list[dict[str, str]]) -> None:
    from .fleet import add_server

    registry = Registry(cfg.registry_url)
    try:
        for p in plans:
            secret_file = Path(p["dir"]) / "secret"
            if secret_file.exists():
                continue
            # a re-made directory over an old registry: enrol afresh
            with contextlib.suppress(Exception):
                registry.db.execute("DELETE FROM tunnel_servers WHERE name = ?", (p["name"],))
            atomic_write(secret_file, add_server(registry, p["name"]) + "\n", 0o600)
    finally:
        registry.close()


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    from .stack import _child_setup  # PR_SET_PDEATHSIG: never outlive a SIGKILLed stack

    with log_path.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_child_setup)


async def run_stack_fleet(cfg: ServerConfig, n: int) -> None:
    """Start the N servers and keep them until cancelled (then SIGTERM, SIGKILL)."""
    if not 1 <= n <= MAX_SERVERS:
        raise ValueError(f"--tunnel-servers: {n} is not 1-{MAX_SERVERS}")
    plans = _plan(cfg, n)
    await asyncio.to_thread(_enrol, cfg, plans)
    api_host, api_port = _hostport(cfg.manager.api_listen, "manager.api_listen", 8780)
    if api_host in ("0.0.0.0", ""):
        api_host = "127.0.0.1"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for p in plans:
            d = Path(p["dir"])
            argv = [sys.executable, "-m", "dpanel_server.cli", "tunnel", "serve",
                    "--manager", f"http://{api_host}:{api_port}", "--name", p["name"],
                    "--secret-file", str(d / "secret"), "--registry", cfg.registry_url,
                    "--listen", p["listen"], "--public", p["public"],
                    "--bind-host", p["bind"], "--ports", p["ports"], "--state-dir", str(d),
                    "--metrics-listen", p["metrics"]]
            # on the loop's own thread: the death signal follows the thread that forked
            proc = _spawn(argv, d / "tunnel.log")
            procs.append(proc)
            atomic_write(d / "pid", f"{proc.pid}\n", 0o644)
            log.info("tunnel server %s on %s (device ports %s on %s), log %s", p["name"],
                     p["public"], p["ports"], p["bind"], d / "tunnel.log")
        alive = set(range(len(procs)))
        while True:
            await asyncio.sleep(1)
            for i in sorted(alive):
                code = procs[i].poll()
                if code is not None:
                    alive.discard(i)
                    log.warning("tunnel server %s exited with %s (not restarted)",
                                plans[i]["name"], code)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()

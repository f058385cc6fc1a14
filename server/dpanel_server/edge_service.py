"""``dpanel edge run``: the one-port TLS edge as a process of its own (dpanel-edge.service).

The stack runs the edge inside its single process; the appliance runs it apart, so that
only this small splice process (it holds the edge's TLS key and nothing else) gets the
public port and, for a port below 1024, CAP_NET_BIND_SERVICE, while the manager (which
holds the keys to every device) keeps its loopback-only sandbox.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from ._sdnotify import notify, watchdog_loop
from .config import ServerConfig
from .edge import edge_from_config
from .errors import ConfigError

__all__ = ["run_edge"]

log = logging.getLogger("dpanel.edge")


async def run_edge(cfg: ServerConfig) -> None:
    if not cfg.edge.listen:
        raise ConfigError(f"{cfg.source}: edge.listen is not set (dpanel-configure "
                          "--edge-listen HOST:PORT)")
    edge = edge_from_config(cfg)
    await edge.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    dog = asyncio.create_task(watchdog_loop())
    notify(f"READY=1\nSTATUS=edge on {cfg.edge.listen} for {cfg.edge.public_address}")
    try:
        await stop.wait()
    finally:
        notify("STOPPING=1")
        dog.cancel()
        await edge.close()

"""A bare ``TunnelServer`` in its own process, so its RSS and CPU are its own.

``python -m tests.bench.tunnel_proc --key K --ports LO-HI`` prints
``{"port": P, "pid": N}`` once it listens, then answers JSON lines on stdin
(``{"cmd": "stats"}``) until stdin closes. Any password is accepted: the bench measures
the tunnel, not the registry.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dpanel_server.tunnel import TunnelServer, TunnelSettings

__all__ = ["main"]


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _serve(args: argparse.Namespace) -> None:
    lo, _, hi = args.ports.partition("-")
    settings = TunnelSettings(host_key_path=Path(args.key), listen_host="127.0.0.1",
                              listen_port=0, port_min=int(lo), port_max=int(hi),
                              keepalive_interval=args.keepalive,
                              max_unauthenticated=args.max_unauth, login_timeout=120)
    server = TunnelServer(settings, lambda _device, _secret: True)
    await server.start()
    _emit({"port": server.port, "pid": os.getpid()})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line).get("cmd")
        if cmd == "gc":
            gc.collect()
        _emit({"stats": server.stats()})
    await server.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--key", required=True)
    p.add_argument("--ports", required=True)
    p.add_argument("--keepalive", type=float, default=600)
    p.add_argument("--max-unauth", type=int, default=1000)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

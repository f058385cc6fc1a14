"""Many device-like asyncssh clients, each holding one reverse forward, in their own process.

``python -m tests.bench.fwd_clients --port TUNNELPORT`` reads JSON lines on stdin:
``{"cmd": "open", "n": N, "target": PORT}`` dials N more connections, each asking for
``forward_remote_port('', 0, '127.0.0.1', PORT)`` exactly as the agent does, and answers
``{"ok": .., "failed": .., "ports": [...], "cipher": ..}``. Closing stdin closes them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import asyncssh

__all__ = ["dial_forward", "main"]


async def dial_forward(host: str, port: int, device: str, secret: str, target: int,
                       ciphers: Optional[list[str]] = None, window: int = 8 << 20
                       ) -> tuple[asyncssh.SSHClientConnection, int]:
    """One device: password login, then a remote forward on port 0 to ``target``, with
    the agent's options (dpanel_agent.link: 8 MiB window, no compression)."""
    opts: dict[str, Any] = {"window": window, "compression_algs": None}
    if ciphers:
        opts["encryption_algs"] = ciphers
    conn = await asyncssh.connect(host, port, username=device, password=secret,
                                  known_hosts=None, agent_path=None, config=None,
                                  client_keys=None, preferred_auth="password",
                                  keepalive_interval=0, **opts)
    try:
        listener = await conn.forward_remote_port("", 0, "127.0.0.1", target)
    except BaseException:
        conn.close()
        raise
    return conn, listener.get_port()


@dataclass
class _Opened:
    conns: list[asyncssh.SSHClientConnection] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _open_many(args: argparse.Namespace, n: int, target: int, first: int,
                     ciphers: Optional[list[str]]) -> _Opened:
    sem = asyncio.Semaphore(args.concurrency)
    out = _Opened()

    async def one(i: int) -> None:
        async with sem:
            try:
                conn, port = await dial_forward("127.0.0.1", args.port,
                                                f"{args.prefix}-{i:05d}", "x" * 43,
                                                target, ciphers, args.window)
            except (OSError, asyncssh.Error) as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}")
                return
            out.conns.append(conn)
            out.ports.append(port)

    await asyncio.gather(*(one(first + i) for i in range(n)))
    return out


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _run(args: argparse.Namespace) -> None:
    conns: list[asyncssh.SSHClientConnection] = []
    ciphers = args.cipher.split(",") if args.cipher else None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _emit({"pid": os.getpid()})
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        got = await _open_many(args, int(cmd.get("n", 0)), int(cmd.get("target", 9)),
                               len(conns), ciphers)
        conns += got.conns
        cipher = str(conns[-1].get_extra_info("send_cipher")) if conns else ""
        _emit({"ok": len(got.ports), "failed": len(got.errors), "errors": got.errors[:5],
               "ports": got.ports, "total": len(conns), "cipher": cipher})
    for conn in conns:
        conn.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", default="bench")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--window", type=int, default=8 << 20)
    p.add_argument("--cipher", default="", help="comma-separated encryption_algs")
    args = p.parse_args()
    logging.basicConfig(level="WARNING", stream=sys.stderr)
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()

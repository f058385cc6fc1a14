"""systemd readiness and watchdog notifications (Type=notify), without a dependency."""

from __future__ import annotations

import asyncio
import os
import socket

__all__ = ["notify", "watchdog_loop"]


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to $NOTIFY_SOCKET; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True


async def watchdog_loop() -> None:
    """Ping the watchdog at half its interval from the event loop itself, so a wedged
    loop (not just a dead process) gets restarted."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2e6)

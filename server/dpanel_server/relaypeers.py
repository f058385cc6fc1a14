"""Who is really behind a loopback connection the edge relays: relay address -> device address.

The TLS edge terminates a device's connection and opens a new one to the tunnel on
loopback, so the tunnel's ``peername`` is the edge's own socket (``127.x.y.z:port``),
not the device. The edge and the tunnel run in one process (``run_services``), so the
edge records, before it connects, which device address its relay socket stands for, and
the tunnel asks here by the peer address it sees.

Why a table in memory and not a PROXY-protocol header on the loopback hop: nothing a
device sends can reach it. A header would be bytes in the stream, which the tunnel
must then refuse from every peer but the edge (a device dialling the tunnel's own port
could send one); an entry here exists only while the edge holds the socket bound to that
exact address and port, which no other process can bind at the same time.
"""

from __future__ import annotations

import threading
from typing import Optional, Tuple

__all__ = ["RELAYS", "RelayPeers"]

Addr = Tuple[str, int]


class RelayPeers:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_relay: dict[Addr, Addr] = {}

    def add(self, relay: Addr, device: Addr) -> None:
        with self._lock:
            self._by_relay[relay] = device

    def discard(self, relay: Addr) -> None:
        with self._lock:
            self._by_relay.pop(relay, None)

    def lookup(self, peer: object) -> Optional[Addr]:
        """The device behind ``peer`` (a peername tuple), or None for a direct peer."""
        if not isinstance(peer, tuple) or len(peer) < 2:
            return None
        with self._lock:
            return self._by_relay.get((str(peer[0]), int(peer[1])))

    def __len__(self) -> int:
        return len(self._by_relay)


#: The process's one table (the edge writes, the tunnel reads).
RELAYS = RelayPeers()

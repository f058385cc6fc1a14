"""The manager's broker session, on the shared wrapper :mod:`dpanel_proto.mqtt`.

The manager's keepalive is short (``manager.mqtt_keepalive``, 10 s by default): paho
notices a stalled broker after at most two keepalives without an answer, and only then
does ``/v1/health`` say ``broker: false`` and requests fail at once instead of waiting.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Optional, Sequence

from dpanel_proto.mqtt import MqttSession, SessionSpec
from dpanel_proto.util import Backoff

__all__ = ["ManagerMqtt"]


class ManagerMqtt(MqttSession):
    """One persistent connection with jittered reconnect; callbacks run on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, username: str,
                 password: str, subscriptions: Sequence[str],
                 on_message: Callable[[str, bytes], None],
                 on_connected: Optional[Callable[[bool], None]] = None,
                 tls: bool = False, tls_ca: Optional[str] = None,
                 keepalive: int = 10,
                 alternates: Sequence[tuple[str, int]] = (),
                 client_id: str = "") -> None:
        # A manager does not need the agents' long backoff: it is one client, and the
        # API answers "broker unreachable" meanwhile. 1-3 s first, at most 30 s.
        super().__init__(loop, SessionSpec(
            host=host, port=port, username=username, password=password,
            keepalive=keepalive, backoff=Backoff(2.0, 30.0), who="the manager",
            client_id=client_id,
            tls=tls, ca_file=tls_ca, subscriptions=tuple(subscriptions),
            max_queued=10000, alternates=tuple(alternates),
            subscribe_qos=0 if alternates else 1,  # a cluster: see SessionSpec
        ), on_message=on_message, on_connected=on_connected)

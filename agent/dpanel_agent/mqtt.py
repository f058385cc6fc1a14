"""The agent's one MQTT session: presence (retained status + last will) and the request
subscription, on top of the shared wrapper :mod:`dpanel_proto.mqtt`.

What is the agent's own here: the client id / username is the device id (the broker ACL
is written against ``%u``, and a second copy of the agent takes the session over instead
of doubling it), the last will is the offline status, and only the device's request
topic is handed on.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Callable, Optional

from dpanel_proto.mqtt import MqttSession, SessionSpec
from dpanel_proto.ratelog import RateLimitedLog
from dpanel_proto.token import DeviceToken
from dpanel_proto.util import Backoff, parse_hostport
from dpanel_proto.wire import req_topic, status_topic

from .netpath import mqtt_endpoint

__all__ = ["AgentMqtt"]

log = logging.getLogger("dpanel.agent.mqtt")


class AgentMqtt(MqttSession):
    """``publish_status`` sets the retained presence payload, re-published on every
    (re)connect; ``on_request`` gets raw request payloads on the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, token: DeviceToken, *,
                 offline_payload: bytes, keepalive: int, protocol: str,
                 backoff: Backoff, on_request: Callable[[bytes], object],
                 on_connected: Callable[[bool], None],
                 proxy_setting: Optional[str] = None) -> None:
        ep = self.endpoint = mqtt_endpoint(token, proxy_setting)
        self.tls = ep.tls
        host, port = ep.host, ep.port
        alternates: list[tuple[str, int]] = []
        urls = token.broker_urls
        if not token.edge and len(urls) > 1:
            brokers = [parse_hostport(u.split("://", 1)[1], "token broker",
                                      8883 if self.tls else 1883) for u in urls]
            # a cluster: each device starts on "its" node (stable per device id, so a
            # fleet spreads evenly and a restarted agent goes back where it was), then
            # fails over
            first = zlib.crc32(token.device.encode()) % len(brokers)
            (host, port), *alternates = brokers[first:] + brokers[:first]
        self._token = token
        self._req_topic = req_topic(token.device)
        self._on_request = on_request
        self._rl = RateLimitedLog(log)
        super().__init__(loop, SessionSpec(
            host=host, port=port, username=token.device, password=token.secret,
            keepalive=keepalive, backoff=backoff, who=f"device {token.device}",
            tls=self.tls, ca_data=token.broker_ca, protocol=protocol,
            subscriptions=(self._req_topic,),
            will=(status_topic(token.device), offline_payload),
            retained_topic=status_topic(token.device), proxy=ep.proxy, alpn=ep.alpn,
            alternates=tuple(alternates),
            subscribe_qos=0 if alternates else 1,  # a cluster: see SessionSpec
        ), on_message=self._on_topic, on_connected=on_connected)

    @property
    def status(self) -> bytes:
        return self.retained

    def _publish_failed(self, topic: str, why: str) -> None:
        # rate-limited: a full send queue fails every publish for a while
        self._rl.warning(f"publish on {topic}", "publish on %s failed: %s", topic, why)

    def publish_status(self, payload: bytes) -> None:
        self.publish_retained(payload)

    def _on_topic(self, topic: str, payload: bytes) -> None:
        if topic == self._req_topic:
            self._on_request(payload)

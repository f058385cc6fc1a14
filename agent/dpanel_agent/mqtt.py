"""The agent's one MQTT connection: presence (retained status + last will), the request
subscription, and reconnection with jittered exponential backoff, forever.

paho runs its network loop in its own thread; everything it reports is handed to the
asyncio loop with ``call_soon_threadsafe``, so the rest of the agent is single-threaded.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from typing import Any, Callable, Optional, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from dpanel_proto.token import DeviceToken
from dpanel_proto.util import Backoff, parse_hostport
from dpanel_proto.wire import req_topic, status_topic

from .ratelog import RateLimitedLog

__all__ = ["AgentMqtt"]

log = logging.getLogger("dpanel.agent.mqtt")

#: A connection that lived this long resets the backoff (a broker that accepts and then
#: drops us at once must not be hammered).
_STABLE_AFTER = 30.0


def _secs(value: float) -> int:
    """paho annotates delays as int but only adds them to time.time(): fractions work,
    and sub-second jitter is what spreads a herd of reconnecting devices."""
    return cast(int, value)


class AgentMqtt:
    """Owns the paho client. ``status`` is the retained presence payload, re-published on
    every (re)connect; ``on_request`` gets raw request payloads on the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, token: DeviceToken, *,
                 offline_payload: bytes, keepalive: int, protocol: str,
                 backoff: Backoff, on_request: Callable[[bytes], object],
                 on_connected: Callable[[bool], None]) -> None:
        self._loop = loop
        self._token = token
        self._on_request = on_request
        self._on_connected = on_connected
        self._backoff = backoff
        self._rl = RateLimitedLog(log)
        self._keepalive = keepalive
        self._connected_at = 0.0
        self._stopping = False
        self.connected = threading.Event()
        self.status = b""
        # (store + publish) of the presence must be atomic w.r.t. on_connect's publish,
        # or a reconnect racing a port change could leave a stale retained status.
        self._status_lock = threading.Lock()
        scheme, rest = token.broker.split("://", 1)
        self.tls = scheme == "mqtts"
        self.host, self.port = parse_hostport(rest, "token broker", 8883 if self.tls else 1883)
        self._req_topic = req_topic(token.device)
        self._status_topic = status_topic(token.device)
        v5 = protocol == "5"
        # client id == username == device id: the broker ACL is written against %u and
        # enforces use_username_as_clientid, and a second copy of the agent takes over
        # the session instead of doubling it.
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=token.device,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        self._v5 = v5
        self._client.username_pw_set(token.device, token.secret)
        if self.tls:
            ctx = ssl.create_default_context()
            if token.broker_ca:
                ctx = ssl.create_default_context(cadata=token.broker_ca)
            self._client.tls_set_context(ctx)
        self._client.will_set(self._status_topic, offline_payload, qos=1, retain=True)
        self._client.max_queued_messages_set(100)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(_secs(backoff.lo), _secs(backoff.hi))

    # ------------------------------------------------------------------ control (asyncio)

    def start(self) -> None:
        kwargs: dict[str, Any] = {"keepalive": self._keepalive}
        if self._v5:
            kwargs["clean_start"] = True
        self._client.connect_async(self.host, self.port, **kwargs)
        self._client.loop_start()  # retries the first connection too, forever

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            # rate-limited: a full send queue fails every publish for a while
            self._rl.warning(f"publish on {topic}", "publish on %s failed: %s", topic,
                             mqtt.error_string(info.rc))

    def publish_status(self, payload: bytes) -> None:
        """Remember the presence payload and send it if connected (else on_connect will:
        a stale status queued while offline must not land after the fresh one)."""
        with self._status_lock:
            self.status = payload
            if self.connected.is_set():
                self.publish(self._status_topic, payload, retain=True)

    def stop(self, final_status: Optional[bytes] = None, timeout: float = 3.0) -> None:
        """Disconnect cleanly. A clean DISCONNECT suppresses the last will, so publish
        ``final_status`` (the offline presence) ourselves first. Blocking: call from a
        thread."""
        self._stopping = True
        if final_status is not None and self.connected.is_set():
            info = self._client.publish(self._status_topic, final_status, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass  # not connected any more: the will covers it
        self._client.disconnect()
        self._client.loop_stop()

    # ------------------------------------------------------------------ paho thread

    def _call(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # loop closed during shutdown

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: Any,
                    _p: object) -> None:
        if rc.is_failure:
            # e.g. bad username/password after a revoke: keep retrying (slowly), the
            # operator may re-enable the device; the reason is logged each time.
            log.error("broker %s:%s refused device %s: %s", self.host, self.port,
                      self._token.device, rc)
            return
        self._connected_at = time.monotonic()
        client.subscribe(self._req_topic, qos=1)
        with self._status_lock:
            self.connected.set()
            if self.status:
                client.publish(self._status_topic, self.status, qos=1, retain=True)
        log.info("connected to broker %s:%s%s as %s", self.host, self.port,
                 " (TLS)" if self.tls else "", self._token.device)
        self._call(self._on_connected, True)

    def _retry_later(self, client: mqtt.Client) -> float:
        if self._connected_at and time.monotonic() - self._connected_at > _STABLE_AFTER:
            self._backoff.reset()
        self._connected_at = 0.0
        delay = self._backoff.next()
        # reconnect_delay_set resets paho's own doubling, so its next wait is exactly ours
        client.reconnect_delay_set(_secs(delay), _secs(delay))
        return delay

    def _on_disconnect(self, client: mqtt.Client, _u: object, _f: object, rc: Any,
                       _p: object) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if self._stopping:
            return
        delay = self._retry_later(client)
        if was:
            log.warning("lost the broker connection (%s); reconnecting in %.1f s", rc, delay)
            self._call(self._on_connected, False)
        else:
            log.debug("broker connection closed (%s); retrying in %.1f s", rc, delay)

    def _on_connect_fail(self, client: mqtt.Client, _u: object) -> None:
        delay = self._retry_later(client)
        log.warning("cannot reach broker %s:%s; retrying in %.1f s", self.host, self.port, delay)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._req_topic:
            self._call(self._on_request, bytes(msg.payload))

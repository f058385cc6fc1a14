"""The manager's MQTT connection: paho in its own thread, messages handed to asyncio."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
from typing import Callable, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["ManagerMqtt"]

log = logging.getLogger("dpanel.manager.mqtt")


class ManagerMqtt:
    """One persistent connection with jittered reconnect; callbacks run on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, username: str,
                 password: str, subscriptions: list[str],
                 on_message: Callable[[str, bytes], None],
                 on_connected: Optional[Callable[[bool], None]] = None,
                 tls_ca: Optional[str] = None) -> None:
        self._loop = loop
        self._host, self._port = host, port
        self._subs = subscriptions
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self.connected = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username,
                                   clean_session=True)
        self._client.username_pw_set(username, password)
        if tls_ca:
            self._client.tls_set_context(ssl.create_default_context(cafile=tls_ca))
        self._client.max_queued_messages_set(10000)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 30)
        self._stopping = False

    def start(self) -> None:
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self._client.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            log.warning("publish on %s failed: %s", topic, mqtt.error_string(info.rc))

    # -- paho thread
    def _on_connect(self, client: mqtt.Client, _u: object, _f: object,
                    rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.error("broker %s:%s refused the manager: %s", self._host, self._port, rc)
            return
        for topic in self._subs:
            client.subscribe(topic, qos=1)
        self.connected.set()
        log.info("connected to broker %s:%s", self._host, self._port)
        if self._on_connected_cb:
            self._loop.call_soon_threadsafe(self._on_connected_cb, True)

    def _on_disconnect(self, client: mqtt.Client, _u: object, _f: object,
                       rc: ReasonCode, _p: object) -> None:
        self.connected.clear()
        if self._stopping:
            return  # our own disconnect at shutdown: nothing to report or retry
        # Jitter so that a restarted broker is not hit by every manager at once.
        delay = random.randint(1, 3)  # noqa: S311
        client.reconnect_delay_set(delay, 30)
        log.warning("lost broker connection (%s); reconnecting", rc)
        if self._on_connected_cb:
            self._loop.call_soon_threadsafe(self._on_connected_cb, False)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_message_cb, msg.topic, bytes(msg.payload))
        except RuntimeError:
            pass  # loop closed during shutdown

"""The one paho wrapper both sides use: paho's thread in, asyncio out, reconnect forever.

paho runs its network loop in its own thread; everything it reports is handed to the
asyncio loop with ``call_soon_threadsafe``, so the agent and the manager stay
single-threaded. Reconnects wait a jittered :class:`~dpanel_proto.util.Backoff` delay, so
thousands of devices (or several managers) behind a restarted broker do not come back in
the same second. A session may carry a last will and a retained "presence" payload that
is re-published on every (re)connect; the agent uses both, the manager neither.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .proxy import Proxy, ProxyError, open_connection
from .util import Backoff

__all__ = ["MqttSession", "SessionSpec"]

log = logging.getLogger("dpanel.mqtt")

#: A connection that lived this long resets the backoff (a broker that accepts and then
#: drops us at once must not be hammered).
STABLE_AFTER = 30.0


def _secs(value: float) -> int:
    """paho annotates delays as int but only adds them to time.time(): fractions work,
    and sub-second jitter is what spreads a herd of reconnecting clients."""
    return cast(int, value)


@dataclass(frozen=True)
class SessionSpec:
    """Who connects where, and how. ``who`` names the session in log lines."""

    host: str
    port: int
    username: str
    password: str
    keepalive: int
    backoff: Backoff
    who: str
    client_id: str = ""  # defaults to the username (the broker enforces it for devices)
    tls: bool = False
    ca_data: Optional[str] = None  # PEM text (the agent's token carries it)
    ca_file: Optional[str] = None  # a path (the manager's config names one)
    protocol: str = "3.1.1"  # or "5"
    subscriptions: Sequence[str] = ()
    #: (topic, payload) the broker publishes, retained, when the session dies unclean
    will: Optional[tuple[str, bytes]] = None
    #: topic of the retained presence payload (see :meth:`MqttSession.publish_retained`)
    retained_topic: Optional[str] = None
    max_queued: int = 100
    #: dial through this HTTP CONNECT proxy (see :mod:`dpanel_proto.proxy`)
    proxy: Optional[Proxy] = None
    #: TLS ALPN protocol to ask for (``dpanel-mqtt`` at a one-port edge)
    alpn: Optional[str] = None

    #: further (host, port) brokers of the same cluster: a failed attempt moves on to the
    #: next one (round robin), each after the usual jittered backoff
    alternates: Sequence[tuple[str, int]] = ()
    #: QoS of our subscriptions. 1 by default; 0 on a cluster: RabbitMQ 3.10 backs a QoS 1
    #: subscription with a *durable* queue homed on the node we were on, which makes the
    #: client id unusable on every other node once that node dies ("home node ... is
    #: down"). Sessions are clean, so QoS 1 bought nothing across a reconnect anyway, and
    #: within one TCP connection QoS 0 delivery is just as ordered and complete.
    subscribe_qos: int = 1

class _Client(mqtt.Client):
    """paho, with two hooks on its private socket factory (stable since paho 1.x; paho's
    own proxy support needs PySocks): dial through an HTTP CONNECT proxy, and resume the
    last TLS session on reconnect (a full handshake costs ~4 KB and two round trips on
    a metered link; a resumed one a fraction of that)."""

    dpanel_proxy: Optional[Proxy] = None
    #: why the last dial failed (a proxy's refusal), for the connect-fail log line
    dpanel_error = ""
    dpanel_session: Optional[ssl.SSLSession] = None

    def _create_socket_connection(self) -> socket.socket:
        self.dpanel_error = ""
        try:
            if self.dpanel_proxy is None:
                return super()._create_socket_connection()
            return open_connection(self.dpanel_proxy, self._host, self._port,
                                   self._connect_timeout)
        except ProxyError as exc:
            self.dpanel_error = str(exc)
            raise
        except OSError as exc:
            self.dpanel_error = exc.strerror or str(exc)
            raise

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        ctx = self._ssl_context
        assert ctx is not None and ctx.check_hostname
        try:
            sock = ctx.wrap_socket(tcp_sock, server_hostname=self._host,
                                   do_handshake_on_connect=False,
                                   session=self.dpanel_session)
        except ValueError:  # a session of another context: start afresh
            sock = ctx.wrap_socket(tcp_sock, server_hostname=self._host,
                                   do_handshake_on_connect=False)
        sock.settimeout(self._connect_timeout)
        try:
            sock.do_handshake()
        except ssl.SSLError as exc:
            self.dpanel_error = f"TLS handshake failed: {exc.reason or exc}"
            sock.close()
            raise
        return sock


class MqttSession:
    """One persistent MQTT session. ``on_message(topic, payload)`` and
    ``on_connected(up)`` run on ``loop``; ``connected`` is set while the broker has
    acknowledged us."""

    def __init__(self, loop: asyncio.AbstractEventLoop, spec: SessionSpec, *,
                 on_message: Callable[[str, bytes], object],
                 on_connected: Optional[Callable[[bool], None]] = None) -> None:
        self._loop = loop
        self.spec = spec
        self.host, self.port = spec.host, spec.port
        self._brokers = [(spec.host, spec.port), *spec.alternates]
        self._broker_idx = 0
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self._backoff = spec.backoff
        self._connected_at = 0.0
        self._stopping = False
        self.connected = threading.Event()
        self.retained = b""
        # (store + publish) of the presence must be atomic w.r.t. on_connect's publish,
        # or a reconnect racing a change could leave a stale retained payload.
        self._retained_lock = threading.Lock()
        self._v5 = spec.protocol == "5"
        self._client = _Client(
            CallbackAPIVersion.VERSION2, client_id=spec.client_id or spec.username,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else True,
        )
        self._client.username_pw_set(spec.username, spec.password)
        if spec.tls:
            if spec.ca_data:
                ctx = ssl.create_default_context(cadata=spec.ca_data)
            else:
                ctx = ssl.create_default_context(cafile=spec.ca_file)
            if spec.alpn:
                ctx.set_alpn_protocols([spec.alpn])
            self._client.tls_set_context(ctx)
        self._client.dpanel_proxy = spec.proxy
        if spec.will is not None:
            self._client.will_set(spec.will[0], spec.will[1], qos=1, retain=True)
        self._client.max_queued_messages_set(spec.max_queued)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        #: message id -> topic of our subscriptions awaiting their SUBACK
        self._subscribing: dict[int, str] = {}
        self._client.reconnect_delay_set(_secs(spec.backoff.lo), _secs(spec.backoff.hi))

    # ------------------------------------------------------------------ control (asyncio)

    def start(self) -> None:
        kwargs: dict[str, Any] = {"keepalive": self.spec.keepalive}
        if self._v5:
            kwargs["clean_start"] = True
        self._client.connect_async(self.host, self.port, **kwargs)
        self._client.loop_start()  # retries the first connection too, forever

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Queue a QoS 1 publish; False (logged) if paho refused it outright."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._publish_failed(topic, mqtt.error_string(info.rc))
            return False
        return True

    def publish_tracked(self, topic: str, payload: bytes) -> Optional[mqtt.MQTTMessageInfo]:
        """A QoS 1 publish whose ``is_published()`` tells when the broker acknowledged
        it; None if paho refused it outright (the caller keeps it and tries later)."""
        info = self._client.publish(topic, payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._publish_failed(topic, mqtt.error_string(info.rc))
            return None
        return info

    def _publish_failed(self, topic: str, why: str) -> None:
        """Log a refused publish (a subclass may rate-limit: a full send queue fails
        every publish for a while)."""
        log.warning("%s: publish on %s failed: %s", self.spec.who, topic, why)

    def publish_retained(self, payload: bytes) -> None:
        """Remember the presence payload and send it if connected (else on_connect will:
        a stale payload queued while offline must not land after the fresh one)."""
        assert self.spec.retained_topic is not None
        with self._retained_lock:
            self.retained = payload
            if self.connected.is_set():
                self.publish(self.spec.retained_topic, payload, retain=True)

    def stop(self, final: Optional[bytes] = None, timeout: float = 3.0) -> None:
        """Disconnect cleanly. A clean DISCONNECT suppresses the last will, so ``final``
        (the offline presence) is published on the retained topic first. Blocking: call
        from a thread."""
        self._stopping = True
        if final is not None and self.spec.retained_topic and self.connected.is_set():
            info = self._client.publish(self.spec.retained_topic, final, qos=1, retain=True)
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
            # operator may re-enable it; the reason is logged each time.
            log.error("broker %s:%s refused %s: %s", self.host, self.port, self.spec.who, rc)
            return
        self._connected_at = time.monotonic()
        sock = client.socket()
        if isinstance(sock, ssl.SSLSocket):
            # TLS 1.3 tickets arrive after the handshake: by CONNACK we have one
            self._client.dpanel_session = sock.session
        for topic in self.spec.subscriptions:
            _rc, mid = client.subscribe(topic, qos=self.spec.subscribe_qos)
            if mid is not None:
                self._subscribing[mid] = topic
        with self._retained_lock:
            self.connected.set()
            if self.retained and self.spec.retained_topic:
                client.publish(self.spec.retained_topic, self.retained, qos=1, retain=True)
        resumed = isinstance(sock, ssl.SSLSocket) and sock.session_reused
        log.info("connected to broker %s:%s%s%s as %s", self.host, self.port,
                 (" (TLS, resumed)" if resumed else " (TLS)") if self.spec.tls else "",
                 f" via {self.spec.proxy}" if self.spec.proxy else "", self.spec.who)
        if self._on_connected_cb is not None:
            self._call(self._on_connected_cb, True)

    def _retry_later(self, client: mqtt.Client, failed: bool = False) -> float:
        if self._connected_at and time.monotonic() - self._connected_at > STABLE_AFTER:
            self._backoff.reset()
        self._connected_at = 0.0
        if failed and len(self._brokers) > 1:
            # This broker refused or could not be reached: the next one of the cluster.
            # paho's public host setter refuses while a lost connection is being retried;
            # its reconnect() reads these two fields.
            self._broker_idx = (self._broker_idx + 1) % len(self._brokers)
            self.host, self.port = self._brokers[self._broker_idx]
            client._host, client._port = self.host, self.port
        delay = self._backoff.next()
        # reconnect_delay_set resets paho's own doubling, so its next wait is exactly ours
        client.reconnect_delay_set(_secs(delay), _secs(delay))
        return delay

    def _on_disconnect(self, client: mqtt.Client, _u: object, _f: object, rc: Any,
                       _p: object) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if self._stopping:
            return  # our own disconnect at shutdown: nothing to report or retry
        # a live connection that dropped is retried on the same broker first (a blip);
        # one that never came up (refused CONNACK) moves on
        delay = self._retry_later(client, failed=not was)
        if was:
            log.warning("%s lost the broker connection (%s); reconnecting in %.1f s",
                        self.spec.who, rc, delay)
            if self._on_connected_cb is not None:
                self._call(self._on_connected_cb, False)
        else:
            log.debug("broker connection closed (%s); retrying in %.1f s", rc, delay)

    def _on_connect_fail(self, client: mqtt.Client, _u: object) -> None:
        host, port = self.host, self.port
        delay = self._retry_later(client, failed=True)
        why = self._client.dpanel_error
        via = f" via {self.spec.proxy}" if self.spec.proxy else ""
        then = f" on {self.host}:{self.port}" if (host, port) != (self.host, self.port) else ""
        log.warning("%s cannot reach broker %s:%s%s%s; retrying%s in %.1f s", self.spec.who,
                    host, port, via, f": {why}" if why else "", then, delay)

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, codes: Any,
                      _p: object) -> None:
        # a refused subscription is silent otherwise: its messages just never come
        topic = self._subscribing.pop(mid, "?")
        for rc in codes:
            if getattr(rc, "is_failure", False):
                log.error("broker %s:%s refused %s's subscription to %s: %s", self.host,
                          self.port, self.spec.who, topic, rc)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self._call(self._on_message_cb, msg.topic, bytes(msg.payload))

"""MQTT request/response: the manager's broker session, signed requests, correlated answers.

A request never outlives its caller by more than seconds: it is signed to expire
``manager.lifetime`` after it was issued (request_timeout + 5 s by default). If the
device still acts on an open request after its caller gave up (it sat in a stalled
broker), the late ``ok`` answer is not dropped: the facade is told, and closes the
tunnel nobody is waiting for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import asyncssh

from dpanel_proto import wire
from dpanel_proto.signing import sign_request

from ._mqtt import ManagerMqtt
from .config import ServerConfig
from .errors import BrokerError, RequestTimeout
from .metrics import DEVICE_REQUESTS, label

__all__ = ["Requests", "client_id", "subscriptions"]

log = logging.getLogger("dpanel.manager")

#: An abandoned open request is remembered this long past its expiry (a device may accept
#: a request up to its clock-skew tolerance late), and at most this many of them.
_ABANDONED_GRACE = 150.0
_ABANDONED_MAX = 10000


#: The shared-subscription group of manager replicas (MQTT 5; Mosquitto 2 also grants it
#: to 3.1.1 clients, which the manager is).
SHARE_GROUP = wire.MANAGER_SHARE_GROUP


def client_id(cfg: ServerConfig) -> str:
    """One broker client id per replica: two sessions under one id kick each other off."""
    user = cfg.broker.username
    return f"{user}-{cfg.manager.replica}" if cfg.manager.replica else user


def shared(cfg: ServerConfig) -> bool:
    """Whether audit messages come through a shared subscription (see
    ``manager.shared_subscriptions``): auto = replicas on one broker that is not RabbitMQ
    (its HTTP auth backend, ``broker.auth = "http"``, and a cluster both mean RabbitMQ
    or another broker we cannot assume has them)."""
    mode = cfg.manager.shared_subscriptions
    if mode != "auto":
        return mode == "on"
    return (bool(cfg.manager.replica) and cfg.broker.auth != "http"
            and len(cfg.broker.host_ports) == 1)


def subscriptions(cfg: ServerConfig) -> list[str]:
    """Statuses and answers reach every replica (each keeps the whole fleet's presence
    from the retained statuses, and the replica that asked takes the answer by its id,
    which is MQTT 3.1.1-portable); audit records, which must be stored once, go to one
    replica when the broker shares subscriptions."""
    subs = list(wire.MANAGER_SUBSCRIPTIONS)
    if shared(cfg):
        subs = [f"$share/{SHARE_GROUP}/{t}" if t.endswith("/audit") else t for t in subs]
    return subs


@dataclass
class _Pending:
    device: str
    kind: wire.MsgType
    fut: asyncio.Future[wire.Response]


class Requests:
    """Owns the broker connection; routes incoming topics through a handler table.

    ``on_alive(device)`` runs for every well-formed answer from a device (proof that it
    is alive); ``on_late_open(device)`` when a device answers ``ok`` to an open request
    whose caller had given up.
    """

    def __init__(self, cfg: ServerConfig, key: asyncssh.SSHKey, password: str, *,
                 on_status: Callable[[str, bytes], None],
                 on_broker: Callable[[bool], None],
                 on_alive: Callable[[str], None] = lambda _d: None,
                 on_late_open: Callable[[str], None] = lambda _d: None,
                 on_audit: Optional[Callable[[str, bytes], None]] = None) -> None:
        self._cfg = cfg
        self._key = key
        self._password = password
        self._on_broker = on_broker
        self._on_alive = on_alive
        self._on_late_open = on_late_open
        self._pending: dict[str, _Pending] = {}
        #: request id -> (device, monotonic time after which it is forgotten)
        self._abandoned: dict[str, tuple[str, float]] = {}
        self._mqtt: Optional[ManagerMqtt] = None
        self._handlers: dict[str, Callable[[str, bytes], None]] = {
            "status": on_status,
            "resp": self._on_resp,
        }
        #: exact topic -> handler(topic, payload), outside the device tree (the broker's
        #: own control API, see :mod:`.dynsec`); subscribed too
        self.extra: dict[str, Callable[[str, bytes], None]] = {}
        if on_audit is not None:
            self._handlers["audit"] = on_audit

    def start(self) -> None:
        host, port = self._cfg.broker.host_port
        self._mqtt = ManagerMqtt(
            asyncio.get_running_loop(), host, port, self._cfg.broker.username,
            self._password, [*subscriptions(self._cfg), *self.extra], self._dispatch,
            client_id=client_id(self._cfg),
            on_connected=self._on_broker,
            tls=self._cfg.broker.url.startswith("mqtts://"), tls_ca=self._cfg.broker.ca_file,
            keepalive=self._cfg.manager.mqtt_keepalive,
            alternates=self._cfg.broker.host_ports[1:],
        )
        self._mqtt.start()

    async def stop(self) -> None:
        if self._mqtt:
            await asyncio.to_thread(self._mqtt.stop)

    def connected(self) -> bool:
        return bool(self._mqtt and self._mqtt.connected.is_set())

    async def wait_connected(self, timeout: float) -> None:
        assert self._mqtt is not None
        if not await asyncio.to_thread(self._mqtt.connected.wait, timeout):
            raise BrokerError(f"manager could not connect to the broker at "
                              f"{self._cfg.broker.url}")

    def publish(self, topic: str, payload: bytes) -> bool:
        return bool(self._mqtt and self.connected() and self._mqtt.publish(topic, payload))

    # -- in
    def _dispatch(self, topic: str, payload: bytes) -> None:
        extra = self.extra.get(topic)
        if extra is not None:
            extra(topic, payload)
            return
        try:
            device, kind = wire.parse_topic(topic)
        except wire.DecodeError as exc:
            log.warning("dropped message: %s", exc)
            return
        handler = self._handlers.get(kind)
        if handler is None:
            log.warning("dropped message on unexpected topic %s", wire.printable(topic))
            return
        try:
            handler(device, payload)
        except wire.DecodeError as exc:
            log.warning("dropped message on %s: %s", topic, exc)
        except Exception:  # a bug of ours, not the device's: say so, keep running
            log.exception("bug: the %s handler failed on a message from %s", kind, device)

    def _on_resp(self, device: str, payload: bytes) -> None:
        msg = wire.decode(payload)
        if not isinstance(msg, wire.Response) or msg.device != device:
            raise wire.DecodeError("device: response does not match its topic")
        self._on_alive(device)
        pending = self._pending.get(msg.id)
        if pending is not None and pending.device == device:
            if not pending.fut.done():
                pending.fut.set_result(msg)
            return
        abandoned = self._abandoned.get(msg.id)
        if abandoned is not None and abandoned[0] == device:
            del self._abandoned[msg.id]
            if msg.code == wire.ErrorCode.OK:
                log.warning("device %s answered open request %s after its caller had "
                            "given up", device, msg.id)
                self._on_late_open(device)
            return
        # with replicas, every answer reaches every replica: the others' are routine
        log.log(logging.DEBUG if self._cfg.manager.replica else logging.INFO,
                "unsolicited response %s from %s ignored", msg.id, device)

    # -- abandoned open requests
    def abandoned_open(self, device: str) -> bool:
        """Whether an open request to ``device`` went unanswered while its caller waited
        (the device may still act on it)."""
        self._prune()
        return any(d == device for d, _ in self._abandoned.values())

    def forget_abandoned(self, device: str) -> None:
        for rid in [r for r, (d, _) in self._abandoned.items() if d == device]:
            del self._abandoned[rid]

    def pending_open(self, device: str) -> bool:
        """Whether someone is waiting for an open request to ``device`` right now."""
        return any(p.device == device and p.kind == wire.MsgType.OPEN
                   for p in self._pending.values())

    def _prune(self) -> None:
        now = time.monotonic()
        for rid in [r for r, (_, until) in self._abandoned.items() if until < now]:
            del self._abandoned[rid]

    def _abandon(self, req: wire.Request) -> None:
        self._prune()
        if len(self._abandoned) >= _ABANDONED_MAX:
            self._abandoned.pop(next(iter(self._abandoned)))  # the oldest
        left = max(0.0, req.expires_at - time.time())
        self._abandoned[req.id] = (req.device, time.monotonic() + left + _ABANDONED_GRACE)

    # -- out
    async def request(self, req: wire.Request,
                      timeout: Optional[float] = None) -> wire.Response:
        """Sign, publish and wait for the device's answer (RequestTimeout after the
        configured request timeout)."""
        assert self._mqtt is not None
        fut: asyncio.Future[wire.Response] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = _Pending(req.device, req.type, fut)
        answered = False
        try:
            signed = sign_request(req, self._key)
            self._mqtt.publish(wire.req_topic(req.device), wire.encode(signed))
            timeout = self._cfg.manager.request_timeout if timeout is None else timeout
            try:
                resp = await asyncio.wait_for(fut, timeout)
                answered = True
                DEVICE_REQUESTS.labels(label(req.type), label(resp.code)).inc()
                return resp
            except asyncio.TimeoutError:
                DEVICE_REQUESTS.labels(label(req.type), "timeout").inc()
                raise RequestTimeout(
                    f"device {req.device}: timed out after {timeout:g} s waiting for an answer"
                ) from None
        finally:
            # also when the caller was cancelled (HTTP client gone): the device may still
            # act on the request, and its answer must not be lost
            self._pending.pop(req.id, None)
            if not answered and isinstance(req, wire.OpenRequest):
                self._abandon(req)

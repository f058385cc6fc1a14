"""MQTT request/response: the manager's broker session, signed requests, correlated answers."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

import asyncssh

from dpanel_proto import wire
from dpanel_proto.signing import sign_request

from ._mqtt import ManagerMqtt
from .config import ServerConfig
from .errors import BrokerError, RequestTimeout

__all__ = ["Requests"]

log = logging.getLogger("dpanel.manager")


class Requests:
    """Owns the broker connection; routes incoming topics through a handler table."""

    def __init__(self, cfg: ServerConfig, key: asyncssh.SSHKey, password: str, *,
                 on_status: Callable[[str, bytes], None],
                 on_broker: Callable[[bool], None]) -> None:
        self._cfg = cfg
        self._key = key
        self._password = password
        self._on_broker = on_broker
        self._pending: dict[str, tuple[str, asyncio.Future[wire.Response]]] = {}
        self._mqtt: Optional[ManagerMqtt] = None
        self._handlers: dict[str, Callable[[str, bytes], None]] = {
            "status": on_status,
            "resp": self._on_resp,
        }

    def start(self) -> None:
        host, port = self._cfg.broker.host_port
        self._mqtt = ManagerMqtt(
            asyncio.get_running_loop(), host, port, self._cfg.broker.username,
            self._password, list(wire.MANAGER_SUBSCRIPTIONS), self._dispatch,
            on_connected=self._on_broker,
            tls_ca=self._cfg.broker.ca_file if self._cfg.broker.url.startswith("mqtts://")
            else None,
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

    # -- in
    def _dispatch(self, topic: str, payload: bytes) -> None:
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

    def _on_resp(self, device: str, payload: bytes) -> None:
        msg = wire.decode(payload)
        if not isinstance(msg, wire.Response) or msg.device != device:
            raise wire.DecodeError("device: response does not match its topic")
        pending = self._pending.get(msg.id)
        if pending is None or pending[0] != device:
            log.info("unsolicited response %s from %s ignored", msg.id, device)
            return
        if not pending[1].done():
            pending[1].set_result(msg)

    # -- out
    async def request(self, req: wire.Request) -> wire.Response:
        """Sign, publish and wait for the device's answer (RequestTimeout after the
        configured request timeout)."""
        assert self._mqtt is not None
        fut: asyncio.Future[wire.Response] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = (req.device, fut)
        try:
            signed = sign_request(req, self._key)
            self._mqtt.publish(wire.req_topic(req.device), wire.encode(signed))
            timeout = self._cfg.manager.request_timeout
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"device {req.device}: timed out after {timeout:g} s waiting for an answer"
                ) from None
        finally:
            self._pending.pop(req.id, None)

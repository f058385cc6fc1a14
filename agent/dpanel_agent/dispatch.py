"""Turn request payloads into actions and answers: decode, check, dispatch by type.

Garbage never gets an answer (there is no trustworthy id to answer to) and never raises:
it is logged (rate-limited: a flood gives a few lines and a "suppressed N" count) and
dropped. A well-formed request that fails a check gets a
:class:`~dpanel_agent.wire.Response` with the matching :class:`ErrorCode`, up to
:data:`REFUSAL_ANSWERS` per 10 s: a flood of refused requests must not fill the MQTT
send queue, where the answers to valid requests would then be dropped.

A request is checked when it arrives and its expiry again at the moment it is acted on
(the tunnel link checks it once more right before it dials), so a request that waited
behind a slow dial or a busy loop is not acted on after its caller gave up.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Awaitable, Callable, Dict, Optional, Protocol, Set, Tuple

from dpanel_proto.ratelog import Budget, RateLimitedLog
from dpanel_proto.wire import (
    CloseRequest,
    DecodeError,
    ErrorCode,
    MsgType,
    OpenRequest,
    PingRequest,
    Request,
    Response,
    UpdateRequest,
    decode,
)

from .errors import TunnelError
from .guard import RequestGuard

__all__ = ["REFUSAL_ANSWERS", "Dispatcher", "Link"]

log = logging.getLogger("dpanel.agent")

#: Refusals answered per 10 s; beyond that they are only counted in the log.
REFUSAL_ANSWERS = 20

#: The monotonic expiry of the request being handled, set per task by the dispatcher, so
#: that handlers keep the plain ``handler(req)`` shape and still act by the deadline.
NOT_AFTER: contextvars.ContextVar[float] = contextvars.ContextVar("not_after")


class Link(Protocol):
    """What the dispatcher needs from the tunnel (a fake in unit tests)."""

    @property
    def port(self) -> Optional[int]: ...

    async def open(self, ttl: float, idle_timeout: float, *,
                   not_after: Optional[float] = None,
                   server: Optional[Tuple[str, str]] = None) -> int: ...

    async def close(self, reason: str) -> bool: ...


class Dispatcher:
    """``handle(payload)`` is called on the event loop for every message on the request
    topic; answers go out through ``respond``."""

    def __init__(self, device: str, guard: RequestGuard, link: Link,
                 respond: Callable[[Response], None], *, ttl_max: int,
                 idle_timeout_max: int, target: str = "builtin",
                 on_ping: Callable[[], None] = lambda: None,
                 on_user_ca: Optional[Callable[[str], None]] = None,
                 on_update: Optional[Callable[[UpdateRequest], Awaitable[Response]]] = None,
                 ) -> None:
        self.device = device
        self._on_ping = on_ping
        self.guard = guard
        self.link = link
        self._respond = respond
        self._ttl_max = ttl_max
        self._idle_max = idle_timeout_max
        self._target = target
        self._on_user_ca = on_user_ca
        self._tasks: Set[asyncio.Task[None]] = set()
        self._rl = RateLimitedLog(log)
        self._refusal_answers = Budget(REFUSAL_ANSWERS, 10.0)
        self._handlers: Dict[MsgType, Callable[[Request], Awaitable[Response]]] = {
            MsgType.OPEN: self._open,
            MsgType.CLOSE: self._close,
            MsgType.PING: self._ping,
        }
        if on_update is not None:
            # the offer is a signed request like any other (guard: signature, expiry,
            # replay); the updater checks the bundle's own signature on top
            self._handlers[MsgType.UPDATE] = on_update  # type: ignore[assignment]

    def handle(self, payload: bytes) -> Optional[asyncio.Task[None]]:
        try:
            msg = decode(payload)
        except DecodeError as exc:
            self._rl.warning("malformed requests", "ignored a malformed request (%d bytes): %s",
                             len(payload), exc)
            return None
        handler = self._handlers.get(msg.type)
        if handler is None or not isinstance(msg, (OpenRequest, CloseRequest, PingRequest,
                                                          UpdateRequest)):
            self._rl.warning("other messages", "ignored a %s message on the request topic",
                             msg.type.value)
            return None
        refusal = self.guard.check(msg)
        if refusal is not None:
            code, why = refusal
            self._rl.warning(f"{code.value} refusals", "refused %s request %s: %s: %s",
                             msg.type.value, msg.id, code.value, why)
            if self._refusal_answers.take():
                self._answer(msg, code, why)
            return None
        # expires_at as a monotonic deadline: what is left of the request's life must not
        # grow if the wall clock is stepped while it waits (NTP on a board without RTC).
        not_after = time.monotonic() + (msg.expires_at - time.time())
        task = asyncio.ensure_future(self._run(handler, msg, not_after))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for requests being handled (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ internals

    def _answer(self, req: Request, code: ErrorCode, message: str = "",
                port: Optional[int] = None) -> None:
        self._respond(Response(device=self.device, id=req.id, code=code, message=message,
                               port=port, ts=time.time()))

    async def _run(self, handler: Callable[[Request], Awaitable[Response]],
                   req: Request, not_after: float) -> None:
        late = time.monotonic() - not_after
        if late > 0:
            log.warning("%s request %s expired %.1f s before it could be acted on",
                        req.type.value, req.id, late)
            self._answer(req, ErrorCode.EXPIRED,
                         f"request expired {late:.1f} s before the device could act on it")
            return
        NOT_AFTER.set(not_after)  # this task's own context
        try:
            resp = await handler(req)
        except Exception as exc:  # one bad request must not take the agent down
            log.exception("%s request %s failed", req.type.value, req.id)
            resp = Response(device=self.device, id=req.id, code=ErrorCode.INTERNAL,
                            message=f"agent error: {exc}", ts=time.time())
        self._respond(resp)

    async def _open(self, req: Request) -> Response:
        assert isinstance(req, OpenRequest)
        if req.target != self._target:
            # The device owner decides what is exposed, not the request.
            log.info("open request %s asks for target %s; this device serves %s",
                     req.id, req.target, self._target)
        if req.user_ca and self._on_user_ca is not None:
            # covered by the signature the guard checked: a new SSH user CA (migration
            # from the manager-key-only pin, or rotation), in force before the tunnel opens
            try:
                self._on_user_ca(req.user_ca)
            except OSError as exc:
                return Response(device=self.device, id=req.id, code=ErrorCode.INTERNAL,
                                message=f"cannot store the user CA: {exc.strerror}",
                                ts=time.time())
        ttl = min(req.ttl, self._ttl_max)
        idle = min(req.idle_timeout, self._idle_max)
        try:
            if req.tunnel and req.tunnel_host_key:
                # the manager placed this tunnel on one of its servers (signed, checked)
                port = await self.link.open(ttl, idle, not_after=NOT_AFTER.get(None),
                                            server=(req.tunnel, req.tunnel_host_key))
            else:
                port = await self.link.open(ttl, idle, not_after=NOT_AFTER.get(None))
        except TunnelError as exc:
            # naming the server the manager placed us on, so that it can try another
            return Response(device=self.device, id=req.id, code=exc.code,
                            message=str(exc), ts=time.time(),
                            tunnel=req.tunnel if req.tunnel and req.tunnel_host_key else None)
        log.info("open request %s: tunnel port %d (ttl %d s, idle %d s)", req.id, port, ttl,
                 idle)
        return Response(device=self.device, id=req.id, code=ErrorCode.OK, port=port,
                        ts=time.time())

    async def _close(self, req: Request) -> Response:
        was_open = await self.link.close(f"close request {req.id}")
        code = ErrorCode.OK if was_open else ErrorCode.NOT_OPEN
        return Response(device=self.device, id=req.id, code=code, ts=time.time(),
                        message="" if was_open else "no tunnel was open")

    async def _ping(self, req: Request) -> Response:
        # liveness: the manager asks after a request went unanswered, or after it
        # reconnected to a broker cluster whose retained store is per node (RabbitMQ):
        # the status is published again, so it reaches the manager whichever node it is on
        self._on_ping()
        return Response(device=self.device, id=req.id, code=ErrorCode.OK, ts=time.time())

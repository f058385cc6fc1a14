"""API routes for operators away from the manager host: SSH certificates and the proxy.

* ``POST /v1/certs`` signs the caller's own public key (see :mod:`.usercert`).
* ``GET /v1/devices/{device}/proxy`` (WebSocket) is OpenSSH's ProxyCommand over the
  API's port: binary frames both ways to the device's tunnel port, the same place the
  on-host ``dpanel proxy`` connects. The bearer token comes only in the upgrade's
  ``Authorization`` header; a query string is refused outright (URLs end up in logs).

They sit behind the same ``auth`` dependency as every route, so a revoked operator is
refused here at once, and check ``exec`` on the device (scope) with :func:`authz.require`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Callable, Optional

from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from dpanel_proto.codes import ErrorCode
from dpanel_proto.wire import printable

from .authz import Principal, in_scope, require
from .errors import DPanelError
from .manager import Manager
from .usercert import DEFAULT_TTL

__all__ = ["CertIn", "CertOut", "install"]

log = logging.getLogger("dpanel.api.certs")

#: Bytes read from the device's tunnel port per WebSocket frame.
_FRAME = 64 * 1024


class CertIn(BaseModel):
    public_key: str = Field(description="the operator's OpenSSH public key line")
    ttl: Optional[int] = Field(default=None, description=f"seconds (default {DEFAULT_TTL}, "
                               "at most manager.cert_ttl_max)")
    devices: Optional[list[str]] = Field(default=None, description="name only these "
                                         "devices (each must be in scope)")


class CertOut(BaseModel):
    certificate: str = Field(description="OpenSSH certificate line (save as KEY-cert.pub)")
    key_id: str
    serial: int
    principals: list[str]
    valid_after: int
    valid_before: int
    ca: str = Field(description="the user CA's public key line")


def install(app: FastAPI, manager: Manager, auth: Callable[..., Principal]) -> None:
    """Add the routes to ``app``; ``auth`` is the app's bearer-token dependency."""

    @app.post("/v1/certs", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": CertIn.model_json_schema()}}}})
    async def issue_cert(request: Request, p: Principal = Depends(auth)) -> CertOut:  # noqa: B008
        require(p, "exec")  # a viewer gets 403 naming the role it lacks, whatever it sent
        try:
            body = CertIn.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        devices: Optional[list[str]]
        if body.devices is not None:
            devices = []
            for name in body.devices:
                dev = await manager.device(name)
                require(p, "exec", name, dev.labels)
                devices.append(dev.id)
        elif p.scope:
            devices = [d.id for d in await manager.devices(include_revoked=False)
                       if in_scope(p, d.labels)]
        else:
            devices = None  # dpanel:* - every device, now and later
        cert, info = manager.user_ca.issue(p, body.public_key, body.ttl, devices,
                                           operator=True)
        log.info("issued SSH certificate serial %s to %s for %s (until %s)", info["serial"],
                 p.name, ",".join(info["principals"])[:200], info["valid_before"])
        return CertOut(certificate=cert, **info)

    @app.websocket("/v1/devices/{device}/proxy")
    async def proxy(ws: WebSocket, device: str) -> None:
        try:
            if ws.url.query:
                raise HTTPException(400, "a query string is refused here: send the token "
                                    "in the Authorization header, never in a URL")
            scheme, _, token = (ws.headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise HTTPException(401, "missing bearer token (Authorization header)")
            # the app's authenticator (operators, the admin token) and its role + scope
            # check, when it has them; the route's own dependency otherwise
            authenticate = getattr(ws.app.state, "authenticate", None)
            who = (authenticate(token) if authenticate is not None else
                   auth(HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)))
            p = await who if inspect.isawaitable(who) else who
            allowed = getattr(ws.app.state, "allowed", None)
            if allowed is not None:
                await allowed(p, "exec", device)
            else:
                dev = await manager.device(device)
                require(p, "exec", device, dev.labels)
            port = await manager.open_tunnel(device)
            reader, writer = await asyncio.wait_for(manager.open_stream(device, port), 15)
        except HTTPException as exc:
            await _deny(ws, exc.status_code, str(exc.detail),
                        ErrorCode.UNAUTHORIZED if exc.status_code == 401 else
                        ErrorCode.INVALID)
            return
        except DPanelError as exc:
            await _deny(ws, exc.http_status, str(exc), exc.code)
            return
        except (OSError, asyncio.TimeoutError) as exc:
            await _deny(ws, 502, f"device {device}: tunnel port unreachable ({exc})",
                        ErrorCode.INTERNAL)
            return
        local, client = writer.get_extra_info("sockname"), ws.client
        if isinstance(local, tuple) and client is not None:
            # so the device's record of this stream names the operator's address
            manager.audit.note_stream(device, f"{local[0]}:{local[1]}",
                                      f"{client.host}:{client.port}")
        await ws.accept()
        log.info("proxy stream to %s opened by %s", device, printable(p.name))
        try:
            await _bridge(ws, reader, writer)
        finally:
            writer.close()
            log.info("proxy stream to %s closed (%s)", device, printable(p.name))


async def _deny(ws: WebSocket, status: int, message: str, code: ErrorCode) -> None:
    """An HTTP answer to the upgrade (uvicorn supports the denial extension), so that a
    client shows the reason; a bare close (HTTP 403) where it does not."""
    body = JSONResponse({"error": message, "code": code.value}, status_code=status)
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(body)
    else:
        await ws.close(code=1008, reason=message[:120])


async def _bridge(ws: WebSocket, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    """Frames -> TCP and TCP -> frames until either side ends. Backpressure both ways:
    the next frame is not taken before the previous one was drained into the socket,
    and the next read of the device waits until the frame before it was sent."""

    async def upstream() -> None:
        while True:
            msg: Any = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            data = msg.get("bytes")
            if data:
                writer.write(data)
                await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def downstream() -> None:
        while True:
            data = await reader.read(_FRAME)
            if not data:
                break
            await ws.send_bytes(data)

    up = asyncio.ensure_future(upstream())
    down = asyncio.ensure_future(downstream())
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        pass
    finally:
        for t in (up, down):
            t.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        if ws.application_state == WebSocketState.CONNECTED and \
                ws.client_state == WebSocketState.CONNECTED:
            try:
                await ws.close(code=1000)
            except (RuntimeError, OSError, WebSocketDisconnect):
                pass

"""HTTP API for the dPanel panel and the CLI (FastAPI; OpenAPI at /openapi.json).

Every route but /v1/health wants ``Authorization: Bearer <admin token>``. Exec streams
NDJSON lines: ``{"stdout": b64}`` / ``{"stderr": b64}`` chunks, then ``{"exit": n}``,
or ``{"error": msg, "code": kind}`` if the device failed mid-stream.
"""

from __future__ import annotations

import base64
import hmac
import shlex
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from dpanel_proto.events import Error, Exit, Output, encode_event

from . import __version__
from .errors import DPanelError
from .manager import Manager
from .registry import Device

__all__ = ["create_app"]


class EnrolIn(BaseModel):
    name: str = Field(description="device id: lowercase letters, digits, '-'")
    labels: dict[str, str] = Field(default_factory=dict)


class EnrolOut(BaseModel):
    device: dict[str, Any]
    token: str = Field(description="the device token; shown once, store it on the device")


class TunnelIn(BaseModel):
    ttl: Optional[int] = Field(default=None, ge=10, le=7 * 86400)
    idle_timeout: Optional[int] = Field(default=None, ge=5, le=7 * 86400)


class TunnelOut(BaseModel):
    device: str
    port: int
    host: str = "127.0.0.1"
    host_key: Optional[str] = None


class ExecIn(BaseModel):
    command: Union[list[str], str] = Field(description="argv list (quoted for you) or a "
                                                       "shell command string")
    stdin: Optional[str] = Field(default=None, description="base64 data for stdin")
    timeout: Optional[float] = Field(default=None, gt=0)
    stream: bool = Field(default=True, description="NDJSON stream; false = one JSON answer")


def _error(exc: DPanelError) -> JSONResponse:
    return JSONResponse({"error": str(exc), "code": exc.code.value},
                        status_code=exc.http_status)


def create_app(manager: Manager, admin_token: str) -> FastAPI:
    app = FastAPI(title="dPanel Edge manager", version=__version__)

    def auth(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.encode(),
                                                                 admin_token.encode()):
            raise HTTPException(401, "missing or wrong admin token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(DPanelError)
    async def _dpanel_error(_r: Request, exc: DPanelError) -> JSONResponse:
        return _error(exc)

    async def _device_view(device_id: str, device: Optional[Device] = None) -> dict[str, Any]:
        d = (device or await manager.device(device_id)).as_dict()
        p = manager.presence.get(device_id)
        d["online"] = bool(p and p.online)
        d["port"] = p.port if p else None
        d["agent_version"] = p.agent_version if p else ""
        d["host_key_ok"] = p.host_key_ok if p else True
        return d

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        out: dict[str, Any] = {"ok": True, "broker": manager.broker_connected(),
                               "version": __version__}
        if manager.tunnel_stats is not None:
            out["tunnel"] = manager.tunnel_stats()
        return out

    @app.get("/v1/devices", dependencies=[Depends(auth)])
    async def list_devices() -> list[dict[str, Any]]:
        return [await _device_view(d.id, d) for d in await manager.devices()]

    @app.post("/v1/devices", dependencies=[Depends(auth)], status_code=201)
    async def add_device(body: EnrolIn) -> EnrolOut:
        device, token = await manager.enrol(body.name, body.labels)
        return EnrolOut(device=device.as_dict(), token=token)

    @app.get("/v1/devices/{device}", dependencies=[Depends(auth)])
    async def show_device(device: str) -> dict[str, Any]:
        return await _device_view(device)

    @app.delete("/v1/devices/{device}", dependencies=[Depends(auth)])
    async def revoke_device(device: str) -> dict[str, Any]:
        return (await manager.revoke(device)).as_dict()

    @app.post("/v1/devices/{device}/reset-hostkey", dependencies=[Depends(auth)])
    async def reset_hostkey(device: str) -> dict[str, Any]:
        await manager.reset_host_key(device)
        return await _device_view(device)

    @app.get("/v1/tunnels", dependencies=[Depends(auth)])
    async def list_tunnels() -> dict[str, int]:
        return manager.tunnels()

    @app.post("/v1/devices/{device}/tunnel", dependencies=[Depends(auth)])
    async def open_tunnel(device: str, body: TunnelIn) -> TunnelOut:
        port = await manager.open_tunnel(device, body.ttl, body.idle_timeout)
        return TunnelOut(device=device, port=port,
                         host_key=(await manager.device(device)).host_key)

    @app.delete("/v1/devices/{device}/tunnel", dependencies=[Depends(auth)])
    async def close_tunnel(device: str) -> dict[str, Any]:
        return {"device": device, "closed": await manager.close_tunnel(device)}

    @app.get("/v1/known_hosts", dependencies=[Depends(auth)])
    async def known_hosts() -> dict[str, str]:
        return {"known_hosts": await manager.known_hosts_text(),
                "path": str(await manager.write_known_hosts())}

    @app.post("/v1/devices/{device}/exec", dependencies=[Depends(auth)], response_model=None)
    async def exec_(device: str, body: ExecIn) -> Union[StreamingResponse, dict[str, Any]]:
        command = body.command if isinstance(body.command, str) else shlex.join(body.command)
        stdin = base64.b64decode(body.stdin) if body.stdin is not None else None
        events = manager.exec(device, command, stdin, body.timeout)
        # Pull the first event before answering, so that "offline", "refused" and
        # "timed out" come back as proper HTTP errors rather than mid-stream.
        first = await events.__anext__()
        if not body.stream:
            out: dict[str, Any] = {"stdout": b"", "stderr": b"", "exit": None}
            for kind, data in [first] + [e async for e in events]:
                if kind == "exit":
                    out["exit"] = data
                else:
                    out[kind] += data
            return {"stdout": out["stdout"].decode(errors="replace"),
                    "stderr": out["stderr"].decode(errors="replace"), "exit": out["exit"]}

        async def lines() -> AsyncIterator[bytes]:
            try:
                yield _line(first)
                async for ev in events:
                    yield _line(ev)
            except DPanelError as exc:
                yield encode_event(Error(str(exc), exc.code.value))

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


def _line(event: tuple[str, Union[bytes, int]]) -> bytes:
    kind, data = event
    if isinstance(data, int):
        return encode_event(Exit(data))
    return encode_event(Output(kind, data))  # type: ignore[arg-type]

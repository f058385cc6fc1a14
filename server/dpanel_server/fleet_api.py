"""The /v1/tunnel-servers routes: enrol, list and remove tunnel servers, and their heartbeats."""

# no `from __future__ import annotations`: FastAPI must see the local Caller alias
import asyncio
from typing import Annotated, Any, Callable, Optional

from fastapi import Depends, FastAPI, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError

from dpanel_proto.codes import ErrorCode

from .authz import Principal, in_scope, require
from .errors import DPanelError
from .manager import Manager

__all__ = ["Heartbeat", "add_fleet_routes"]

#: a tunnel server's own secret (``dpanel tunnel-server add``), declared in OpenAPI as a
#: bearer scheme of its own; auto_error off, so that a missing one gets our 401 ErrorOut
_SERVER_BEARER = HTTPBearer(scheme_name="TunnelServerSecret", auto_error=False,
                            description="a tunnel server's own secret, never an operator's")
_ServerCredentials = Annotated[Optional[HTTPAuthorizationCredentials], Security(_SERVER_BEARER)]

#: a heartbeat lists the server's devices and ports: 1M of them fit in this
MAX_HEARTBEAT = 64 * 1024 * 1024


class Heartbeat(BaseModel):
    public: str = Field(max_length=300, pattern=r"^[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$",
                        description="host:port that devices and the manager dial")
    host_key: str = Field(max_length=200, pattern=r"^ssh-ed25519 [A-Za-z0-9+/]{68}$")
    bind_host: str = Field(max_length=64, pattern=r"^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$",
                           description="the loopback address device ports are bound on")
    capacity: int = Field(ge=0, le=10_000_000)
    load: int = Field(ge=0, le=10_000_000)
    devices: dict[str, int] = Field(default_factory=dict, max_length=1_000_000)


class ServerIn(BaseModel):
    name: str = Field(max_length=63)


def add_fleet_routes(app: FastAPI, manager: Manager,
                     auth: Callable[..., Principal]) -> None:
    fleet = manager.fleet
    Caller = Annotated[Principal, Depends(auth)]

    @app.get("/v1/tunnel-servers")
    async def list_servers(p: Caller) -> list[dict[str, Any]]:
        """Every enrolled tunnel server: state (new/up/down), why, load and capacity, and
        the devices whose tunnels it holds (only those in the caller's scope)."""
        require(p, "read")
        servers = fleet.list()
        if p.scope:
            ids = {d.id for d in await manager.devices() if in_scope(p, d.labels)}
            for s in servers:
                s["devices"] = [d for d in s["devices"] if d in ids]
                s["unreachable_from"] = {d: why for d, why in s["unreachable_from"].items()
                                         if d in ids}
                s["tunnels"] = len(s["devices"])
        return servers

    @app.post("/v1/tunnel-servers", status_code=201)
    async def add_server(body: ServerIn, p: Caller) -> dict[str, Any]:
        """Enrol a tunnel server; its secret is in the answer, once."""
        require(p, "enrol")
        secret = await asyncio.to_thread(fleet.add, body.name)
        return {"name": body.name, "secret": secret}

    @app.delete("/v1/tunnel-servers/{name}")
    async def remove_server(name: str, p: Caller) -> dict[str, Any]:
        require(p, "enrol")
        await asyncio.to_thread(fleet.remove, name)
        return {"name": name, "removed": True}

    @app.post("/v1/tunnel-servers/{name}/heartbeat",
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": Heartbeat.model_json_schema()}}, "required": True}})
    async def heartbeat(name: str, request: Request, cred: _ServerCredentials
                        ) -> dict[str, Any]:
        """A tunnel server's announcement, under its own secret (not an operator's).

        The secret is checked before the body is read, so that a caller without it learns
        nothing from validation errors and costs no parsing."""
        secret = cred.credentials if cred is not None else ""
        if cred is None or cred.scheme.lower() != "bearer" or not secret:
            from .fleet import _Unauthorized

            raise _Unauthorized("missing bearer secret of the tunnel server")
        await asyncio.to_thread(fleet.authenticate, name, secret)
        raw = await request.body()
        if len(raw) > MAX_HEARTBEAT:
            raise DPanelError(f"heartbeat: body over {MAX_HEARTBEAT} bytes", ErrorCode.INVALID)
        try:
            body = Heartbeat.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "body"
            raise DPanelError(f"heartbeat: {where}: {first['msg']}", ErrorCode.INVALID) from None
        return await asyncio.to_thread(fleet.heartbeat, name, secret, body.model_dump())

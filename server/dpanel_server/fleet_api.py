"""The /v1/tunnel-servers routes: enrol, list and remove tunnel servers, and their heartbeats."""

# no `from __future__ import annotations`: FastAPI must see the local Caller alias
import asyncio
from typing import Annotated, Any, Callable, Optional

from fastapi import Depends, FastAPI, Header
from pydantic import BaseModel, Field

from .authz import Principal, in_scope, require
from .errors import DPanelError
from .manager import Manager

__all__ = ["Heartbeat", "add_fleet_routes"]


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

    @app.post("/v1/tunnel-servers/{name}/heartbeat")
    async def heartbeat(name: str, body: Heartbeat,
                        authorization: Optional[str] = Header(default=None)
                        ) -> dict[str, Any]:
        """A tunnel server's announcement, under its own secret (not an operator's)."""
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            from .fleet import _Unauthorized

            raise _Unauthorized("missing bearer secret of the tunnel server")
        try:
            return await asyncio.to_thread(fleet.heartbeat, name, secret,
                                           body.model_dump())
        except DPanelError:
            raise

"""The /v1/agent routes: rollouts (operators) and bundle downloads (devices)."""

# no `from __future__ import annotations`: FastAPI must see the local Caller alias
import asyncio
import base64
import binascii
import ipaddress
from typing import Annotated, Any, Callable, Optional
from urllib.parse import urlsplit

from fastapi import Body, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from dpanel_proto.codes import ErrorCode
from dpanel_proto.update import BINARY_NAME
from dpanel_proto.util import parse_hostport

from .authz import Principal, require
from .manager import Manager
from .metrics import AUTH_FAILURES
from .updates import RolloutSpec, UpdateError

__all__ = ["add_update_routes"]


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _spec(body: dict[str, Any], url_base: str,
          devices_host: Optional[str] = None) -> RolloutSpec:
    """The body, checked after the caller's role (a viewer gets 403 whatever it sends)."""
    allowed = {"version", "devices", "filters", "all", "canary", "max_failures",
               "max_concurrency", "commit_timeout", "expires", "url_base"}
    extra = set(body) - allowed
    if extra:
        raise UpdateError(f"{sorted(extra)[0]}: unknown field")

    def num(key: str, default: float, kind: type = int) -> Any:
        v = body.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                kind is int and int(v) != v):
            raise UpdateError(f"{key}: expected a number")
        return kind(v)

    def strs(key: str) -> tuple[str, ...]:
        v = body.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or len(v) > 10000:
            raise UpdateError(f"{key}: expected a list of strings")
        return tuple(v)

    version = body.get("version")
    if not isinstance(version, str):
        raise UpdateError("version: missing")
    base = body.get("url_base") or url_base
    if not isinstance(base, str) or not base.startswith(("http://", "https://")) \
            or not base.isprintable() or " " in base:
        # what the agent would refuse in the offer (wire): refused here, before any offer
        raise UpdateError("url_base: expected an http:// or https:// URL")
    if devices_host is not None and _loopback(urlsplit(base).hostname or "") \
            and not _loopback(devices_host):
        raise UpdateError(
            f"url_base: {base} is loopback, which devices (they dial {devices_host}) cannot "
            "reach; pass --url with the manager's public HTTPS address, or set "
            "manager.update_url")
    expires = num("expires", 7 * 86400.0, float)
    if not 0 < expires <= 90 * 86400:
        raise UpdateError("expires: more than 0 and at most 90 days")
    return RolloutSpec(version=version, devices=strs("devices"), filters=strs("filters"),
                       all=body.get("all") is True, canary=num("canary", 1),
                       max_failures=num("max_failures", 0),
                       max_concurrency=num("max_concurrency", 20),
                       commit_timeout=num("commit_timeout", 300), expires=expires,
                       url_base=base)


def add_update_routes(app: FastAPI, manager: Manager,
                      auth: Callable[..., Principal]) -> None:
    updates = manager.updates
    Caller = Annotated[Principal, Depends(auth)]

    @app.post("/v1/agent/rollouts", status_code=201)
    async def create_rollout(request: Request, p: Caller,
                             body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        """Roll an agent version out: canaries first, halted past max_failures."""
        require(p, "exec")
        cfg = manager.cfg
        tunnel_host = parse_hostport(cfg.tunnel.public_address, "tunnel.public_address", 22)[0]
        return await updates.create(p, _spec(body, cfg.manager.update_url
                                             or str(request.base_url), tunnel_host))

    @app.get("/v1/agent/rollouts")
    async def list_rollouts(p: Caller) -> list[dict[str, Any]]:
        return await updates.list(p)

    @app.get("/v1/agent/rollouts/{rollout}")
    async def show_rollout(rollout: str, p: Caller) -> dict[str, Any]:
        """A rollout with each device's part (pending = not offered yet, e.g. offline)."""
        return await updates.get(p, rollout)

    @app.post("/v1/agent/rollouts/{rollout}/cancel")
    async def cancel_rollout(rollout: str, p: Caller) -> dict[str, Any]:
        return await updates.cancel(p, rollout)

    @app.get("/v1/agent/bundles")
    async def list_bundles(p: Caller) -> list[dict[str, Any]]:
        require(p, "read")
        return await asyncio.to_thread(updates.bundles.list)

    # the devices' route: their own credentials (HTTP Basic, device id + secret, as on
    # the tunnel), not an operator's, so it is kept out of the operators' OpenAPI
    @app.get("/v1/agent/bundles/{arch}/{version}/" + BINARY_NAME, include_in_schema=False)
    async def fetch_bundle(arch: str, version: str, request: Request) -> Any:
        device, secret = _basic(request.headers.get("authorization", ""))
        ok = bool(device) and await asyncio.to_thread(manager.registry.verify, device, secret)
        if not ok:
            AUTH_FAILURES.labels("bundles").inc()
            return JSONResponse({"error": "device credentials required",
                                 "code": ErrorCode.UNAUTHORIZED.value}, status_code=401)
        got = await asyncio.to_thread(updates.bundles.get, arch, version)
        if got is None:
            return JSONResponse({"error": f"no bundle {arch}/{version}",
                                 "code": ErrorCode.INVALID.value}, status_code=404)
        # FileResponse answers Range requests (206), so a slow link resumes
        return FileResponse(got[2], media_type="application/octet-stream")


def _basic(header: str) -> tuple[str, str]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or len(value) > 512:
        return "", ""
    try:
        user, _, pw = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, ValueError):
        return "", ""
    return user, pw

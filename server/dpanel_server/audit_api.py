"""The audit routes of the HTTP API (GET /v1/audit, /v1/audit/verify, recordings), and the
helper the other routes use to write their own audit record.

Kept out of api.py so that the audit can change without touching every route.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response

from dpanel_proto.codes import ErrorCode

from .audit import ChainError, parse_since
from .authz import Principal, in_scope, require
from .errors import DPanelError
from .manager import Manager

__all__ = ["add_audit_routes", "record_call"]


class _NotFound(DPanelError):
    code = ErrorCode.UNKNOWN_DEVICE


async def record_call(manager: Manager, principal: Principal, device: str, kind: str,
                      command: str, result: str, request: Optional[Request] = None,
                      correlation: str = "") -> None:
    """Write the API's record of one call; never fails the call itself."""
    source = request.client.host if request is not None and request.client else ""
    try:
        await asyncio.to_thread(manager.audit.api_record, principal.name, device, kind,
                                command, result, source=source, correlation=correlation)
    except Exception:  # the audit must not take the API down; say it loudly
        import logging

        logging.getLogger("dpanel.audit").exception("could not write the audit record of "
                                                    "%s %s by %s", kind, device,
                                                    principal.name)


def add_audit_routes(app: FastAPI, manager: Manager,
                     auth: Callable[..., Principal]) -> None:
    async def _scope(principal: Principal) -> Optional[set[str]]:
        if not principal.scope:
            return None
        return {d.id for d in await manager.devices() if in_scope(principal, d.labels)}

    @app.get("/v1/audit")
    async def audit_list(principal: Principal = Depends(auth),  # noqa: B008
                         device: Optional[str] = None, user: Optional[str] = None,
                         since: Optional[str] = None,
                         limit: int = Query(default=1000, ge=1, le=100000)
                         ) -> list[dict[str, Any]]:
        """Audit records, oldest first (the newest ``limit``); ``since`` is a duration
        (90s, 15m, 1h, 2d) or an ISO 8601 time. Scoped callers see their devices only."""
        require(principal, "read")
        try:
            when = parse_since(since) if since else None
        except ValueError as exc:
            raise DPanelError(str(exc), ErrorCode.INVALID) from None
        devices = await _scope(principal)
        return await asyncio.to_thread(manager.audit.query, device=device, user=user,
                                       since=when, limit=limit, devices=devices)

    @app.get("/v1/audit/verify")
    async def audit_verify(principal: Principal = Depends(auth)  # noqa: B008
                           ) -> dict[str, Any]:
        """Walk the hash chain: ``ok`` with the row count and head hash, or ``ok: false``
        and ``error`` naming the first edited, deleted or inserted row."""
        require(principal, "read")
        try:
            return await asyncio.to_thread(manager.audit.verify_chain)
        except ChainError as exc:
            return {"ok": False, "error": str(exc)}

    @app.get("/v1/audit/{seq}/recording", response_model=None)
    async def audit_recording(seq: str, principal: Principal = Depends(auth)  # noqa: B008
                              ) -> Response:
        """The asciicast v2 recording of the shell session of audit row ``seq``."""
        require(principal, "read")
        if not seq.isdigit() or len(seq) > 18:  # the ID column of dpanel audit
            raise _NotFound(f"no audit record {seq[:40]!r}")
        row = await asyncio.to_thread(manager.audit.get, int(seq))
        devices = await _scope(principal)
        if row is None or (devices is not None and row.get("device") not in devices):
            raise _NotFound(f"no audit record {seq}")
        found = await asyncio.to_thread(manager.audit.checked_recording, int(seq))
        if found is None:
            raise _NotFound(f"audit record {seq} has no recording")
        data, state = found
        # X-Dpanel-Recording: verified (matches the SHA-256 in the chained record),
        # mismatch, or unverified
        return Response(data, media_type="application/x-asciicast",
                        headers={"X-Dpanel-Recording": state})

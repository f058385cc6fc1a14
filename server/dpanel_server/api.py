"""HTTP API for the dPanel panel and the CLI (FastAPI; OpenAPI at /openapi.json).

Every route but /v1/health, /v1/ready and /metrics (:mod:`.metrics`) wants
``Authorization: Bearer <token>`` (declared as an HTTP bearer security scheme): the admin
token, or an operator's ``dpo1.`` token (:mod:`.operators`); each route then checks the
caller's role and, for a device, its scope (:func:`.authz.require`).
Errors are ``{"error": message, "code": ErrorCode}``
(:class:`ErrorOut`). Exec streams the NDJSON events of :mod:`dpanel_proto.events`, with a
``{}`` heartbeat after every ``DPANEL_EXEC_HEARTBEAT`` seconds (default 15) of silence;
``stream: false`` answers once, with at most ``max_output`` bytes of each stream kept.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import secrets
import shlex
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from dpanel_proto.codes import ErrorCode
from dpanel_proto.events import Error, Exit, Heartbeat, Output, encode_event

from . import __version__
from .audit_api import add_audit_routes, record_call
from .authz import Action, Forbidden, Principal, in_scope, require
from .errors import DPanelError, UnknownDevice
from .manager import Manager
from .metrics import AUTH_FAILURES, EXEC_RESULTS, install_observability, label
from .operators import TOKEN_PREFIX, Operators
from .registry import Device
from .sshpool import ExecEvent, RemoteCommand

__all__ = ["DEFAULT_MAX_OUTPUT", "ErrorOut", "create_app"]

log = logging.getLogger("dpanel.api")

#: What ``stream: false`` keeps of each of stdout and stderr unless asked otherwise.
DEFAULT_MAX_OUTPUT = 8 << 20
#: The most a ``stream: false`` caller may ask to keep (the answer is held in memory).
MAX_MAX_OUTPUT = 64 << 20
#: A request body line (the exec request, or one stdin chunk) may not be longer.
_MAX_LINE = 4 << 20


class ErrorOut(BaseModel):
    """Every 4xx/5xx answer."""

    error: str = Field(description="one line for an operator; names the field or thing")
    code: ErrorCode = Field(description="stable code for scripts (dpanel_proto.codes)")


_STATUS_CODES = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN,
                 429: ErrorCode.TOO_MANY}
_ERROR_RESPONSES: dict[Union[int, str], dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text} for status, text in (
        (400, "refused"), (401, "missing, wrong or revoked token"),
        (403, "the caller's role or scope does not allow it"), (404, "no such device"),
        (409, "conflict"), (410, "revoked"), (422, "invalid request; names the field"),
        (500, "internal error"), (502, "the device failed"), (503, "device offline"),
        (504, "no answer in time"))}


def _label_text(value: str, what: str, limit: int) -> str:
    if not value or len(value) > limit or not value.isprintable():
        raise ValueError(f"{what} {value[:40]!r} must be 1-{limit} printable characters")
    return value


class EnrolIn(BaseModel):
    name: str = Field(description="device id: lowercase letters, digits, '-'")
    labels: dict[str, str] = Field(default_factory=dict)
    proxy: Optional[str] = Field(default=None, max_length=1024,
                                 description="HTTP CONNECT proxy the device must use")

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            from dpanel_proto.proxy import parse_proxy
            from dpanel_proto.wire import DecodeError
            try:
                parse_proxy(v, "proxy")
            except DecodeError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            _label_text(key, "label key", 63)
            if "=" in key:
                raise ValueError(f"label key {key!r} may not contain '='")
            if value:
                _label_text(value, "label value", 255)
        return v


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
    #: the tunnel server holding it, when not this host's (then ``host`` is that
    #: server's loopback: reach it through the API's WebSocket proxy)
    tunnel_server: Optional[str] = None


class ExecIn(BaseModel):
    command: Union[list[str], str] = Field(description="argv list (quoted for you) or a "
                                                       "shell command string")
    stdin: Optional[str] = Field(default=None, description="base64 data for stdin, then "
                                 "EOF; without it the remote stdin is at EOF at once "
                                 "(or streamed: send the body as application/x-ndjson)")
    timeout: Optional[float] = Field(default=None, gt=0, le=30 * 86400)
    stream: bool = Field(default=True, description="NDJSON stream; false = one JSON answer")
    max_output: int = Field(default=DEFAULT_MAX_OUTPUT, ge=0, le=MAX_MAX_OUTPUT,
                            description="stream=false: bytes kept of stdout and of stderr "
                            "each; the rest is counted and dropped (truncated: true)")

    @field_validator("command")
    @classmethod
    def _command(cls, v: Union[list[str], str]) -> Union[list[str], str]:
        words = [v] if isinstance(v, str) else v
        if not words or not "".join(words).strip():
            raise ValueError("empty command")
        if any("\0" in w for w in words):
            raise ValueError("a NUL byte cannot be part of a command")
        return v

    @field_validator("stdin")
    @classmethod
    def _stdin(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("not valid base64") from None
        return v


class ExecOut(BaseModel):
    """The ``stream: false`` answer."""

    exit: int
    stdout_b64: str = Field(description="stdout, byte for byte (at most max_output)")
    stderr_b64: str = Field(description="stderr, byte for byte (at most max_output)")
    stdout: str = Field(description="the same, as UTF-8 text (invalid bytes replaced)")
    stderr: str
    stdout_bytes: int = Field(description="how much the command wrote, all of it")
    stderr_bytes: int
    truncated: bool = Field(description="true if either stream was cut at max_output")


#: The admin token, declared in OpenAPI as an HTTP bearer scheme; checked in ``auth``
#: (auto_error off, so that a missing header gets our 401 ErrorOut, not a bare 403).
_BEARER = HTTPBearer(auto_error=False, description="the admin token "
                     "(manager.admin_token_file) or an operator's dpo1. token")
_Credentials = Annotated[Optional[HTTPAuthorizationCredentials], Security(_BEARER)]


def _auth(request: Request, cred: _Credentials) -> Principal:
    """The caller, from the app's authenticator (``app.state.authenticate``, which a
    WebSocket route can call with the token it got)."""
    authenticate = request.app.state.authenticate
    web = getattr(request.app.state, "web_principal", None)
    if cred is None and web is not None:
        # the web panel's session cookie (webpanel.py: CSRF-checked for state changes)
        who = web(request)
        if who is not None:
            return who  # type: ignore[no-any-return]
    return authenticate(cred.credentials if cred is not None else "")  # type: ignore[no-any-return]


#: ``who: Who`` in a route's signature gives it the caller; the route checks it.
Who = Annotated[Principal, Depends(_auth)]


class UserIn(BaseModel):
    name: str = Field(description="lowercase letters, digits, '-' and '_'")
    role: Literal["viewer", "operator", "admin"]
    scope: list[str] = Field(default_factory=list, description="label selectors KEY=VALUE; "
                             "a device matching any is in scope; none: every device")


class UserOut(BaseModel):
    user: dict[str, Any]
    token: str = Field(description="the operator's token; shown once")


def _error(exc: DPanelError) -> JSONResponse:
    return JSONResponse({"error": str(exc), "code": exc.code.value},
                        status_code=exc.http_status)


def _invalid(errors: list[Any]) -> JSONResponse:
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return JSONResponse({"error": "; ".join(parts) or "invalid request",
                         "code": ErrorCode.INVALID.value}, status_code=422)


#: The built-in admin token's principal (the first admin).
ADMIN = Principal("admin", "admin")


def create_app(manager: Manager, admin_token: str) -> FastAPI:
    app = FastAPI(title="dPanel Edge manager", version=__version__,
                  responses=_ERROR_RESPONSES)
    heartbeat = float(os.environ.get("DPANEL_EXEC_HEARTBEAT") or 15)

    operators = Operators(manager.registry)
    app.state.operators = operators

    def authenticate(token: str) -> Principal:
        """The principal a bearer token stands for; 401 otherwise. Never logs the token."""
        if token.startswith(TOKEN_PREFIX):
            principal = operators.authenticate(token)
            if principal is None:
                AUTH_FAILURES.labels("api").inc()
                raise HTTPException(401, "unknown or revoked operator token",
                                    headers={"WWW-Authenticate": "Bearer"})
            return principal
        if not token or not hmac.compare_digest(token.encode(), admin_token.encode()):
            AUTH_FAILURES.labels("api").inc()
            raise HTTPException(401, "missing or wrong admin token",
                                headers={"WWW-Authenticate": "Bearer"})
        return ADMIN

    async def allowed(who: Principal, action: Action, device: str) -> Device:
        """The device, if ``who`` may do ``action`` on it: the role first (a refusal
        names it), then the scope. A scoped caller learns nothing of devices outside
        its scope, not even whether they exist."""
        require(who, action)
        try:
            d = await manager.device(device)
        except UnknownDevice:
            if who.scope:
                raise Forbidden(f"device {device} is outside {who.name}'s scope "
                                f"({', '.join(who.scope)})") from None
            raise
        require(who, action, device, d.labels)
        return d

    app.state.authenticate = authenticate
    app.state.allowed = allowed  # for routes added elsewhere (the WebSocket proxy)

    @app.exception_handler(DPanelError)
    async def _dpanel_error(_r: Request, exc: DPanelError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_r: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, ErrorCode.INTERNAL if exc.status_code >= 500
                                 else ErrorCode.INVALID)
        return JSONResponse({"error": str(exc.detail), "code": code.value},
                            status_code=exc.status_code, headers=exc.headers)

    async def _device_view(device_id: str, device: Optional[Device] = None,
                           ports: Optional[dict[str, int]] = None) -> dict[str, Any]:
        d = (device or await manager.device(device_id)).as_dict()
        p = manager.presence.get(device_id)
        d["online"] = bool(p and p.online)
        d["state"] = "revoked" if d["revoked"] else p.state if p else "offline"
        d["not_answering_since"] = p.not_answering_since if p else None
        # the tunnel's allocation, not what the device reported
        d["port"] = (manager.tunnels() if ports is None else ports).get(device_id)
        d["agent_version"] = p.agent_version if p else ""
        d["host_key_ok"] = p.host_key_ok if p else True
        # False: shown as the shared store last recorded it, its resync ping still due
        # (a replica just (re)connected to RabbitMQ or a cluster: presencesync.py)
        d["presence_verified"] = p.verified if p else True
        return d

    install_observability(app, manager)

    from . import certapi  # operator certificates and the WebSocket proxy (issue 9)

    certapi.install(app, manager, _auth)

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        out: dict[str, Any] = {"ok": True, "broker": manager.broker_connected(),
                               "version": __version__}
        if manager.tunnel_stats is not None:
            out["tunnel"] = manager.tunnel_stats()
        return out

    @app.get("/v1/whoami")
    async def whoami(who: Who) -> dict[str, object]:
        return who.as_dict()

    @app.post("/v1/users", status_code=201)
    async def add_user(who: Who, body: UserIn) -> UserOut:
        require(who, "users")
        op, token = await asyncio.to_thread(operators.add, body.name, body.role, body.scope)
        log.info("%s added operator %s (%s)", who.name, op.name, op.role)
        return UserOut(user=op.as_dict(), token=token)

    @app.get("/v1/users")
    async def list_users(who: Who) -> list[dict[str, Any]]:
        require(who, "users")
        return [op.as_dict() for op in await asyncio.to_thread(operators.list)]

    @app.delete("/v1/users/{name}")
    async def revoke_user(who: Who, name: str) -> dict[str, Any]:
        require(who, "users")
        op = await asyncio.to_thread(operators.revoke, name)
        log.info("%s revoked operator %s", who.name, name)
        return op.as_dict()

    @app.get("/v1/devices")
    async def list_devices(who: Who) -> list[dict[str, Any]]:
        require(who, "read")
        ports = manager.tunnels()
        return [await _device_view(d.id, d, ports) for d in await manager.devices()
                if in_scope(who, d.labels)]

    @app.post("/v1/devices", status_code=201)
    async def add_device(who: Who, body: EnrolIn, request: Request) -> EnrolOut:
        require(who, "enrol")
        try:
            device, token = await manager.enrol(body.name, body.labels, proxy=body.proxy)
        except DPanelError as exc:
            await record_call(manager, who, body.name[:63], "enrol", "enrol",
                              exc.code.value, request)
            raise
        await record_call(manager, who, body.name, "enrol", "enrol", "ok", request)
        return EnrolOut(device=device.as_dict(), token=token)

    @app.get("/v1/deleted-devices")
    async def deleted_devices(who: Who) -> list[dict[str, Any]]:
        """Tombstones of deleted devices: what they were, when revoked and deleted."""
        require(who, "read")
        return [d for d in await manager.deleted_devices()
                if in_scope(who, d.get("labels") or {})]  # type: ignore[arg-type]

    @app.get("/v1/devices/{device}")
    async def show_device(who: Who, device: str) -> dict[str, Any]:
        return await _device_view(device, await allowed(who, "read", device))

    @app.delete("/v1/devices/{device}")
    async def revoke_device(who: Who, device: str, request: Request, purge: bool = False,
                            force: bool = False) -> dict[str, Any]:
        """Revoke the device; ``purge=true`` deletes a revoked one and frees its name
        (``force=true`` revokes it first), keeping a tombstone (/v1/deleted-devices)."""
        await allowed(who, "enrol", device)
        kind = "delete" if purge else "revoke"
        try:
            out = ({"deleted": await manager.delete(device, force)} if purge
                   else (await manager.revoke(device)).as_dict())
        except DPanelError as exc:
            await record_call(manager, who, device[:63], kind, kind, exc.code.value, request)
            raise
        await record_call(manager, who, device, kind, kind, "ok", request)
        return out

    @app.post("/v1/devices/{device}/reset-hostkey")
    async def reset_hostkey(who: Who, device: str) -> dict[str, Any]:
        await allowed(who, "enrol", device)
        await manager.reset_host_key(device)
        return await _device_view(device)

    async def scoped_ids(who: Principal) -> Optional[set[str]]:
        """The ids in ``who``'s scope, or None for every device (no scope)."""
        if not who.scope:
            return None
        return {d.id for d in await manager.devices() if in_scope(who, d.labels)}

    @app.get("/v1/tunnels")
    async def list_tunnels(who: Who) -> dict[str, int]:
        require(who, "read")
        ids = await scoped_ids(who)
        return {k: v for k, v in manager.tunnels().items() if ids is None or k in ids}

    @app.post("/v1/devices/{device}/tunnel")
    async def open_tunnel(who: Who, device: str, body: TunnelIn,
                          request: Request) -> TunnelOut:
        try:
            await allowed(who, "tunnel", device)
            port = await manager.open_tunnel(device, body.ttl, body.idle_timeout)
        except DPanelError as exc:
            await record_call(manager, who, device[:63], "tunnel-open", "tunnel open",
                              exc.code.value, request)
            raise
        await record_call(manager, who, device, "tunnel-open", "tunnel open",
                          f"ok port {port}", request)
        server = manager.fleet.server_of(device) if manager.fleet.active() else None
        return TunnelOut(device=device, port=port,
                         host_key=(await manager.device(device)).host_key,
                         **({"host": server.bind_host, "tunnel_server": server.name}
                            if server is not None else {}))

    @app.delete("/v1/devices/{device}/tunnel")
    async def close_tunnel(who: Who, device: str, request: Request) -> dict[str, Any]:
        await allowed(who, "tunnel", device)
        try:
            closed = await manager.close_tunnel(device)
        except DPanelError as exc:
            await record_call(manager, who, device[:63], "tunnel-close", "tunnel close",
                              exc.code.value, request)
            raise
        await record_call(manager, who, device, "tunnel-close", "tunnel close", "ok",
                          request)
        return {"device": device, "closed": closed}

    @app.get("/v1/known_hosts")
    async def known_hosts(who: Who) -> dict[str, str]:
        require(who, "read")
        text = await manager.known_hosts_text()
        ids = await scoped_ids(who)
        if ids is not None:  # lines are "ID,ID.dpanel KEY"
            text = "".join(line for line in text.splitlines(keepends=True)
                           if line.split(",", 1)[0] in ids)
        return {"known_hosts": text, "path": str(await manager.write_known_hosts())}

    exec_schema = ExecIn.model_json_schema(ref_template="#/components/schemas/{model}")
    exec_doc: dict[str, Any] = {
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": exec_schema},
            "application/x-ndjson": {"schema": {
                "type": "string", "description": "first line: the exec request (as for "
                "application/json); then {\"stdin\": \"<base64>\"} lines, streamed to the "
                "remote stdin; the end of the body is EOF"}}}},
        "responses": {"200": {"description": "stream=true: NDJSON events (dpanel_proto."
                              "events); stream=false: ExecOut", "content": {
                                  "application/x-ndjson": {"schema": {"type": "string"}},
                                  "application/json": {"schema": ExecOut.model_json_schema(
                                      ref_template="#/components/schemas/{model}")}}}},
    }

    @app.post("/v1/devices/{device}/exec", response_model=None, openapi_extra=exec_doc)
    async def exec_(who: Who, device: str, request: Request) -> Response:
        """Run a command. Output streams as NDJSON with heartbeats; when the client hangs
        up the command is hung up too (the agent ends its process group)."""
        try:
            await allowed(who, "exec", device)
        except DPanelError as exc:  # a refusal is audited, and counted, too
            EXEC_RESULTS.labels(label(exc.code)).inc()
            await record_call(manager, who, device[:63], "exec", "", exc.code.value, request)
            raise
        body_in = _Body(request.receive)
        ndjson = request.headers.get("content-type", "").startswith("application/x-ndjson")
        raw = await (body_in.line() if ndjson else body_in.read_all())
        if not raw:
            raise RequestValidationError([{"loc": ("body",), "msg": "no exec request"}])
        try:
            body = ExecIn.model_validate_json(raw)
        except ValidationError as exc:
            return _invalid(list(exc.errors()))
        command = body.command if isinstance(body.command, str) else shlex.join(body.command)
        stdin = base64.b64decode(body.stdin) if body.stdin is not None else None
        # Start before answering, so that "offline", "refused" and "timed out" come back
        # as HTTP errors; output and the exit status then stream.
        # the device records who this is for and links its record to ours (audit.py)
        correlation = secrets.token_hex(16)
        source = request.client.host if request.client else ""
        env = {"DPANEL_OPERATOR": who.name, "DPANEL_SOURCE": source,
               "DPANEL_AUDIT_ID": correlation}
        try:
            cmd = await manager.start_exec(device, command, stdin, stream_stdin=ndjson,
                                           timeout=body.timeout, env=env)
        except DPanelError as exc:
            await record_call(manager, who, device[:63], "exec", command,
                              exc.code.value, request, correlation)
            raise
        await record_call(manager, who, device, "exec", command, "started", request,
                          correlation)
        session = _Session(cmd, body_in, ndjson)
        if not body.stream:
            try:
                return await session.collect(body.max_output)
            finally:
                cmd.close()
        return _ExecStream(session, heartbeat)

    add_audit_routes(app, manager, _auth)
    from .jobs_api import add_job_routes

    add_job_routes(app, manager, _auth)  # /v1/jobs
    from .updates_api import add_update_routes

    add_update_routes(app, manager, _auth)  # /v1/agent
    from .fleet_api import add_fleet_routes

    add_fleet_routes(app, manager, _auth)  # /v1/tunnel-servers (remote tunnel servers)
    from . import webpanel

    webpanel.install(app, manager)  # the fleet web panel: /, /web/* (issue 10)
    return app


class _Body:
    """The request body, read straight from ASGI ``receive`` so that an exec can go on
    reading stdin lines while it answers, and can tell when its client hangs up."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._buf = bytearray()
        self._more = True
        self.gone = asyncio.Event()

    async def _fill(self) -> bool:
        if not self._more:
            return False
        msg = await self._receive()
        if msg["type"] == "http.disconnect":
            self._more = False
            self.gone.set()
            return False
        self._buf += msg.get("body", b"")
        self._more = bool(msg.get("more_body", False))
        return True

    async def read_all(self) -> bytes:
        while await self._fill():
            if len(self._buf) > _MAX_LINE:
                raise RequestValidationError([{"loc": ("body",),
                                               "msg": f"longer than {_MAX_LINE} bytes"}])
        data = bytes(self._buf)
        self._buf.clear()
        return data

    async def line(self) -> Optional[bytes]:
        """The next line (without its newline), the unterminated rest at the end of the
        body, or None when nothing is left."""
        start = 0
        while True:
            nl = self._buf.find(b"\n", start)
            if nl >= 0:
                out = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                return out
            start = len(self._buf)
            if start > _MAX_LINE:
                raise RequestValidationError([{"loc": ("body",),
                                               "msg": f"a line is longer than {_MAX_LINE} "
                                                      "bytes"}])
            if not await self._fill():
                if self._buf:
                    out = bytes(self._buf)
                    self._buf.clear()
                    return out
                return None

    async def wait_gone(self) -> None:
        """Return when the client has hung up (reads and drops any body left)."""
        while await self._fill():
            self._buf.clear()
        if not self.gone.is_set():
            while (await self._receive())["type"] != "http.disconnect":
                pass
            self.gone.set()


class _StdinError(Exception):
    pass


class _Session:
    """One running exec with its HTTP client: stdin in, events out, hang-up watched."""

    def __init__(self, cmd: RemoteCommand, body: _Body, stream_stdin: bool) -> None:
        self.cmd, self.body, self.stream_stdin = cmd, body, stream_stdin

    async def _stdin_chunks(self) -> AsyncIterator[bytes]:
        while (line := await self.body.line()) is not None:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                yield base64.b64decode(obj["stdin"], validate=True)
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise _StdinError("stdin: a line is not {\"stdin\": \"<base64>\"}") from None

    async def client(self) -> None:
        """Feed stdin from the body (if streamed), then wait for the hang-up; returns
        only when the client is gone."""
        if self.stream_stdin:
            try:
                await self.cmd.feed(self._stdin_chunks())
            except _StdinError as exc:
                log.warning("exec on %s: %s; hanging up", self.cmd.device, exc)
                return
        await self.body.wait_gone()

    async def collect(self, limit: int) -> Response:
        keep = {"stdout": bytearray(), "stderr": bytearray()}
        seen = {"stdout": 0, "stderr": 0}
        status: list[int] = []

        async def run() -> None:
            async for kind, data in self.cmd.events():
                if isinstance(data, int):
                    status.append(data)
                    continue
                seen[kind] += len(data)
                room = limit - len(keep[kind])
                if room > 0:
                    keep[kind] += data[:room]  # bytearray: linear, whatever the size

        runner = asyncio.ensure_future(run())
        watcher = asyncio.ensure_future(self.client())
        try:
            await asyncio.wait({runner, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not runner.done():
                runner.cancel()  # the client went away: hang the command up
        if not runner.done() or runner.cancelled():
            return Response(status_code=499)  # nobody reads this
        runner.result()  # a device error mid-command: the DPanelError handler answers
        # base64 + JSON of up to 2 x 64 MiB takes a while: never on the event loop
        payload = await asyncio.to_thread(_answer, keep, seen, status[-1], limit)
        return Response(payload, media_type="application/json")


def _answer(keep: dict[str, bytearray], seen: dict[str, int], status: int,
            limit: int) -> bytes:
    out: dict[str, Any] = {"exit": status, "truncated": any(n > limit for n in seen.values())}
    for kind, data in keep.items():
        out[f"{kind}_b64"] = base64.b64encode(data).decode()
        out[kind] = data.decode(errors="replace")
        out[f"{kind}_bytes"] = seen[kind]
    return json.dumps(out).encode()


class _ExecStream(Response):
    """The NDJSON answer: events as they come, a heartbeat after each ``heartbeat`` s of
    silence, and the command hung up as soon as the client goes away."""

    media_type = "application/x-ndjson"

    def __init__(self, session: _Session, heartbeat: float) -> None:
        super().__init__(media_type=self.media_type)
        # no content-length: the body is chunked, for as long as the command runs
        self.raw_headers = [(b"content-type", b"application/x-ndjson"),
                            (b"cache-control", b"no-store")]
        self.session, self.heartbeat = session, heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cmd = self.session.cmd
        queue: asyncio.Queue[Union[ExecEvent, DPanelError, None]] = asyncio.Queue(maxsize=8)

        async def pump() -> None:
            try:
                async for ev in cmd.events():
                    await queue.put(ev)
            except DPanelError as exc:
                await queue.put(exc)
                return
            await queue.put(None)

        pumper = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(self.session.client())
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, watcher}, timeout=self.heartbeat,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if watcher in done:
                        return  # the client hung up: the finally hangs the command up
                    line = encode_event(Heartbeat())
                else:
                    item = getter.result()
                    if item is None:
                        break
                    if isinstance(item, DPanelError):
                        line = encode_event(Error(str(item), item.code.value))
                    else:
                        line = _line(item)
                await send({"type": "http.response.body", "body": line, "more_body": True})
                if getter.done() and isinstance(getter.result(), DPanelError):
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client hung up mid-send
        finally:
            watcher.cancel()
            pumper.cancel()
            cmd.close()


def _line(event: tuple[str, Union[bytes, int]]) -> bytes:
    kind, data = event
    if isinstance(data, int):
        return encode_event(Exit(data))
    out: Literal["stdout", "stderr"] = "stderr" if kind == "stderr" else "stdout"
    return encode_event(Output(out, data))

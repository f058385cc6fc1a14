"""The fleet web panel on the API's origin: the page, browser sessions, live presence, terminal.

Why a session cookie and not the bearer token in the page: a token kept where scripts can
read it (localStorage) is one XSS away from leaking. The operator pastes a token once
(``POST /web/login``); the manager keeps it server-side in memory, and the browser holds
only a random session id in an ``HttpOnly; Secure; SameSite=Strict`` ``__Host-`` cookie.
Every ``/v1`` route accepts that session (``api._auth`` asks :meth:`Sessions.principal`),
so the page uses the same routes, checks and audit as the CLI; a state-changing call must
also carry the session's CSRF token in ``X-CSRF-Token`` (double submit: the token is in
a script-readable cookie and must come back in the header, which a cross-site form or
image cannot set) and a same-origin ``Origin`` when the browser sends one. Each request
re-authenticates the stored token, so a revoked operator's sessions die at once.

Live presence is one Server-Sent Events stream per browser (``GET /web/events``): the
manager's presence listener feeds a :class:`Hub` that computes each device's view, sends
only what changed, and batches whatever queued up into one message per write, so 3,000
devices reconnecting are a few messages, not 3,000 per browser; nothing polls.

The terminal (``/web/devices/{device}/terminal``, WebSocket) is a PTY shell over the
device's pooled SSH connection, the same one exec uses: the device's SSH server records
it (asciicast) under the operator named in ``DPANEL_OPERATOR``, as for any shell. The
upgrade is authenticated by the session cookie and an ``Origin`` check (browsers cannot
set headers on a WebSocket, and must never put a token in the URL), plus the CSRF token
in the first message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketState

from dpanel_proto.wire import printable

from ._asgi import OnResponseStart
from .authz import Principal, in_scope, require
from .errors import DPanelError
from .hostkeys import fingerprint
from .manager import Manager

__all__ = ["CSP", "Hub", "Sessions", "install"]

log = logging.getLogger("dpanel.web")

SESSION_COOKIE = "__Host-dpanel_session"
CSRF_COOKIE = "__Host-dpanel_csrf"
CSRF_HEADER = "x-csrf-token"
#: A session ends after this long unused, and at the latest this long after login.
IDLE_S = float(os.environ.get("DPANEL_WEB_IDLE") or 3600)
MAX_AGE_S = float(os.environ.get("DPANEL_WEB_MAX_AGE") or 12 * 3600)
#: Sessions kept at most (a login flood evicts the oldest, never grows memory).
MAX_SESSIONS = 10_000
#: Live streams per session: a fifth tab drops the oldest stream (it reconnects).
MAX_STREAMS_PER_SESSION = 4
#: Events a slow stream may have queued before it is dropped (the page reloads the list).
MAX_QUEUED = 50_000
_HEARTBEAT_S = 15.0

#: script-src 'self' only: no inline script, no eval. style-src allows inline styles
#: because xterm.js's DOM renderer writes <style> elements for its theme and cell sizes
#: (no device string ever reaches a style). Nothing may frame the panel.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".LICENSE": "text/plain; charset=utf-8",
          ".svg": "image/svg+xml"}
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass
class WebSession:
    token: str  # the operator's (or admin) token, only ever in this process's memory
    csrf: str
    name: str
    created: float = field(default_factory=time.time)
    used: float = field(default_factory=time.time)
    streams: list[asyncio.Event] = field(default_factory=list)


class Sessions:
    """Server-side browser sessions, keyed by the SHA-256 of the cookie's random id."""

    def __init__(self, authenticate: Callable[[str], Principal]) -> None:
        self._authenticate = authenticate
        self._by_id: dict[str, WebSession] = {}

    def create(self, token: str) -> tuple[str, WebSession, Principal]:
        principal = self._authenticate(token)  # 401 for a wrong or revoked token
        if len(self._by_id) >= MAX_SESSIONS:
            oldest = min(self._by_id, key=lambda k: self._by_id[k].used)
            self._by_id.pop(oldest)
        sid = secrets.token_urlsafe(32)
        session = WebSession(token, secrets.token_urlsafe(32), principal.name)
        self._by_id[_hash(sid)] = session
        return sid, session, principal

    def get(self, sid: Optional[str]) -> Optional[WebSession]:
        if not sid:
            return None
        key = _hash(sid)
        s = self._by_id.get(key)
        now = time.time()
        if s is None:
            return None
        if now - s.used > IDLE_S or now - s.created > MAX_AGE_S:
            self.drop(sid)
            return None
        s.used = now
        return s

    def drop(self, sid: str) -> None:
        s = self._by_id.pop(_hash(sid), None)
        if s is not None:
            for ev in s.streams:
                ev.set()

    def principal(self, request: Request) -> Optional[Principal]:
        """The caller of an API request made with a session cookie (None: no session,
        so the route's bearer check answers 401); 403 without the CSRF token."""
        sid = request.cookies.get(SESSION_COOKIE)
        s = self.get(sid)
        if s is None:
            return None
        if request.method in _UNSAFE:
            _check_origin(request.headers.get("origin"), request.headers.get("host"))
            sent = request.headers.get(CSRF_HEADER, "")
            if not secrets.compare_digest(sent.encode(), s.csrf.encode()):
                raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token)")
        try:
            return self._authenticate(s.token)
        except HTTPException:
            assert sid is not None
            self.drop(sid)  # revoked meanwhile: the session dies with the token
            raise


def _check_origin(origin: Optional[str], host: Optional[str]) -> None:
    """A browser's Origin must name this very host (any scheme: http on loopback and
    https share the app); no Origin at all is a non-browser client."""
    if origin is None:
        return
    if not host or urlsplit(origin).netloc.lower() != host.lower():
        raise HTTPException(403, f"cross-origin request refused (Origin {printable(origin)[:80]})")


def _security_headers(message: Message) -> None:
    """The panel's headers on every HTTP answer, the API's JSON included (an answer's own
    header of the same name wins)."""
    have = {k.lower() for k, _ in message.get("headers", [])}
    message["headers"] = [*message.get("headers", []),
                          *(h for h in _SECURITY_HEADERS if h[0] not in have)]


class Hub:
    """Presence changes -> every live stream, filtered by scope, only what changed."""

    def __init__(self, manager: Manager) -> None:
        self._m = manager
        self.seq = 0
        self._last: dict[str, dict[str, Any]] = {}  # device -> the view last announced
        self._since: dict[str, float] = {}
        self._labels: dict[str, dict[str, str]] = {}
        self._subs: dict[asyncio.Queue[dict[str, Any]], Principal] = {}
        self._pending: set[str] = set()
        self._flush_scheduled = False

    def view(self, device: str, last_seen: Optional[float] = None) -> dict[str, Any]:
        p = self._m.presence.get(device)
        state = p.state if p else "offline"
        prev = self._last.get(device)
        if prev is None or prev["state"] != state:
            since = (None if p is None else p.not_answering_since
                     if state == "not_answering" else p.since if state == "online" else None)
            self._since[device] = since or last_seen or self._since.get(device) or time.time()
        return {"id": device, "state": state, "since": self._since.get(device),
                "agent_version": p.agent_version if p else "",
                "port": p.port if p and p.online else None,
                "host_key_ok": p.host_key_ok if p else True}

    def remember(self, device: str, labels: dict[str, str], view: dict[str, Any]) -> None:
        self._labels[device] = labels
        self._last[device] = view

    def changed(self, device: str) -> None:
        """The presence listener: coalesce on the event loop, then diff and send."""
        self._pending.add(device)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, set()
        names = set(self._last) | set(self._m.presence) if "*" in pending else pending
        for device in names:
            if device == "*":
                continue
            v = self.view(device)
            if self._last.get(device) == v:
                continue
            self._last[device] = v
            self.seq += 1
            event = dict(v, seq=self.seq)
            labels = self._labels.get(device)
            for q, who in list(self._subs.items()):
                if who.scope and (labels is None or not in_scope(who, labels)):
                    continue  # a device of unknown labels reaches only unscoped callers
                if q.qsize() >= MAX_QUEUED:
                    self._subs.pop(q, None)
                    q.put_nowait({"overflow": True})
                    continue
                q.put_nowait(event)

    def subscribe(self, who: Principal) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subs[q] = who
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._subs.pop(q, None)

    @property
    def streams(self) -> int:
        return len(self._subs)


def _last_audit(manager: Manager, ids: Optional[set[str]]) -> dict[str, dict[str, Any]]:
    """Each device's newest audit record (one query, portable SQL)."""
    with manager.registry.db.tx() as cur:
        rows = cur.execute("SELECT device, body FROM audit_log WHERE seq IN "
                           "(SELECT MAX(seq) FROM audit_log GROUP BY device)").fetchall()
    out: dict[str, dict[str, Any]] = {}
    for device, body in rows:
        if ids is not None and device not in ids:
            continue
        b = json.loads(body)
        out[str(device)] = {k: b.get(k) for k in ("kind", "user", "command", "exit",
                                                  "result", "started")}
    return out


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every file the page may load, read once: the URL space is this dict, so no path
    from a request ever reaches the file system."""
    root = resources.files("dpanel_server") / "web"
    out: dict[str, tuple[bytes, str]] = {}

    def walk(d: Any, prefix: str) -> None:
        for entry in d.iterdir():
            name = entry.name
            if name.startswith("."):
                continue
            if entry.is_dir():
                walk(entry, f"{prefix}{name}/")
                continue
            ext = "." + name.rsplit(".", 1)[-1] if "." in name else ""
            if ext in _TYPES:
                out[prefix + name] = (entry.read_bytes(), _TYPES[ext])

    walk(root, "")
    return out


def install(app: FastAPI, manager: Manager) -> None:
    """Add the panel's routes, its headers and its session check to the API ``app``."""
    authenticate: Callable[[str], Principal] = app.state.authenticate
    sessions = Sessions(authenticate)
    hub = Hub(manager)
    manager.on_presence(hub.changed)
    app.state.web_principal = sessions.principal
    app.state.web_hub = hub
    app.add_middleware(OnResponseStart, hook=_security_headers)
    files = _static_files()
    if "vendor/xterm.js" not in files:
        log.warning("web panel: xterm.js is missing from the package (run python3 tasks.py "
                    "lint once to fetch it); the terminal will not work")

    def page(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, f"no such file: {printable(name)[:80]}")
        data, ctype = files[name]
        return Response(data, media_type=ctype, headers={"cache-control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return page("index.html")

    @app.get("/web/static/{name:path}", include_in_schema=False)
    async def static(name: str) -> Response:
        return page(name)

    def session_of(request: Request) -> tuple[WebSession, Principal]:
        who = sessions.principal(request)
        s = sessions.get(request.cookies.get(SESSION_COOKIE))
        if who is None or s is None:
            raise HTTPException(401, "not logged in (or the session expired)")
        return s, who

    @app.post("/web/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        _check_origin(request.headers.get("origin"), request.headers.get("host"))
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise HTTPException(415, "login wants a JSON body {\"token\": ...}")
        try:
            body = json.loads(await request.body())
            token = str(body["token"]).strip()
        except (ValueError, KeyError, TypeError):
            raise HTTPException(422, "token: missing") from None
        try:
            sid, s, who = await asyncio.to_thread(sessions.create, token)
        except HTTPException:
            log.info("web login refused from %s", request.client.host if request.client
                     else "?")
            raise HTTPException(401, "wrong or revoked token") from None
        log.info("web login: %s (%s)", printable(who.name), who.role)
        out = JSONResponse(dict(who.as_dict(), csrf=s.csrf))
        common: dict[str, Any] = {"secure": True, "samesite": "strict", "path": "/",
                                  "max_age": int(MAX_AGE_S)}
        out.set_cookie(SESSION_COOKIE, sid, httponly=True, **common)
        out.set_cookie(CSRF_COOKIE, s.csrf, httponly=False, **common)
        return out

    @app.post("/web/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        session_of(request)  # CSRF-checked like every state change
        sessions.drop(request.cookies.get(SESSION_COOKIE) or "")
        out = JSONResponse({"ok": True})
        for name in (SESSION_COOKIE, CSRF_COOKIE):
            out.delete_cookie(name, path="/", secure=True, samesite="strict")
        return out

    @app.get("/web/session", include_in_schema=False)
    async def whoami(request: Request) -> dict[str, Any]:
        s, who = session_of(request)
        return dict(who.as_dict(), csrf=s.csrf)

    @app.get("/web/fleet", include_in_schema=False)
    async def fleet(request: Request) -> dict[str, Any]:
        """Every device in scope, compact, with presence and the last audit record; the
        ``seq`` says which live events the page has already seen."""
        _s, who = session_of(request)
        require(who, "read")
        devices = [d for d in await manager.devices() if in_scope(who, d.labels)]
        ids = None if not who.scope else {d.id for d in devices}
        audit = await asyncio.to_thread(_last_audit, manager, ids)
        rows = []
        seq = hub.seq
        for d in devices:
            v = hub.view(d.id, d.last_seen)
            hub.remember(d.id, d.labels, v)
            if d.revoked:
                v = dict(v, state="revoked")
            rows.append(dict(v, labels=d.labels, last_audit=audit.get(d.id)))
        return {"seq": seq, "devices": rows, "now": time.time()}

    @app.get("/web/devices/{device}", include_in_schema=False)
    async def device_page(device: str, request: Request) -> dict[str, Any]:
        _s, who = session_of(request)
        d = await app.state.allowed(who, "read", device)
        p = manager.presence.get(device)
        announced = p.host_key if p else ""
        return {"id": d.id, "labels": d.labels, "revoked": d.revoked,
                "pinned_fingerprint": fingerprint(d.host_key) if d.host_key else None,
                "announced_fingerprint": fingerprint(announced) if announced else None,
                "pin": ("mismatch" if p and not p.host_key_ok else
                        "pinned" if d.host_key else "not yet pinned"),
                "view": hub.view(d.id, d.last_seen), "tunnel_port": manager.tunnels().get(d.id)}

    @app.get("/web/events", include_in_schema=False)
    async def events(request: Request) -> Response:
        s, who = session_of(request)
        require(who, "read")
        gone = asyncio.Event()
        s.streams.append(gone)
        while len(s.streams) > MAX_STREAMS_PER_SESSION:
            s.streams.pop(0).set()
        q = hub.subscribe(who)
        sid = request.cookies.get(SESSION_COOKIE)

        async def body() -> Any:
            try:
                yield f"event: hello\ndata: {json.dumps({'seq': hub.seq})}\n\n".encode()
                while not gone.is_set():
                    try:
                        first = await asyncio.wait_for(q.get(), _HEARTBEAT_S)
                    except asyncio.TimeoutError:
                        if sessions.get(sid) is None:
                            return  # logged out or expired
                        yield b": ping\n\n"
                        continue
                    batch = [first]
                    while not q.empty() and len(batch) < 5000:
                        batch.append(q.get_nowait())
                    if any("overflow" in e for e in batch):
                        yield b"event: reload\ndata: {}\n\n"
                        return
                    yield f"data: {json.dumps(batch, separators=(',', ':'))}\n\n".encode()
            finally:
                hub.unsubscribe(q)
                if gone in s.streams:
                    s.streams.remove(gone)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store",
                                          "x-accel-buffering": "no"})

    @app.websocket("/web/devices/{device}/terminal")
    async def terminal(ws: WebSocket, device: str) -> None:
        await _terminal(ws, device, manager, sessions, app)


async def _terminal(ws: WebSocket, device: str, manager: Manager, sessions: Sessions,
                    app: FastAPI) -> None:
    from dpanel_proto.codes import ErrorCode

    from .certapi import _deny

    sid = ws.cookies.get(SESSION_COOKIE)
    s = sessions.get(sid)
    try:
        if ws.url.query:
            raise HTTPException(400, "a query string is refused here")
        origin = ws.headers.get("origin")
        if origin is None:
            raise HTTPException(403, "a browser terminal needs an Origin header")
        _check_origin(origin, ws.headers.get("host"))
        if s is None:
            raise HTTPException(401, "not logged in (or the session expired)")
        who = sessions._authenticate(s.token)
        await app.state.allowed(who, "exec", device)
        pooled = await manager.connection(device)
    except HTTPException as exc:
        await _deny(ws, exc.status_code, str(exc.detail),
                    ErrorCode.UNAUTHORIZED if exc.status_code == 401 else
                    ErrorCode.FORBIDDEN if exc.status_code == 403 else ErrorCode.INVALID)
        return
    except DPanelError as exc:
        await _deny(ws, exc.http_status, str(exc), exc.code)
        return
    await ws.accept()
    try:
        first = json.loads(await asyncio.wait_for(ws.receive_text(), 30))
        if not secrets.compare_digest(str(first.get("csrf", "")).encode(), s.csrf.encode()):
            await ws.close(code=1008, reason="wrong CSRF token")
            return
        cols, rows = _size(first)
    except (ValueError, TypeError, AttributeError, asyncio.TimeoutError, KeyError,
            WebSocketDisconnect):
        await ws.close(code=1008, reason="first message: {csrf, cols, rows}")
        return
    correlation = secrets.token_hex(16)
    source = ws.client.host if ws.client else ""
    env = {"DPANEL_OPERATOR": who.name, "DPANEL_SOURCE": source,
           "DPANEL_AUDIT_ID": correlation}
    await asyncio.to_thread(manager.audit.api_record, who.name, device, "shell",
                            "shell (web terminal)", "started", source=source,
                            correlation=correlation)
    pooled.busy += 1  # the pool must not reap a connection with a shell on it
    try:
        proc = await asyncio.wait_for(pooled.conn.create_process(
            term_type="xterm-256color", term_size=(cols, rows), env=env, encoding=None),
            manager.cfg.manager.request_timeout)
    except (OSError, asyncio.TimeoutError, Exception) as exc:  # asyncssh errors vary
        pooled.busy -= 1
        await ws.send_text(json.dumps({"error": f"could not start a shell: "
                                                f"{printable(str(exc))[:200]}"}))
        await ws.close(code=1011)
        return
    log.info("web terminal to %s opened by %s", device, printable(who.name))

    async def down() -> None:
        while True:
            data = await proc.stdout.read(65536)
            if not data:
                break
            await ws.send_bytes(data)

    async def up() -> None:
        while True:
            msg: Any = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            if msg.get("bytes"):
                proc.stdin.write(msg["bytes"])
                await proc.stdin.drain()
            elif msg.get("text"):
                try:
                    c, r = _size(json.loads(msg["text"]))
                except (ValueError, TypeError, AttributeError, KeyError):
                    continue
                proc.change_terminal_size(c, r)

    tasks = [asyncio.ensure_future(down()), asyncio.ensure_future(up())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not proc.is_closing():
            proc.close()
        try:
            result = await asyncio.wait_for(proc.wait(), 5)
            status: Optional[int] = result.exit_status
        except (asyncio.TimeoutError, Exception):
            status = None
        pooled.busy -= 1
        pooled.last_used = time.monotonic()
        if ws.application_state == WebSocketState.CONNECTED and \
                ws.client_state == WebSocketState.CONNECTED:
            try:
                await ws.send_text(json.dumps({"exit": status}))
                await ws.close(code=1000)
            except (RuntimeError, OSError, WebSocketDisconnect):
                pass
        log.info("web terminal to %s closed (%s, exit %s)", device, printable(who.name),
                 status)


def _size(msg: dict[str, Any]) -> tuple[int, int]:
    cols, rows = int(msg["cols"]), int(msg["rows"])
    if not (1 <= cols <= 1000 and 1 <= rows <= 1000):
        raise ValueError("terminal size out of range")
    return cols, rows

"""Unit tests of the web panel's sessions: expiry, CSRF, Origin, revocation (webpanel.py)."""

from __future__ import annotations

import pytest
from fastapi import HTTPException
from starlette.requests import Request

from dpanel_server import webpanel
from dpanel_server.authz import Principal
from dpanel_server.webpanel import CSRF_HEADER, SESSION_COOKIE, Sessions

GOOD = {"tok-admin": Principal("admin", "admin"), "tok-vera": Principal("vera", "viewer")}


def _auth(token: str) -> Principal:
    if token not in GOOD:
        raise HTTPException(401, "wrong")
    return GOOD[token]


def _req(method: str, sid: str | None, csrf: str | None = None,
         origin: str | None = None) -> Request:
    headers = [(b"host", b"panel.example:443")]
    if sid is not None:
        headers.append((b"cookie", f"{SESSION_COOKIE}={sid}".encode()))
    if csrf is not None:
        headers.append((CSRF_HEADER.encode(), csrf.encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return Request({"type": "http", "method": method, "path": "/v1/x", "headers": headers,
                    "query_string": b""})


def test_a_session_stands_for_its_token_and_state_changes_need_csrf_and_our_origin() -> None:
    s = Sessions(_auth)
    with pytest.raises(HTTPException):
        s.create("tok-nobody")
    sid, session, who = s.create("tok-admin")
    assert who.name == "admin" and session.token == "tok-admin"
    assert s.principal(_req("GET", sid)) == GOOD["tok-admin"]
    assert s.principal(_req("GET", None)) is None
    assert s.principal(_req("GET", "forged")) is None
    for csrf, origin in ((None, None), ("wrong", None),
                         (session.csrf, "https://evil.example")):
        with pytest.raises(HTTPException) as err:
            s.principal(_req("POST", sid, csrf, origin))
        assert err.value.status_code == 403
    assert s.principal(_req("POST", sid, session.csrf, "https://panel.example:443")) == \
        GOOD["tok-admin"]
    assert s.principal(_req("DELETE", sid, session.csrf)) == GOOD["tok-admin"]


def test_sessions_expire_when_idle_and_die_with_a_revoked_token(monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    s = Sessions(_auth)
    sid, session, _ = s.create("tok-vera")
    session.used -= webpanel.IDLE_S + 1
    assert s.principal(_req("GET", sid)) is None  # idle too long: gone for good
    session.used += webpanel.IDLE_S + 1
    assert s.get(sid) is None
    sid, session, _ = s.create("tok-vera")
    session.created -= webpanel.MAX_AGE_S + 1  # used a moment ago, but too old
    assert s.get(sid) is None
    sid, _, _ = s.create("tok-vera")
    monkeypatch.delitem(GOOD, "tok-vera")  # the operator is revoked
    with pytest.raises(HTTPException):
        s.principal(_req("GET", sid))
    assert s.get(sid) is None


def test_a_login_flood_evicts_the_oldest_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webpanel, "MAX_SESSIONS", 3)
    s = Sessions(_auth)
    first = s.create("tok-admin")[0]
    for _ in range(5):
        s.create("tok-admin")
    assert s.get(first) is None and len(s._by_id) == 3

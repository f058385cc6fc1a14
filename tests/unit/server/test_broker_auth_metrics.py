"""The broker-auth counter: one per question the broker asked, by check; a caller
without the secret path segment is not the broker and is not counted."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from dpanel_server.brokerauth import create_auth_app


def _count(check: str) -> float:
    value = REGISTRY.get_sample_value("dpanel_broker_auth_requests_total", {"check": check})
    return value or 0.0


def test_each_question_is_counted_by_check() -> None:
    c = TestClient(create_auth_app("sec", "mgr", "mpw", lambda _d, _s: True))
    before = {k: _count(k) for k in ("user", "vhost", "resource", "topic")}
    c.post("/brokerauth/sec/user", data={"username": "d1", "password": "s"})
    c.post("/brokerauth/sec/user", data={"username": "d2", "password": "s"})
    c.post("/brokerauth/sec/vhost", data={"username": "d1", "vhost": "/"})
    c.post("/brokerauth/sec/topic", data={"username": "d1", "vhost": "/"})
    assert c.post("/brokerauth/nope/user", data={"username": "d1"}).status_code == 404
    after = {k: _count(k) - v for k, v in before.items()}
    assert after == {"user": 2, "vhost": 1, "resource": 0, "topic": 1}

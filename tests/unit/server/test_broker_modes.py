"""Unit checks of the broker modes: the HTTP backend's rule, multi-URL tokens and config,
and the dynamic-security file repair (its real-broker tests are in tests/integration)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dpanel_proto.token import DeviceToken, parse_token
from dpanel_proto.wire import DecodeError
from dpanel_server.broker import mosquitto_hash
from dpanel_server.brokerauth import create_auth_app, device_may, mqtt_to_amqp
from dpanel_server.config import ConfigError, load_config
from dpanel_server.dynsec import device_acls, merge_missing

_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFQ7hXn0Yt8Cq1p3J0k4r2S1o9tq6V0m6c7r9uQmQ2bS"


def test_device_rule_is_its_own_subtree_only() -> None:
    assert device_may("d1", "write", "dpanel/v1/dev/d1/status")
    assert device_may("d1", "read", "dpanel/v1/dev/d1/req")
    assert not device_may("d1", "write", "dpanel/v1/dev/d1/req")
    assert not device_may("d1", "read", "dpanel/v1/dev/d2/req")
    assert not device_may("d1", "read", "dpanel/v1/dev/+/req")
    assert mqtt_to_amqp("dpanel/v1/dev/+/status") == "dpanel.v1.dev.*.status"
    assert {a["topic"] for a in device_acls("d1")} == {
        "dpanel/v1/dev/d1/status", "dpanel/v1/dev/d1/resp", "dpanel/v1/dev/d1/req"}


def test_http_backend_answers() -> None:
    ok = {"d1": "s1"}
    app = create_auth_app("sec", "mgr", "mpw", lambda d, s: ok.get(d) == s)
    c = TestClient(app)

    def ask(path: str, **form: str) -> str:
        r = c.post(f"/brokerauth/sec/{path}", data=form)
        assert r.status_code == 200
        return r.text

    assert c.post("/brokerauth/nope/user", data={"username": "mgr"}).status_code == 404
    assert ask("user", username="mgr", password="mpw") == "allow"
    assert ask("user", username="mgr", password="x") == "deny"
    assert ask("user", username="d1", password="s1") == "allow"
    assert ask("user", username="d1", password="s1", client_id="d2") == "deny"
    assert ask("user", username="d1", password="bad") == "deny"
    assert ask("user", username="BAD\n", password="s1") == "deny"
    assert ask("vhost", username="d1", vhost="/") == "allow"
    assert ask("vhost", username="d1", vhost="other") == "deny"
    topic = {"vhost": "/", "resource": "topic", "name": "amq.topic"}
    assert ask("topic", username="d1", permission="write",
               routing_key="dpanel.v1.dev.d1.status", **topic) == "allow"
    assert ask("topic", username="d1", permission="write",
               routing_key="dpanel.v1.dev.d2.status", **topic) == "deny"
    assert ask("topic", username="d1", permission="read",
               routing_key="dpanel.v1.dev.*.req", **topic) == "deny"
    assert ask("topic", username="mgr", permission="read",
               routing_key="dpanel.v1.dev.*.status", **topic) == "allow"
    assert ask("topic", username="mgr", permission="write", routing_key="other.x",
               **topic) == "deny"
    assert ask("resource", username="d1", vhost="/", resource="queue",
               name="mqtt-subscription-d2qos0", permission="read") == "deny"
    assert ask("resource", username="d1", vhost="/", resource="queue",
               name="mqtt-subscription-d1qos0", permission="read") == "allow"


def _tok(broker: str) -> DeviceToken:
    return DeviceToken(device="dev-1", secret="s" * 43, broker=broker, tunnel="127.0.0.1:2220",
                       tunnel_host_key=_KEY, manager_key=_KEY)


def test_token_lists_several_brokers() -> None:
    t = _tok("mqtt://10.0.0.1:1883,mqtt://10.0.0.2:1884")
    assert parse_token(t.encode()).broker_urls == ["mqtt://10.0.0.1:1883", "mqtt://10.0.0.2:1884"]
    assert _tok("mqtt://h:1").broker_urls == ["mqtt://h:1"]  # the old single form
    with pytest.raises(DecodeError, match="mixes"):
        _tok("mqtt://a:1,mqtts://b:2")
    with pytest.raises(DecodeError, match="token broker"):
        _tok("mqtt://a:1,")


def test_broker_auth_is_validated(tmp_path: Path) -> None:
    conf = tmp_path / "s.toml"
    conf.write_text('[broker]\nauth = "ldap"\n')
    with pytest.raises(ConfigError, match=r"broker\.auth"):
        load_config(conf)
    conf.write_text('[broker]\nurl = "mqtt://127.0.0.1:1,mqtt://127.0.0.1:2"\n')
    assert load_config(conf).broker.host_ports == [("127.0.0.1", 1), ("127.0.0.1", 2)]


def test_dynsec_file_is_bootstrapped_then_only_repaired(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    h1 = mosquitto_hash("secret-1")
    assert merge_missing(path, "mgr", "mpw", [("d1", h1)]) == ["created"]
    assert path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(path.read_text())
    d1 = next(c for c in doc["clients"] if c["username"] == "d1")
    # the file's fields are the $7$ hash split up: the device's secret logs in
    digest = hashlib.pbkdf2_hmac("sha512", b"secret-1", base64.b64decode(d1["salt"]),
                                 d1["iterations"])
    assert base64.b64encode(digest).decode() == d1["password"]
    before = path.read_bytes()
    assert merge_missing(path, "mgr", "mpw", [("d1", h1)]) == []
    assert path.read_bytes() == before  # nothing differs: nothing written
    changed = merge_missing(path, "mgr", "mpw", [("d2", mosquitto_hash("s2"))], ["d1"])
    assert changed == ["d2", "d1"]
    doc = json.loads(path.read_text())
    assert next(c for c in doc["clients"] if c["username"] == "d1")["disabled"] is True
    assert merge_missing(path, "mgr", "new-password", [])[0] == "mgr"

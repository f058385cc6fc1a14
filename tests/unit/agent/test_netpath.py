"""Field networks on the agent side: token edge/proxy fields, where the agent dials, and
the link profiles of its config."""

from __future__ import annotations

import dataclasses
import json
import zlib

import pytest

from dpanel_agent.config import ConfigError, parse_config
from dpanel_agent.netpath import ALPN_MQTT, ALPN_SSH, mqtt_endpoint, ssh_endpoint
from dpanel_agent.profiles import PROFILES
from dpanel_proto.proxy import Proxy
from dpanel_proto.token import DeviceToken, parse_token
from dpanel_proto.wire import DecodeError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZ0dj4Z4cq3PNbX9BRgswD4Lw1DOcGyx2Sz9Ep8hH3S"
CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _token(**kw: object) -> DeviceToken:
    base: dict[str, object] = dict(device="dev-1", secret="s" * 43, broker="mqtt://b.lan:1883",
                                   tunnel="t.lan:2220", tunnel_host_key=KEY, manager_key=KEY)
    base.update(kw)
    return DeviceToken(**base)  # type: ignore[arg-type]


def test_old_tokens_still_parse_and_new_fields_round_trip() -> None:
    old = _token()
    assert parse_token(old.encode()) == old
    assert "edge" not in old.encode()  # absent fields are left out: old agents read it
    new = _token(broker_ca=CA, edge="e.example:443", proxy="http://u:p@px:3128")
    assert parse_token(new.encode()) == new


def test_edge_needs_the_ca_and_fields_are_checked() -> None:
    with pytest.raises(DecodeError, match="token edge: needs broker_ca"):
        _token(edge="e.example:443")
    with pytest.raises(DecodeError, match="token edge"):
        _token(broker_ca=CA, edge="e.example:99999")
    with pytest.raises(DecodeError, match="token proxy"):
        _token(proxy="socks5://x:1")
    raw = json.dumps({**dataclasses.asdict(_token()), "edge": 5}).encode()
    body = zlib.compress(raw)
    import base64
    text = f"dpt1.{base64.urlsafe_b64encode(body).decode().rstrip('=')}.{zlib.crc32(body):08x}"
    with pytest.raises(DecodeError, match="token edge: not a string"):
        parse_token(text)


def test_endpoints_direct_edge_and_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    t = _token()
    m, s = mqtt_endpoint(t, None), ssh_endpoint(t, None)
    assert (m.host, m.port, m.tls, m.alpn, m.proxy) == ("b.lan", 1883, False, None, None)
    assert (s.host, s.port, s.tls) == ("t.lan", 2220, False)
    e = _token(broker_ca=CA, edge="e.example:443")
    m, s = mqtt_endpoint(e, "http://px:8080"), ssh_endpoint(e, "http://px:8080")
    assert (m.host, m.port, m.tls, m.alpn) == ("e.example", 443, True, ALPN_MQTT)
    assert (s.host, s.port, s.tls, s.alpn) == ("e.example", 443, True, ALPN_SSH)
    assert m.proxy == s.proxy == Proxy("px", 8080)
    monkeypatch.setenv("https_proxy", "http://envpx:1")
    monkeypatch.setenv("no_proxy", "t.lan")
    assert mqtt_endpoint(t, None).proxy == Proxy("envpx", 1)
    assert ssh_endpoint(t, None).proxy is None  # no_proxy names the tunnel host


def test_profiles_set_defaults_that_keys_override() -> None:
    cfg = parse_config('profile = "metered"\n')
    assert cfg.mqtt_keepalive == PROFILES["metered"]["mqtt_keepalive"] >= 900
    assert cfg.reconnect_max == PROFILES["metered"]["reconnect_max"]
    cfg = parse_config('profile = "metered"\nmqtt_keepalive = 300\n')
    assert cfg.mqtt_keepalive == 300
    assert parse_config("").mqtt_keepalive == 60
    with pytest.raises(ConfigError, match="profile"):
        parse_config('profile = "cheap"\n')


def test_config_proxy_is_checked_and_never_echoed() -> None:
    assert parse_config('proxy = "http://u:pw@px:3128"\n').proxy == "http://u:pw@px:3128"
    assert parse_config('proxy = "none"\n').proxy == "none"
    with pytest.raises(ConfigError, match="proxy") as exc:
        parse_config('proxy = "ftp://u:topsecret@px:21"\n', "agent.toml")
    assert "topsecret" not in str(exc.value) and "agent.toml:1" in str(exc.value)
    assert "pw@" not in repr(parse_config('proxy = "http://u:pw@px:3128"\n'))

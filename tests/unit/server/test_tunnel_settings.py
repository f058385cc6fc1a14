"""Unit tests of TunnelSettings validation and the tunnel host key handling."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from dpanel_server.config import TunnelConfig
from dpanel_server.errors import ConfigError
from dpanel_server.tunnel import TunnelServer, TunnelSettings, host_key_line


def settings(tmp_path: Path, **kw: Any) -> TunnelSettings:
    return TunnelSettings(host_key_path=tmp_path / "hk", **kw)


@pytest.mark.parametrize("bind", ["0.0.0.0", "10.1.2.3", "::", "192.168.1.1"])
def test_non_loopback_bind_host_is_refused(tmp_path: Path, bind: str) -> None:
    with pytest.raises(ConfigError, match=r"bind_host: .* not a loopback address"):
        settings(tmp_path, bind_host=bind)


def test_bind_host_must_be_an_address(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bind_host: 'localhost' is not an IP address"):
        settings(tmp_path, bind_host="localhost")


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.2", "::1"])
def test_loopback_bind_hosts_are_accepted(tmp_path: Path, bind: str) -> None:
    assert settings(tmp_path, bind_host=bind).bind_host == bind


@pytest.mark.parametrize(("field", "value", "match"), [
    ("port_min", 80, "port_min/port_max"),
    ("port_max", 70000, "port_min/port_max"),
    ("port_min", 30000, "port_min/port_max"),  # above the default port_max
    ("keepalive_interval", 0, "keepalive_interval"),
    ("keepalive_count_max", 0, "keepalive_count_max"),
    ("login_timeout", 0, "login_timeout"),
    ("max_unauthenticated", 0, "max_unauthenticated"),
    ("sticky_seconds", -1, "sticky_seconds"),
    ("listen_port", 70000, "listen_port"),
    ("handshake_timeout", 0, "handshake_timeout"),
    ("per_source_startups", "10:30", "per_source_startups"),
    ("penalty_min", 0, "penalty_min"),
    ("penalty_authfail", -1, "penalty_authfail"),
    ("sticky_save_delay", -1, "sticky_save_delay"),
])
def test_bad_values_name_the_field(tmp_path: Path, field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        settings(tmp_path, **{field: value})


def test_from_config(tmp_path: Path) -> None:
    cfg = TunnelConfig(listen="127.0.0.1:2999", host_key=str(tmp_path / "k"),
                       port_range="21000-21999", keepalive_interval=7.0)
    s = TunnelSettings.from_config(cfg, sticky_seconds=5)
    assert (s.listen_host, s.listen_port, s.port_min, s.port_max) == ("127.0.0.1", 2999, 21000,
                                                                      21999)
    assert s.keepalive_interval == 7.0 and s.sticky_seconds == 5
    assert s.host_key_path == tmp_path / "k"


def test_host_key_created_private_and_stable(tmp_path: Path) -> None:
    s = settings(tmp_path / "keys")
    first = TunnelServer(s, lambda d, p: False).host_key_line()
    key = tmp_path / "keys" / "hk"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert first.startswith("ssh-ed25519 ")
    # A second server (a restart) keeps the key devices have pinned.
    assert TunnelServer(s, lambda d, p: False).host_key_line() == first
    assert host_key_line(key) == first


def test_unreadable_host_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "hk").write_text("not a key\n")
    with pytest.raises(ConfigError, match="host_key: cannot load"):
        TunnelServer(settings(tmp_path), lambda d, p: False)

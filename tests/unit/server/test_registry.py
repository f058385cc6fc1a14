"""Unit tests of the registry, broker files and config loading."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from dpanel_server.broker import mosquitto_hash, mosquitto_verify, render_acl
from dpanel_server.config import load_config
from dpanel_server.errors import ConfigError, DeviceExists, RegistryError, UnknownDevice
from dpanel_server.registry import Registry


def test_secrets_are_stored_hashed_only(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    _, secret = reg.add("dev-1")
    reg.close()
    raw = (tmp_path / "r.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("r.db*"))
    assert secret.encode() not in raw
    row = sqlite3.connect(tmp_path / "r.db").execute(
        "SELECT secret_hash, broker_hash FROM devices").fetchone()
    assert secret not in row[0] and secret not in row[1]
    assert mosquitto_verify(secret, row[1]) and not mosquitto_verify("wrong", row[1])
    assert stat.S_IMODE((tmp_path / "r.db").stat().st_mode) == 0o600


def test_verify_revoke_and_revision(registry_url: str) -> None:
    reg = Registry(registry_url)
    _, secret = reg.add("dev-1")
    rev = reg.revision()
    assert reg.verify("dev-1", secret)
    assert not reg.verify("dev-1", secret + "x")
    assert not reg.verify("nobody", secret)
    reg.revoke("dev-1")
    assert reg.revision() > rev
    assert not reg.verify("dev-1", secret)
    assert reg.broker_entries() == []
    assert reg.revoked_ids() == {"dev-1"}


def test_enrol_errors(registry_url: str) -> None:
    reg = Registry(registry_url)
    reg.add("dev-1")
    with pytest.raises(DeviceExists):
        reg.add("dev-1")
    with pytest.raises(RegistryError, match="reserved"):
        reg.add("dpanel-manager")
    with pytest.raises(RegistryError, match="device name"):
        reg.add("../etc")
    with pytest.raises(UnknownDevice):
        reg.revoke("ghost")


def test_host_key_pinned_on_first_sight_only(registry_url: str) -> None:
    reg = Registry(registry_url)
    reg.add("dev-1")
    assert reg.pin_host_key("dev-1", "ssh-ed25519 AAAA1") == "ssh-ed25519 AAAA1"
    assert reg.pin_host_key("dev-1", "ssh-ed25519 BBBB2") == "ssh-ed25519 AAAA1"
    reg.reset_host_key("dev-1")
    assert reg.pin_host_key("dev-1", "ssh-ed25519 BBBB2") == "ssh-ed25519 BBBB2"


def test_acl_confines_devices_to_their_subtree() -> None:
    acl = render_acl("dpanel-manager")
    pattern_lines = [ln for ln in acl.splitlines() if ln.startswith("pattern")]
    assert pattern_lines and all("/%u/" in ln for ln in pattern_lines)
    assert "pattern read dpanel/v1/dev/%u/req" in acl
    assert not any("readwrite" in ln for ln in pattern_lines)
    assert mosquitto_hash("x").startswith("$7$101$")


@pytest.mark.parametrize("text,field", [
    ("[tunnel]\nport_range = '10-5'\n", "tunnel.port_range"),
    ("[tunnel]\nlisten = 'host:99999'\n", "tunnel.listen"),
    ("[broker]\nurl = 'http://x'\n", "broker.url"),
    ("[manager]\napi_listen = '0.0.0.0:80'\n", "manager.api_listen"),
    ("[manager]\nrequest_timeout = 'soon'\n", "manager.request_timeout"),
    ("[tunnel]\nbogus = 1\n", "tunnel.bogus"),
    ("tunnel = 3\n", "tunnel"),
    ("this is = not toml [", "not valid TOML"),
])
def test_config_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    p = tmp_path / "server.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert field in str(err.value) and str(p) in str(err.value)


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_host_key_of_another_device_never_pinned(registry_url: str) -> None:
    reg = Registry(registry_url)
    reg.add("dev-a")
    reg.add("dev-b")
    reg.pin_host_key("dev-a", "ssh-ed25519 AAAA")
    assert reg.pin_host_key("dev-b", "ssh-ed25519 AAAA") is None
    assert reg.get("dev-b").host_key is None

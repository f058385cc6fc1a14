"""Unit tests of the SSH user CA and POST /v1/certs: roles, scope -> principals, bounds."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dpanel_proto.token import DeviceToken, parse_token
from dpanel_server import certapi
from dpanel_server.api import _Credentials, _error
from dpanel_server.authz import Principal
from dpanel_server.errors import DPanelError
from dpanel_server.opssh import cert_info
from dpanel_server.registry import Device, UnknownDevice
from dpanel_server.usercert import UserCA


class _FakeManager:
    """The two things the certificate route needs of the manager."""

    def __init__(self, ca: UserCA) -> None:
        self.user_ca = ca
        self._devices = [Device("kiosk-1", 0, labels={"site": "a"}),
                         Device("kiosk-2", 0, labels={"site": "b"}),
                         Device("kiosk-3", 0, labels={"site": "a"})]

    async def devices(self, include_revoked: bool = True) -> list[Device]:
        return self._devices

    async def device(self, name: str) -> Device:
        for d in self._devices:
            if d.id == name:
                return d
        raise UnknownDevice(f"unknown device {name!r}")


def _client(tmp_path: Path, who: Principal) -> TestClient:
    app = FastAPI()
    app.exception_handler(DPanelError)(lambda _r, exc: _error(exc))

    def auth(cred: _Credentials) -> Principal:  # the API's signature, any token is "who"
        return who

    certapi.install(app, _FakeManager(UserCA(tmp_path)), auth)  # type: ignore[arg-type]
    return TestClient(app)


def _pub() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def _post(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/certs", json={"public_key": _pub(), **body})


def test_ca_key_is_created_once_private(tmp_path: Path) -> None:
    ca = UserCA(tmp_path)
    assert oct(os.stat(tmp_path / "user_ca").st_mode & 0o777) == "0o600"
    assert UserCA(tmp_path).public_line == ca.public_line


def test_viewer_gets_403(tmp_path: Path) -> None:
    r = _post(_client(tmp_path, Principal("vera", "viewer")))
    assert r.status_code == 403 and "viewer" in r.json()["error"]


def test_scoped_operator_gets_one_principal_per_device_in_scope(tmp_path: Path) -> None:
    c = _client(tmp_path, Principal("alice", "operator", ("site=a",)))
    r = _post(c, ttl=600)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["principals"] == ["dpanel:kiosk-1", "dpanel:kiosk-3"]
    assert out["key_id"] == "alice"
    assert out["valid_before"] - out["valid_after"] == 660  # backdated 60 s
    assert abs(out["valid_before"] - (time.time() + 600)) < 30
    cert = asyncssh.import_certificate(out["certificate"])
    assert cert.principals == ["dpanel:kiosk-1", "dpanel:kiosk-3"]
    assert cert.signing_key.public_data == asyncssh.import_public_key(out["ca"]).public_data
    assert cert.options.get("permit-pty") and cert.options.get("permit-port-forwarding")
    assert not cert.options.get("permit-agent-forwarding")
    info = cert_info(out["certificate"])  # the CLI's own stdlib parser agrees
    assert info is not None and info.valid_before == out["valid_before"]
    # asking for a device outside the scope is refused, naming it
    r = _post(c, devices=["kiosk-2"])
    assert r.status_code == 403 and "kiosk-2" in r.json()["error"]


def test_admin_gets_the_wildcard(tmp_path: Path) -> None:
    r = _post(_client(tmp_path, Principal("admin", "admin")))
    assert r.status_code == 200 and r.json()["principals"] == ["dpanel:*"]
    assert r.json()["valid_before"] - r.json()["valid_after"] == 3660  # default 1 h


@pytest.mark.parametrize("ttl", [0, 59, 12 * 3600 + 1])
def test_ttl_is_bounded(tmp_path: Path, ttl: int) -> None:
    r = _post(_client(tmp_path, Principal("admin", "admin")), ttl=ttl)
    assert r.status_code == 422 and "ttl" in r.json()["error"]


@pytest.mark.parametrize("key", ["", "ssh-ed25519", "ssh-ed25519 AAAA!!", "ssh-dss AAAA",
                                 "ssh-ed25519-cert-v01@openssh.com AAAA"])
def test_bad_public_key_is_named(tmp_path: Path, key: str) -> None:
    r = _client(tmp_path, Principal("admin", "admin")).post("/v1/certs",
                                                             json={"public_key": key})
    assert r.status_code == 422 and "public_key" in r.json()["error"]


def test_tokens_without_user_ca_still_parse(tmp_path: Path) -> None:
    key = _pub()
    old = DeviceToken(device="d1", secret="s" * 40, broker="mqtt://h:1883", tunnel="h:2222",
                      tunnel_host_key=key, manager_key=key)
    assert parse_token(old.encode()).user_ca is None
    new = DeviceToken(device="d1", secret="s" * 40, broker="mqtt://h:1883", tunnel="h:2222",
                      tunnel_host_key=key, manager_key=key, user_ca=UserCA(tmp_path).public_line)
    assert parse_token(new.encode()).user_ca == new.user_ca


@pytest.mark.parametrize(("who", "device", "status"), [
    (Principal("vera", "viewer"), "kiosk-1", 403),
    (Principal("alice", "operator", ("site=a",)), "kiosk-2", 403),
    (Principal("alice", "operator", ("site=a",)), "nope", 404),
])
def test_proxy_route_checks_role_and_scope(tmp_path: Path, who: Principal, device: str,
                                           status: int) -> None:
    from starlette.testclient import WebSocketDenialResponse

    c = _client(tmp_path, who)
    with pytest.raises(WebSocketDenialResponse) as exc:
        with c.websocket_connect(f"/v1/devices/{device}/proxy",
                                 headers={"Authorization": "Bearer x"}):
            pass
    assert exc.value.status_code == status
    assert device in exc.value.json()["error"] or who.role in exc.value.json()["error"]

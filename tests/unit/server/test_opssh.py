"""Unit tests of the CLI's operator key and certificate cache (a fake API client)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from dpanel_server import opssh


class _FakeApi:
    url = "http://manager.example:8780"

    def __init__(self, ca: asyncssh.SSHKey, ttl: int) -> None:
        self.ca, self.ttl, self.calls = ca, ttl, 0

    def call(self, method: str, path: str, body: Any = None) -> Any:
        assert (method, path) == ("POST", "/v1/certs")
        self.calls += 1
        user = asyncssh.import_public_key(body["public_key"])
        now = int(time.time())
        cert = self.ca.generate_user_certificate(user, "alice", principals=["dpanel:*"],
                                                 valid_after=now - 60,
                                                 valid_before=now + self.ttl)
        return {"certificate": cert.export_certificate().decode()}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DPANEL_SSH_KEY", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return tmp_path


def test_generated_key_is_private_and_stable(home: Path) -> None:
    k1 = opssh.operator_key()
    assert k1.key == home / ".config" / "dpanel" / "id_ed25519"
    assert oct(os.stat(k1.key).st_mode & 0o777) == "0o600"
    assert opssh.operator_key() == k1
    # without its .pub, the public half is derived from the key
    k1.key.with_name("id_ed25519.pub").unlink()
    assert opssh.operator_key().public_line == k1.public_line


def test_existing_id_ed25519_is_preferred(home: Path) -> None:
    ssh = home / ".ssh"
    ssh.mkdir()
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(ssh / "id_ed25519"))
    key.write_public_key(str(ssh / "id_ed25519.pub"))
    k = opssh.operator_key()
    assert k.key == ssh / "id_ed25519"
    api = _FakeApi(asyncssh.generate_private_key("ssh-ed25519"), 3600)
    cert = opssh.ensure_cert(api, k)  # type: ignore[arg-type]
    assert cert.name.startswith("id_ed25519-dpanel-") and cert.name.endswith("-cert.pub")
    assert not (ssh / "id_ed25519-cert.pub").exists()  # never over another CA's cert


def test_cached_certificate_is_reused_until_half_its_life(home: Path) -> None:
    k = opssh.operator_key()
    api = _FakeApi(asyncssh.generate_private_key("ssh-ed25519"), 3600)
    path = opssh.ensure_cert(api, k)  # type: ignore[arg-type]
    opssh.ensure_cert(api, k)  # type: ignore[arg-type]
    assert api.calls == 1
    info = opssh.cert_info(path.read_text())
    assert info is not None and info.valid_before - info.valid_after == 3660
    api.ttl = 10  # a certificate with less than half its life left is renewed
    opssh.ensure_cert(api, k, force=True)  # type: ignore[arg-type]
    opssh.ensure_cert(api, k)  # type: ignore[arg-type]
    assert api.calls == 3
    # a certificate for another key is never used
    other = asyncssh.generate_private_key("ssh-ed25519")
    api.ttl = 3600
    cert = api.ca.generate_user_certificate(other, "x", valid_after=0,
                                            valid_before=int(time.time()) + 3600)
    path.write_bytes(cert.export_certificate())
    opssh.ensure_cert(api, k)  # type: ignore[arg-type]
    assert api.calls == 4


def test_refresh_does_nothing_without_a_cached_certificate(home: Path) -> None:
    api = _FakeApi(asyncssh.generate_private_key("ssh-ed25519"), 3600)
    opssh.refresh_if_cached(api)  # type: ignore[arg-type]
    assert api.calls == 0 and not (home / ".config").exists()


@pytest.mark.parametrize("line", ["", "x", "ssh-ed25519-cert-v01@openssh.com !!!",
                                  "ssh-ed25519-cert-v01@openssh.com AAAA"])
def test_unreadable_certificates_are_none(line: str) -> None:
    assert opssh.cert_info(line) is None

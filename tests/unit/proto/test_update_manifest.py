"""Update manifests: signature over exactly the fields, ELF arch probe, offer decoding."""

from __future__ import annotations

import time
from pathlib import Path

import asyncssh
import pytest

from dpanel_image.synthetic import fake_elf
from dpanel_proto import wire
from dpanel_proto.signing import ManagerKey
from dpanel_proto.update import (
    Manifest,
    elf_arch,
    read_bundle,
    sign_manifest,
    verify_manifest,
    write_bundle,
)

SHA = "ab" * 32


def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def test_signature_covers_every_field() -> None:
    key = _key()
    pub = ManagerKey(key.export_public_key().decode())
    m = Manifest(version="1.2.3", arch="arm64", size=1000, sha256=SHA)
    sig = sign_manifest(m, key)
    assert verify_manifest(m, sig, pub)
    for other in (Manifest("1.2.4", "arm64", 1000, SHA),
                  Manifest("1.2.3", "amd64", 1000, SHA),
                  Manifest("1.2.3", "arm64", 999, SHA),
                  Manifest("1.2.3", "arm64", 1000, "cd" * 32)):
        assert not verify_manifest(other, sig, pub)
    assert not verify_manifest(m, sign_manifest(m, _key()), pub)  # another key
    assert not verify_manifest(m, "not base64!", pub)
    assert not verify_manifest(m, "", pub)


@pytest.mark.parametrize("kw, field", [
    ({"version": "1 2"}, "version"), ({"version": "a\nb"}, "version"),
    ({"version": "1.0\n"}, "version"), ({"sha256": SHA + "\n"}, "sha256"),
    ({"arch": "mips"}, "arch"), ({"size": 0}, "size"), ({"size": True}, "size"),
    ({"sha256": "AB" * 32}, "sha256")])
def test_bad_manifest_fields_name_the_field(kw: dict[str, object], field: str) -> None:
    base: dict[str, object] = {"version": "1", "arch": "amd64", "size": 1, "sha256": SHA}
    with pytest.raises(wire.DecodeError, match=f"^{field}:"):
        Manifest(**{**base, **kw})  # type: ignore[arg-type]


def test_elf_arch() -> None:
    assert elf_arch(fake_elf("arm64")) == "arm64"
    assert elf_arch(fake_elf("armhf")) == "armhf"
    assert elf_arch(fake_elf("amd64")) == "amd64"
    assert elf_arch(Path("/bin/true").read_bytes()[:64]) == "amd64"
    assert elf_arch(b"#!/bin/sh\n" + bytes(30)) is None
    assert elf_arch(b"\x7fELF") is None


def test_bundle_round_trip(tmp_path: Path) -> None:
    key = _key()
    m = write_bundle(tmp_path / "b", Path("/bin/true"), "2.0", "amd64", key)
    got, sig, binary = read_bundle(tmp_path / "b")
    assert got == m and binary.read_bytes() == Path("/bin/true").read_bytes()
    assert verify_manifest(got, sig, ManagerKey(key.export_public_key().decode()))
    (tmp_path / "b" / "manifest.json").write_text("[]")
    with pytest.raises(wire.DecodeError, match="manifest: expected a JSON object"):
        read_bundle(tmp_path / "b")


def _offer(**kw: object) -> dict[str, object]:
    now = time.time()
    d: dict[str, object] = {"v": 1, "type": "update", "device": "d1", "id": "a" * 32,
                            "issued_at": now, "expires_at": now + 60, "version": "2.0",
                            "arch": "amd64", "size": 10, "sha256": SHA, "manifest_sig": "x",
                            "url": "https://m.example/v1/agent/bundles/amd64/2.0/dpanel-tunnel"}
    d.update(kw)
    return d


def test_update_offer_round_trip_and_refusals() -> None:
    import json

    msg = wire.decode(json.dumps(_offer()))
    assert isinstance(msg, wire.UpdateRequest) and msg.commit_timeout == 300
    assert wire.decode(wire.encode(msg)) == msg
    for kw, field in (({"url": "file:///etc/passwd"}, "url"), ({"url": "http://a b"}, "url"),
                      ({"sha256": "zz"}, "sha256"), ({"arch": "mips"}, "arch"),
                      ({"version": "1;rm"}, "version"), ({"size": 0}, "size"),
                      ({"commit_timeout": 1}, "commit_timeout")):
        with pytest.raises(wire.DecodeError, match=f"^{field}:"):
            wire.decode(json.dumps(_offer(**kw)))


def test_status_update_fields_are_checked_and_escaped() -> None:
    import json

    base = {"v": 1, "type": "status", "device": "d1", "state": "online"}
    s = wire.decode(json.dumps({**base, "arch": "arm64", "update_state": "rolled_back",
                                "update_version": "2.0", "update_reason": "a\x1b[2Jb\nc"}))
    assert isinstance(s, wire.Status) and s.update_reason == "a\\x1b[2Jb\\nc"
    with pytest.raises(wire.DecodeError, match=r"^update_state:"):
        wire.decode(json.dumps({**base, "update_state": "pwned"}))
    old = wire.decode(json.dumps(base))  # an agent from before updates
    assert isinstance(old, wire.Status) and old.arch is None and old.update_state is None

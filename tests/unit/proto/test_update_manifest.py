"""Update manifests: signature over exactly the fields, ELF arch probe, offer decoding;
the layout field (signed when onedir, invisible when onefile, so old bundles and old
agents keep verifying) and the onedir bundle's tar."""

from __future__ import annotations

import json
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import asyncssh
import pytest

from dpanel_image.synthetic import fake_elf
from dpanel_proto import wire
from dpanel_proto.signing import ManagerKey
from dpanel_proto.update import (
    Manifest,
    elf_arch,
    file_sha256,
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


# ------------------------------------------------------------------ layouts


def test_onefile_signs_exactly_as_before_the_field_existed() -> None:
    m = Manifest("1.2.3", "arm64", 1000, SHA)
    old = json.dumps({"arch": "arm64", "sha256": SHA, "size": 1000, "version": "1.2.3"},
                     separators=(",", ":"), sort_keys=True)
    assert m.signed_bytes() == b"dpanel-update-v1\0" + old.encode()


def test_layout_is_covered_by_the_signature() -> None:
    key = _key()
    pub = ManagerKey(key.export_public_key().decode())
    d = Manifest("1.2.3", "arm64", 1000, SHA, layout="onedir")
    assert verify_manifest(d, sign_manifest(d, key), pub)
    assert not verify_manifest(replace(d, layout="onefile"), sign_manifest(d, key), pub)
    f = replace(d, layout="onefile")
    assert not verify_manifest(d, sign_manifest(f, key), pub)
    with pytest.raises(wire.DecodeError, match=r"^layout:"):
        Manifest("1", "arm64", 1, SHA, layout="zip")


def test_onedir_bundle_is_a_plain_tar_of_the_folder(tmp_path: Path) -> None:
    top = tmp_path / "dpanel-tunnel.d"
    (top / "_internal").mkdir(parents=True)
    (top / "dpanel-tunnel").write_bytes(b"\x7fELF bin")
    (top / "dpanel-tunnel").chmod(0o755)
    (top / "_internal" / "a.so").write_bytes(b"so")
    key = _key()
    m = write_bundle(tmp_path / "b", top / "dpanel-tunnel", "2.0", "arm64", key, "onedir")
    got, sig, payload = read_bundle(tmp_path / "b")
    assert got == m and got.layout == "onedir" and payload.name == "dpanel-tunnel.tar"
    assert file_sha256(payload) == (m.size, m.sha256)
    assert verify_manifest(got, sig, ManagerKey(key.export_public_key().decode()))
    with tarfile.open(payload) as t:
        names = {ti.name: ti for ti in t}
    assert sorted(names) == ["_internal", "_internal/a.so", "dpanel-tunnel"]
    assert names["dpanel-tunnel"].mode == 0o755 and names["_internal/a.so"].mode == 0o644
    assert {ti.uid for ti in names.values()} == {0}
    # the same tree gives the same bytes (no mtimes): a rebuild signs the same hash
    m2 = write_bundle(tmp_path / "b2", top / "dpanel-tunnel", "2.0", "arm64", key, "onedir")
    assert m2.sha256 == m.sha256
    # a onefile bundle's manifest has no layout key at all (old managers read it)
    write_bundle(tmp_path / "c", top / "dpanel-tunnel", "2.0", "arm64", key)
    assert "layout" not in json.loads((tmp_path / "c" / "manifest.json").read_text())


def test_onedir_bundle_refuses_a_symlink_in_the_tree(tmp_path: Path) -> None:
    top = tmp_path / "d"
    top.mkdir()
    (top / "dpanel-tunnel").write_bytes(b"x")
    (top / "l").symlink_to("/etc/passwd")
    with pytest.raises(wire.DecodeError, match="only directories and regular files"):
        write_bundle(tmp_path / "b", top / "dpanel-tunnel", "2.0", "arm64", _key(), "onedir")


def test_offer_layout_round_trip_and_onefile_encoding_unchanged() -> None:
    msg = wire.decode(json.dumps(_offer(layout="onedir")))
    assert isinstance(msg, wire.UpdateRequest) and msg.layout == "onedir"
    assert wire.decode(wire.encode(msg)) == msg
    plain = wire.decode(json.dumps(_offer()))
    assert isinstance(plain, wire.UpdateRequest) and plain.layout is None
    assert b"layout" not in wire.encode(plain) and b"layout" not in wire.canonical_bytes(plain)
    # a onedir offer's request signature covers the layout
    assert wire.canonical_bytes(msg) != wire.canonical_bytes(replace(msg, layout=None))
    with pytest.raises(wire.DecodeError, match=r"^layout:"):
        wire.decode(json.dumps(_offer(layout="tar.gz")))

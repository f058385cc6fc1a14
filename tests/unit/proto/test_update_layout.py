"""The manifest's layout field: signed when onedir, invisible when onefile (old bundles
and old agents keep verifying), carried by the offer, and the onedir bundle's tar."""

from __future__ import annotations

import base64
import json
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import asyncssh
import pytest

from dpanel_proto import wire
from dpanel_proto.signing import ManagerKey
from dpanel_proto.update import (
    Manifest,
    file_sha256,
    read_bundle,
    sign_manifest,
    verify_manifest,
    write_bundle,
)

SHA = "ab" * 32


def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


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


def _offer(**kw: object) -> dict[str, object]:
    now = time.time()
    d: dict[str, object] = {"v": 1, "type": "update", "device": "d1", "id": "a" * 32,
                            "issued_at": now, "expires_at": now + 60, "version": "2.0",
                            "arch": "arm64", "size": 10, "sha256": SHA,
                            "manifest_sig": base64.b64encode(b"s").decode(),
                            "url": "https://m.example/v1/agent/bundles/arm64/2.0/dpanel-tunnel"}
    d.update(kw)
    return d


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

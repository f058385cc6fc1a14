"""`dpanel agent import` of a onedir bundle: stored with its tar, checked like a binary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpanel_proto.update import write_bundle
from dpanel_server.updates import BundleStore, UpdateError


def _tree(tmp: Path) -> Path:
    top = tmp / "dpanel-tunnel.d"
    (top / "_internal").mkdir(parents=True)
    (top / "dpanel-tunnel").write_bytes(b"\x7fELF agent")
    (top / "dpanel-tunnel").chmod(0o755)
    (top / "_internal" / "base_library.zip").write_bytes(b"zip" * 100)
    return top / "dpanel-tunnel"


def test_onedir_bundle_imports_and_lists_its_layout(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    src = tmp_path / "b"
    m = write_bundle(src, _tree(tmp_path), "2.0", "arm64", store.key(), "onedir")
    assert store.add(src) == m
    got = store.get("arm64", "2.0")
    assert got is not None and got[2].name == "dpanel-tunnel.tar"
    assert got[2].read_bytes() == (src / "dpanel-tunnel.tar").read_bytes()
    assert store.list() == [{"arch": "arm64", "version": "2.0", "size": m.size,
                             "sha256": m.sha256, "layout": "onedir"}]


def test_onedir_bundle_with_a_changed_tar_or_layout_is_refused(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    src = tmp_path / "b"
    write_bundle(src, _tree(tmp_path), "2.0", "arm64", store.key(), "onedir")
    tar = src / "dpanel-tunnel.tar"
    good = tar.read_bytes()
    tar.write_bytes(good[:-1] + b"x")
    with pytest.raises(UpdateError, match=r"dpanel-tunnel\.tar does not match its manifest"):
        store.add(src)
    tar.write_bytes(good)
    # passing the tar off as a onefile binary: the signature covers the layout
    doc = json.loads((src / "manifest.json").read_text())
    doc.pop("layout")
    (src / "manifest.json").write_text(json.dumps(doc))
    (src / "dpanel-tunnel").write_bytes(good)
    with pytest.raises(UpdateError, match="not signed by this manager's update key"):
        store.add(src)
    assert store.list() == []

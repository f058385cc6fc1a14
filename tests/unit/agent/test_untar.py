"""A onedir update bundle is unpacked as if hostile: every escape is refused, by name."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Callable, Optional

import pytest

from dpanel_agent import untar
from dpanel_agent.untar import UnpackError, unpack_tree
from dpanel_agent.updater import Updater, _Refused, read_kv
from dpanel_image.synthetic import fake_elf
from dpanel_proto.update import Manifest

SHA = "ab" * 32


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, Optional[bytes]]],
         mode: str = "w", fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, mode, format=fmt) as t:  # type: ignore[call-overload]
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), mode
    return ti, data


def _other(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, linkname
    return ti, None


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
    return ti, None


def test_a_good_tree_unpacks_with_safe_modes(tmp_path: Path) -> None:
    t = _tar(tmp_path / "t.tar", [_dir("_internal"), _file("dpanel-tunnel", b"ELF", 0o4777),
                                  _file("_internal/lib.so", b"12345", 0o666),
                                  _file("_internal/sub/deep.txt", b"d")])
    assert unpack_tree(t, tmp_path / "out", 1 << 20) == 9
    out = tmp_path / "out"
    assert (out / "dpanel-tunnel").read_bytes() == b"ELF"
    # setuid and world-writable bits never survive; executables stay executable
    assert stat.S_IMODE((out / "dpanel-tunnel").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "_internal/lib.so").stat().st_mode) == 0o644
    assert (out / "_internal/sub/deep.txt").read_bytes() == b"d"


def _pax_escape(tmp: Path) -> Path:
    ti, data = _file("harmless")
    ti.pax_headers = {"path": "../escaped"}
    return _tar(tmp / "t.tar", [(ti, data)])


HOSTILE: list[tuple[str, Callable[[Path], Path], str]] = [
    ("absolute", lambda d: _tar(d / "t.tar", [_file("/tmp/abs-escape")]),
     "not a relative path"),
    ("dotdot", lambda d: _tar(d / "t.tar", [_file("../escaped")]), r"'\.\.'"),
    ("dotdot-deep", lambda d: _tar(d / "t.tar", [_dir("a"), _file("a/../../escaped")]),
     r"'\.\.'"),
    ("dot-part", lambda d: _tar(d / "t.tar", [_file("./x")]), r"'\.\.', '\.'"),
    ("pax-path", _pax_escape, r"'\.\.'"),
    ("symlink-out", lambda d: _tar(d / "t.tar", [_other("l", tarfile.SYMTYPE, "/etc"),
                                                 _file("l/passwd")]), "a symlink"),
    ("symlink-in", lambda d: _tar(d / "t.tar", [_other("l", tarfile.SYMTYPE, "x")]),
     "a symlink"),
    ("hardlink", lambda d: _tar(d / "t.tar", [_other("h", tarfile.LNKTYPE, "/etc/passwd")]),
     "a hard link"),
    ("device", lambda d: _tar(d / "t.tar", [_other("null", tarfile.CHRTYPE)]), "type"),
    ("fifo", lambda d: _tar(d / "t.tar", [_other("p", tarfile.FIFOTYPE)]), "type"),
    ("duplicate", lambda d: _tar(d / "t.tar", [_file("x"), _file("x", b"again")]),
     "appears twice"),
    ("file-then-dir", lambda d: _tar(d / "t.tar", [_file("x"), _file("x/y")]),
     "not a directory"),
    ("too-big", lambda d: _tar(d / "t.tar", [_file("a", b"1" * 600), _file("b", b"2" * 600)]),
     "more than 1000 bytes"),
    ("gzip", lambda d: _tar(d / "t.tar", [_file("x")], mode="w:gz"), "not a plain tar"),
    ("not-a-tar", lambda d: (d / "t.tar").write_bytes(b"\x7fELF" + bytes(2000)) and d / "t.tar",
     "not a plain tar"),
]


@pytest.mark.parametrize("make, why", [(m, w) for _, m, w in HOSTILE],
                         ids=[n for n, _, _ in HOSTILE])
def test_hostile_tar_is_refused_and_writes_nothing_outside(tmp_path: Path,
                                                          make: Callable[[Path], Path],
                                                          why: str) -> None:
    box = tmp_path / "box"
    box.mkdir()
    t = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UnpackError, match=why):
        unpack_tree(t, box / "slot", 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no "escaped" file
    assert not Path("/tmp/abs-escape").exists()
    assert [p for p in (box / "slot").rglob("*") if p.is_symlink()] == []


def test_member_count_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(untar, "MAX_MEMBERS", 3)
    t = _tar(tmp_path / "t.tar", [_file(f"f{i}") for i in range(4)])
    with pytest.raises(UnpackError, match="more than 3 members"):
        unpack_tree(t, tmp_path / "out", 1 << 20)


def test_truncated_tar_is_refused(tmp_path: Path) -> None:
    t = _tar(tmp_path / "t.tar", [_file("big", b"z" * 100_000)])
    t.write_bytes(t.read_bytes()[:50_000])
    with pytest.raises(UnpackError, match=r"truncated|damaged"):
        unpack_tree(t, tmp_path / "out", 1 << 20)


# ----------------------------------------------------------------- the updater's install


def _updater(tmp: Path) -> Updater:
    """An Updater over a slot layout in ``tmp`` (no token: nothing is fetched here)."""
    root = tmp / "opt"
    (root / "slots" / "a").mkdir(parents=True)
    (root / "slots" / "a" / "dpanel-tunnel").write_bytes(b"old agent")
    (root / "slots" / "b").mkdir()
    (root / "slots" / "b" / "stale").write_text("from a failed update")
    os.symlink("slots/a", root / "current")
    u = Updater.__new__(Updater)
    u.dir, u.root, u.arch, u.version = tmp / "state", root, "amd64", "1.0"
    u.dir.mkdir()
    return u


def _m(t: Path) -> Manifest:
    return Manifest(version="2.0", arch="amd64", size=t.stat().st_size, sha256=SHA,
                    layout="onedir")


def test_onedir_install_fills_the_other_slot_and_keeps_the_old(tmp_path: Path) -> None:
    u = _updater(tmp_path)
    t = _tar(tmp_path / "t.tar", [_file("dpanel-tunnel", fake_elf("amd64"), 0o755),
                                  _dir("_internal"), _file("_internal/x.so", b"so")])
    u._install(t, _m(t), 300)
    root = u.root
    assert os.readlink(root / "current") == "slots/b"
    assert (root / "slots/b/dpanel-tunnel").read_bytes() == fake_elf("amd64")
    assert (root / "slots/b/_internal/x.so").read_bytes() == b"so"
    assert not (root / "slots/b/stale").exists()  # a fresh tree, not a merge
    assert (root / "slots/a/dpanel-tunnel").read_bytes() == b"old agent"
    assert read_kv(u.dir / "pending")["previous"] == "a"
    assert sorted(p.name for p in (root / "slots").iterdir()) == ["a", "b"]


@pytest.mark.parametrize("members, why", [
    ([("dpanel-tunnel", fake_elf("arm64"))], "wrong architecture: the binary is arm64"),
    ([("dpanel-tunnel", b"#!/bin/sh\n")], "not an ELF"),
    ([("other", fake_elf("amd64"))], "no executable dpanel-tunnel"),
    ([("../dpanel-tunnel", fake_elf("amd64"))], r"bundle refused: .*'\.\.'"),
], ids=["wrong-arch", "not-elf", "no-binary", "escape"])
def test_refused_onedir_leaves_current_and_both_slots_alone(
        tmp_path: Path, members: list[tuple[str, bytes]], why: str) -> None:
    u = _updater(tmp_path)
    t = _tar(tmp_path / "t.tar", [_file(n, d, 0o755) for n, d in members])
    with pytest.raises(_Refused, match=why):
        u._install(t, _m(t), 300)
    root = u.root
    assert os.readlink(root / "current") == "slots/a"
    assert (root / "slots/a/dpanel-tunnel").read_bytes() == b"old agent"
    assert (root / "slots/b/stale").exists()
    assert sorted(p.name for p in (root / "slots").iterdir()) == ["a", "b"]  # no stage left
    assert not (u.dir / "pending").exists()
    assert not (tmp_path / "opt" / "dpanel-tunnel").exists()

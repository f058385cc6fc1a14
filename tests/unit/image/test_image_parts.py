"""Small pieces of the image builder: boards, ELF probing, bmap, sparse unpacking."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dpanel_image import bmap
from dpanel_image.board import board_names, load_board, parse_board
from dpanel_image.compress import decompress_sparse
from dpanel_image.elf import elf_arch
from dpanel_image.errors import ImageError
from dpanel_image.synthetic import fake_elf


def test_all_boards_load() -> None:
    assert board_names() == ["orangepi", "qemu-arm64", "rpi"]
    rpi = load_board("rpi")
    assert [p.role for p in rpi.partitions] == ["boot", "root"]
    assert rpi.arches == ("arm64", "armhf") and rpi.token_role == "boot"
    assert rpi.partitions[0].mountpoint == "/boot/firmware"
    opi = load_board("orangepi")
    assert [p.fs for p in opi.partitions] == ["ext4"]
    assert opi.token_path == "/boot/dpanel-token.txt"
    q = load_board("qemu-arm64")
    assert q.scratch is not None and "linux-image-arm64" in q.scratch.packages
    assert q.qemu is not None and q.qemu.machine == "virt"


@pytest.mark.parametrize("patch, msg", [
    ({"partitions": [{"role": "root", "fs": "btrfs", "mountpoint": "/", "label": "r"}]},
     r"partitions\[0\]\.fs: 'btrfs' is not one of"),
    ({"arches": ["mips"]}, "unknown architecture 'mips'"),
    ({"token": {"partition": "root", "path": "token.txt"}}, "token.path must be absolute"),
    ({"table": 3}, "field 'table' must be a str"),
])
def test_bad_board_files_name_the_field(patch: dict[str, object], msg: str) -> None:
    data: dict[str, object] = {
        "name": "x", "arches": ["arm64"], "table": "dos",
        "partitions": [{"role": "root", "fs": "ext4", "mountpoint": "/", "label": "r"}],
        "token": {"partition": "root", "path": "/boot/t"}}
    data.update(patch)
    with pytest.raises(ImageError, match=msg):
        parse_board(data, "x.toml")


def test_elf_probe() -> None:
    for arch in ("arm64", "armhf", "amd64"):
        assert elf_arch(fake_elf(arch), "x") == arch  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="not an ELF"):
        elf_arch(b"#!/bin/sh\n" + bytes(60), "script")


def test_file_agrees_with_fake_elf(tmp_path: Path) -> None:
    p = tmp_path / "bin"
    p.write_bytes(fake_elf("arm64"))
    assert "ARM aarch64" in subprocess.run(["file", "-b", str(p)], capture_output=True,
                                           text=True).stdout


def _sparse_file(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        for off in (0, 3 << 20, (5 << 20) + 4096):
            f.seek(off)
            f.write(os.urandom(10000))


def test_bmap_ranges_split_at_partitions_and_update(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    _sparse_file(img)
    bounds = [0, 4 << 20, 8 << 20]
    full = bmap.make_bmap(img, bounds)
    assert all(not (a < (4 << 20) // 4096 <= b) for a, b, _ in full.ranges)
    with open(img, "r+b") as f:  # change data in the second "partition" only
        f.seek(6 << 20)
        f.write(b"new data")
    upd = bmap.update_bmap(full, img, 4 << 20, 8 << 20, bounds)
    assert upd == bmap.make_bmap(img, bounds)
    bmap.write_bmap(upd, tmp_path / "d.bmap")
    assert bmap.read_bmap(tmp_path / "d.bmap") == upd
    subprocess.run(["bmaptool", "copy", "--bmap", str(tmp_path / "d.bmap"), str(img),
                    str(tmp_path / "copy.img")], check=True, capture_output=True)
    assert (tmp_path / "copy.img").read_bytes() == img.read_bytes()


def test_decompress_sparse_keeps_holes(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    _sparse_file(img)
    subprocess.run(["zstd", "-q", str(img)], check=True)
    out = tmp_path / "u.img"
    decompress_sparse(tmp_path / "d.img.zst", out)
    assert out.read_bytes() == img.read_bytes()
    assert os.stat(out).st_blocks * 512 < 1 << 20
    (tmp_path / "empty.img").write_bytes(b"")
    with pytest.raises(ImageError, match="is empty"):
        decompress_sparse(tmp_path / "empty.img", tmp_path / "e2")
    bad = tmp_path / "bad.img.zst"
    bad.write_bytes((tmp_path / "d.img.zst").read_bytes()[:50])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decompress_sparse(bad, tmp_path / "b2")


def test_board_folders_hold_board_behaviour_and_no_test_data() -> None:
    from dpanel_image.board import boards_dir
    from dpanel_image.postbuild import parse_post_build

    for name in board_names():
        text = (boards_dir() / name / "board.toml").read_text()
        assert "[synthetic]" not in text, name  # test sizes live in tests/imagefix.py
    q = load_board("qemu-arm64")
    assert q.overlay is not None and (q.overlay / "etc" / "hostname").read_text() == \
        "dpanel-qemu\n"
    assert (q.overlay / "etc/systemd/network/10-wired.network").is_file()
    assert q.post_build is not None
    assert [(s.kind, s.args) for s in parse_post_build(q.post_build)] == \
        [("enable", ("systemd-networkd.service",))]
    assert load_board("rpi").post_build is None and load_board("rpi").overlay is None


def test_qemu_argv_comes_from_the_board(tmp_path: Path) -> None:
    from dataclasses import replace

    from dpanel_image.qemu import qemu_argv

    b = load_board("qemu-arm64")
    argv = qemu_argv(b, tmp_path / "i.img", tmp_path / "k", tmp_path / "r", "stdio")
    assert argv[0] == "qemu-system-aarch64" and "virtio-blk-device,drive=disk" in argv
    assert b.qemu is not None
    other = replace(b, qemu=replace(b.qemu, binary="qemu-system-x86_64",
                                    disk_device="virtio-blk-pci"))
    argv = qemu_argv(other, tmp_path / "i.img", tmp_path / "k", tmp_path / "r", "stdio")
    assert argv[0] == "qemu-system-x86_64" and "virtio-blk-pci,drive=disk" in argv
    with pytest.raises(ImageError, match="no \\[qemu\\] section"):
        qemu_argv(load_board("rpi"), tmp_path / "i.img", tmp_path / "k", tmp_path / "r", "x")


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    from dpanel_image.provision import fingerprint

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    line = (tmp_path / "k.pub").read_text().strip()
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")],
                           capture_output=True, text=True, check=True).stdout.split()[1]
    assert fingerprint(line) == f"ssh-ed25519 {shown}"

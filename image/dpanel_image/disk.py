"""Whole-disk images without mounting: partition tables (sfdisk), ext4 (debugfs), FAT (mtools).

Everything here works on a plain file as an unprivileged user: no loop device, no
mount, the same way genimage and Buildroot edit images.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from .errors import ImageError
from .util import need_tool, run

__all__ = [
    "FS_PROBE_BYTES",
    "TABLE_BYTES",
    "Ext4",
    "Fat",
    "Op",
    "Part",
    "ext4_magic",
    "ext4_magic_ok",
    "fat_magic",
    "fat_magic_ok",
    "make_disk",
    "read_at",
    "read_table",
    "read_table_head",
    "write_sparse_at",
]

SECTOR = 512
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}
#: An MBR, or a GPT header with its 128 entries, fits in the first 34 sectors; 1 MiB
#: (where the first partition usually starts) is plenty.
TABLE_BYTES = 1 << 20
#: How much of a partition's start tells its file system (ext4's superblock ends at 2 KiB).
FS_PROBE_BYTES = 4096


@dataclass(frozen=True)
class Part:
    number: int  # 1-based, as in /dev/sdX1
    start: int  # bytes
    size: int  # bytes
    type: str

    @property
    def end(self) -> int:
        return self.start + self.size


def read_table(img: Path, what: str = "") -> list[Part]:
    """Partitions of a whole-disk image, sorted by start; clear error if there is no table.

    Errors name ``what`` (e.g. "--base raspios.img.xz") instead of ``img``, which may be
    an internal staging file.
    """
    parts = _sfdisk(img, what or str(img))
    size = img.stat().st_size
    for part in parts:
        if part.end > size:
            raise ImageError(f"{what or img}: partition {part.number} ends at {part.end} bytes, "
                             f"past the end of the image ({size} bytes): truncated image?")
    return parts


def read_table_head(head: bytes, what: str) -> list[Part]:
    """The partition table from the first :data:`TABLE_BYTES` of an image (a stream)."""
    with tempfile.NamedTemporaryFile(prefix="dpanel-head-") as f:
        f.write(head)
        f.flush()
        return _sfdisk(Path(f.name), what)


def _sfdisk(img: Path, what: str) -> list[Part]:
    need_tool("sfdisk", "fdisk")
    proc = run(["sfdisk", "--json", img], f"reading the partition table of {what}", check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ImageError(f"{what}: no partition table found (is this a whole-disk image?)")
    table = json.loads(proc.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    parts = [Part(i, int(p["start"]) * sector, int(p["size"]) * sector, str(p["type"]))
             for i, p in enumerate(table.get("partitions", []), 1)]
    return sorted(parts, key=lambda p: p.start)


def read_at(img: Path, offset: int, n: int) -> bytes:
    with open(img, "rb") as f:
        f.seek(offset)
        return f.read(n)


def ext4_magic(start: bytes) -> bool:
    """Given a partition's first bytes: is it ext2/3/4 (superblock magic at 1080)?"""
    return start[1080:1082] == b"\x53\xef"


def fat_magic(start: bytes) -> bool:
    """Given a partition's first bytes: is it FAT12/16/32 (boot sector signature + name)?"""
    return len(start) >= 512 and start[510:512] == b"\x55\xaa" and (
        start[54:57] == b"FAT" or start[82:87] == b"FAT32")


def ext4_magic_ok(img: Path, part: Part) -> bool:
    return ext4_magic(read_at(img, part.start, FS_PROBE_BYTES))


def fat_magic_ok(img: Path, part: Part) -> bool:
    return fat_magic(read_at(img, part.start, FS_PROBE_BYTES))


def _stderr_errors(stderr: bytes, tolerate: Sequence[str] = ()) -> list[str]:
    errs = []
    for line in stderr.decode(errors="replace").splitlines():
        if not line.strip() or line.startswith("debugfs "):
            continue
        if any(t in line for t in tolerate):
            continue
        errs.append(line.strip())
    return errs


class Ext4:
    """An ext4 file system inside a disk image, edited with debugfs at a byte offset."""

    def __init__(self, img: Path, part: Part, what: str = "root") -> None:
        need_tool("debugfs", "e2fsprogs")
        self.img, self.part, self.what = img, part, what
        self.spec = f"{img}?offset={part.start}"

    def _debugfs(self, args: Sequence[str], what: str, tolerate: Sequence[str] = (),
                 input: Optional[bytes] = None) -> bytes:
        proc = run(["debugfs", *args, self.spec], what, check=False, input=input)
        errs = _stderr_errors(proc.stderr, tolerate)
        if errs or proc.returncode not in (0, 1):
            raise ImageError(f"{what} ({self.img}, {self.what} partition): {'; '.join(errs)}")
        return proc.stdout

    def cat(self, path: str) -> Optional[bytes]:
        """File contents, or None if it does not exist."""
        proc = run(["debugfs", "-R", f"cat {_q(path)}", self.spec], f"reading {path}",
                   check=False)
        if b"File not found" in proc.stderr or b"not found by ext2_lookup" in proc.stderr:
            return None
        errs = _stderr_errors(proc.stderr)
        if errs:
            raise ImageError(f"reading {path} from {self.img}: {'; '.join(errs)}")
        return proc.stdout

    def exists(self, path: str) -> bool:
        proc = run(["debugfs", "-R", f"stat {_q(path)}", self.spec], f"stat {path}",
                   check=False)
        return b"Inode:" in proc.stdout

    def list_dir(self, path: str) -> list[str]:
        out = self._debugfs(["-R", f"ls -p {_q(path)}"], f"listing {path}",
                            tolerate=("File not found",))
        names = []
        for line in out.decode(errors="replace").splitlines():
            f = line.strip().strip("/").split("/")
            if len(f) >= 6 and f[5] not in (".", ".."):
                names.append(f[5])
        return names

    def free_bytes(self) -> int:
        out = run(["dumpe2fs", "-h", self.spec], f"reading the {self.what} superblock").stdout
        info = {}
        for line in out.decode(errors="replace").splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
        try:
            return int(info["Free blocks"]) * int(info["Block size"])
        except (KeyError, ValueError):
            raise ImageError(f"{self.img}: cannot read free space of the {self.what} "
                             "file system") from None

    def apply(self, ops: Iterable[Op]) -> None:
        """Apply edits in three debugfs passes: rm (may be absent), mkdir (may exist), rest."""
        ops = list(ops)
        rms = [f"rm {_q(o.path)}" for o in ops if o.kind in ("file", "symlink")]
        dirs = [f"mkdir {_q(o.path)}" for o in ops if o.kind == "dir"]
        if rms:
            self._debugfs(["-w", "-f", "-"], "removing old files", input=_script(rms),
                          tolerate=("File not found by ext2_lookup",))
        if dirs:
            self._debugfs(["-w", "-f", "-"], "creating directories", input=_script(dirs),
                          tolerate=("already exists",))
        cmds: list[str] = []
        for o in ops:
            if o.kind == "file":
                assert o.src is not None
                cmds.append(f"write {_q(str(o.src))} {_q(o.path)}")
            elif o.kind == "symlink":
                cmds.append(f"symlink {_q(o.path)} {_q(o.target)}")
            elif o.kind == "rm":
                cmds.append(f"rm {_q(o.path)}")
                continue
            if not o.set_attrs:
                continue
            type_bits = {"file": 0o100000, "dir": 0o40000, "symlink": 0o120000}[o.kind]
            if o.kind != "symlink":
                cmds.append(f"sif {_q(o.path)} mode 0{type_bits | o.mode:o}")
            cmds += [f"sif {_q(o.path)} uid {o.uid}", f"sif {_q(o.path)} gid {o.gid}"]
        if cmds:
            self._debugfs(["-w", "-f", "-"], "writing into the ext4 file system",
                          input=_script(cmds))

    def rdump(self, path: str, dest: Path) -> None:
        """Copy a tree out of the image (for inspection/testinfra), owners kept when root."""
        dest.mkdir(parents=True, exist_ok=True)
        self._debugfs(["-R", f"rdump {_q(path)} {_q(str(dest))}"], f"rdump {path}")


def _q(s: str) -> str:
    # debugfs splits its command lines on blanks and honours double quotes.
    if any(c in s for c in ' "\t\n'):
        if '"' in s or "\n" in s:
            raise ImageError(f"path {s!r} cannot be passed to debugfs")
        return f'"{s}"'
    return s


def _script(lines: Sequence[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Op:
    """One edit: create a file/dir/symlink (owner + mode set explicitly), or remove."""

    kind: Literal["file", "dir", "symlink", "rm"]
    path: str
    src: Optional[Path] = None
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    #: False for parent dirs that may already exist: keep their mode and owner.
    set_attrs: bool = True


class Fat:
    """A FAT file system inside a disk image, edited with mtools at a byte offset."""

    def __init__(self, img: Path, part: Part) -> None:
        need_tool("mcopy", "mtools")
        self.img, self.part = img, part
        self.spec = f"{img}@@{part.start}"

    def _m(self, tool: str, args: Sequence[str], what: str,
           check: bool = True) -> bytes:
        proc = run([tool, "-i", self.spec, *args], f"{what} ({self.img}, FAT partition)",
                   env=MTOOLS_ENV, check=check)
        return proc.stdout if proc.returncode == 0 else b""

    def write(self, path: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile() as f:
            f.write(data)
            f.flush()
            self._m("mcopy", ["-o", "-D", "o", f.name, f"::{path}"], f"writing {path}")

    def read(self, path: str) -> Optional[bytes]:
        proc = run(["mtype", "-i", self.spec, f"::{path}"], f"reading {path}",
                   env=MTOOLS_ENV, check=False)
        return proc.stdout if proc.returncode == 0 else None

    def copy_out(self, path: str, dest: Path) -> None:
        self._m("mcopy", ["-o", "-n", f"::{path}", str(dest)], f"copying {path} out")

    def names(self, path: str = "/") -> list[str]:
        out = self._m("mdir", ["-b", f"::{path}"], f"listing {path}", check=False)
        return [line.rsplit("/", 1)[-1] for line in out.decode(errors="replace").splitlines()
                if line.strip()]


def write_sparse_at(dst: Path, offset: int, src: Path) -> None:
    """Copy ``src`` into ``dst`` at ``offset``, skipping zero blocks (keeps dst sparse)."""
    block = 1 << 20
    zero = bytes(block)
    with open(src, "rb") as s, open(dst, "r+b") as d:
        pos = offset
        while chunk := s.read(block):
            if chunk != zero[:len(chunk)]:
                d.seek(pos)
                d.write(chunk)
            pos += len(chunk)


def make_disk(img: Path, layout: Sequence[tuple[Literal["vfat", "ext4"], int, str,
                                                Optional[Path]]],
              table: Literal["dos", "gpt"] = "dos") -> list[Part]:
    """Create a whole-disk image: each (fs, size_mib, label, content_dir) is one partition.

    ext4 is built in place (mke2fs -d, -E offset); FAT is built beside it and copied in,
    because mkfs.vfat --offset picks FAT32 for small sizes, which mtools then misreads.
    """
    for tool, pkg in (("sfdisk", "fdisk"), ("mke2fs", "e2fsprogs"), ("mkfs.vfat", "dosfstools")):
        need_tool(tool, pkg)
    start_mib = 1
    total = start_mib + sum(size for _, size, _, _ in layout)
    with open(img, "wb") as f:
        f.truncate(total << 20)
    lines = [f"label: {table}"]
    fat_type = "c" if table == "dos" else "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    linux_type = "83" if table == "dos" else "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    pos = start_mib
    for fs, size, _label, _ in layout:
        lines.append(f"start={pos << 11}, size={size << 11}, "
                     f"type={fat_type if fs == 'vfat' else linux_type}")
        pos += size
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", img], f"partitioning {img}",
        input=("\n".join(lines) + "\n").encode())
    parts = read_table(img)
    for (fs, size, label, content), part in zip(layout, parts):
        if fs == "ext4":
            args = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", label,
                    "-E", f"offset={part.start},root_owner=0:0"]
            if content is not None:
                args += ["-d", str(content)]
            run([*args, img, f"{size << 10}k"], f"mke2fs for the {label} partition")
        else:
            with tempfile.TemporaryDirectory(dir=img.parent) as td:
                fat = Path(td) / "fat.img"
                run(["mkfs.vfat", "-F", "16" if size <= 256 else "32", "-n", label.upper(),
                     "-C", fat, str(size << 10)], f"mkfs.vfat for the {label} partition")
                if content is not None:
                    files = sorted(os.listdir(content))
                    if files:
                        run(["mcopy", "-s", "-i", fat, *[str(content / n) for n in files],
                             "::/"], f"copying files into the {label} partition",
                            env=MTOOLS_ENV)
                write_sparse_at(img, part.start, fat)
    return parts

"""Boards are data: one folder per board, ``boards/<name>/{board.toml, overlay/, post-build}``.

Like a Buildroot board directory: ``board.toml`` holds the partition layout, where the
token goes, and the optional from-scratch recipe and qemu boot settings; ``overlay/`` is
copied into the root file system; ``post-build`` lists edits applied after it (see
:mod:`dpanel_image.postbuild`). The folders ship inside the package, so an installed
``dpanel_image`` (the server .deb) builds images as a checkout does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional, cast, get_args

from .arches import Arch, parse_arch
from .errors import ImageError
from .util import package_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Board", "PartSpec", "QemuSpec", "ScratchSpec", "board_names", "boards_dir",
           "load_board", "parse_board"]

BOARD_FILE = "board.toml"
Role = Literal["boot", "root"]
Fs = Literal["vfat", "ext4"]


@dataclass(frozen=True)
class PartSpec:
    role: Role
    fs: Fs
    mountpoint: str
    label: str


@dataclass(frozen=True)
class ScratchSpec:
    suite: str
    boot_mib: int
    root_slack_mib: int
    packages: tuple[str, ...]
    initramfs_modules: tuple[str, ...]


@dataclass(frozen=True)
class QemuSpec:
    binary: str  # qemu-system-aarch64
    package: str  # the Debian package that has it
    machine: str
    cpu: str
    smp: int
    memory_mib: int
    append: str
    kernel: str
    initrd: str
    disk_device: str  # the -device that carries the image (virtio-blk-device on -M virt)
    net_device: str


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    arches: tuple[Arch, ...]
    table: Literal["dos", "gpt"]
    partitions: tuple[PartSpec, ...]
    token_role: Role
    token_path: str
    scratch: Optional[ScratchSpec] = None
    qemu: Optional[QemuSpec] = None
    #: The board's folder; ``overlay`` and ``post_build`` are None when it has none.
    folder: Optional[Path] = field(default=None, compare=False)
    overlay: Optional[Path] = field(default=None, compare=False)
    post_build: Optional[Path] = field(default=None, compare=False)

    @property
    def default_arch(self) -> Arch:
        return self.arches[0]

    def index(self, role: Role) -> int:
        """0-based index of the partition with ``role``."""
        for i, p in enumerate(self.partitions):
            if p.role == role:
                return i
        raise ImageError(f"board {self.name}: has no {role} partition")

    def image_name(self, arch: Arch, suffix: str = "") -> str:
        tail = "" if arch == self.default_arch else f"-{arch}"
        return f"dpanel-{self.name}{tail}{suffix}.img"


def boards_dir() -> Path:
    """The shipped board folders (package data, read through importlib.resources)."""
    return package_dir("boards")


def board_names() -> list[str]:
    return sorted(p.name for p in boards_dir().iterdir() if (p / BOARD_FILE).is_file())


def _get(d: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in d:
        raise ImageError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ImageError(f"{where}: field {key!r} must be a {typ.__name__}, got {v!r}")
    return v


def _choice(value: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise ImageError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def parse_board(data: dict[str, Any], where: str) -> Board:
    """Validate a board table; every error names the file and the field."""
    parts = []
    for i, p in enumerate(_get(data, "partitions", list, where)):
        w = f"{where}: partitions[{i}]"
        if not isinstance(p, dict):
            raise ImageError(f"{w}: must be a table")
        parts.append(PartSpec(
            role=cast(Role, _choice(_get(p, "role", str, w), get_args(Role), f"{w}.role")),
            fs=cast(Fs, _choice(_get(p, "fs", str, w), get_args(Fs), f"{w}.fs")),
            mountpoint=_get(p, "mountpoint", str, w), label=_get(p, "label", str, w)))
    roles = [p.role for p in parts]
    if roles.count("root") != 1 or roles.count("boot") > 1:
        raise ImageError(f"{where}: partitions need exactly one root and at most one boot")
    arches = tuple(parse_arch(a, f"{where}: arches") for a in _get(data, "arches", list, where))
    if not arches:
        raise ImageError(f"{where}: arches is empty")
    tok = _get(data, "token", dict, where)
    token_role = cast(Role, _choice(_get(tok, "partition", str, f"{where}: token"),
                                    tuple(roles), f"{where}: token.partition"))
    token_path = _get(tok, "path", str, f"{where}: token")
    if not token_path.startswith("/"):
        raise ImageError(f"{where}: token.path must be absolute, got {token_path!r}")
    scratch = None
    if "scratch" in data:
        s, w = _get(data, "scratch", dict, where), f"{where}: scratch"
        scratch = ScratchSpec(
            suite=_get(s, "suite", str, w), boot_mib=_get(s, "boot_mib", int, w),
            root_slack_mib=_get(s, "root_slack_mib", int, w),
            packages=tuple(_get(s, "packages", list, w)),
            initramfs_modules=tuple(_get(s, "initramfs_modules", list, w)))
    qemu = None
    if "qemu" in data:
        q, w = _get(data, "qemu", dict, where), f"{where}: qemu"
        qemu = QemuSpec(**{k: _get(q, k, t, w) for k, t in (
            ("binary", str), ("package", str), ("machine", str), ("cpu", str), ("smp", int),
            ("memory_mib", int), ("append", str), ("kernel", str), ("initrd", str),
            ("disk_device", str), ("net_device", str))})
    return Board(
        name=_get(data, "name", str, where), description=data.get("description", ""),
        arches=arches,
        table=cast(Literal["dos", "gpt"], _choice(_get(data, "table", str, where),
                                                   ("dos", "gpt"), f"{where}: table")),
        partitions=tuple(parts), token_role=token_role, token_path=token_path,
        scratch=scratch, qemu=qemu)


def load_board(name_or_path: str) -> Board:
    """``rpi`` -> the shipped ``boards/rpi/``; a board folder or its board.toml also works."""
    if "/" not in name_or_path and not name_or_path.endswith(".toml"):
        folder = boards_dir() / name_or_path
        if not (folder / BOARD_FILE).is_file():
            raise ImageError(f"--board: unknown board {name_or_path!r} "
                             f"(known: {', '.join(board_names())})")
    else:
        given = Path(name_or_path)
        folder = given.parent if given.name == BOARD_FILE else given
        if not (folder / BOARD_FILE).is_file():
            raise ImageError(f"--board: {given} is not a board folder (no {BOARD_FILE})")
    path = folder / BOARD_FILE
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ImageError(f"{path}: invalid TOML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError(f"{path}: cannot read ({e})") from None
    board = parse_board(data, str(path))
    overlay, post = folder / "overlay", folder / "post-build"
    return replace(board, folder=folder, overlay=overlay if overlay.is_dir() else None,
                   post_build=post if post.is_file() else None)

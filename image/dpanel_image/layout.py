"""Does an image have the board's layout? Checked on the unpacking stream, then in full.

A vendor image is a few GB of xz: a wrong one (an Armbian image given for a Raspberry
Pi) must be refused in its first MiB, not after minutes of unpacking. :class:`HeadCheck`
watches the stream: the partition table from the first MiB, each file system as soon as
its first sectors pass. :func:`check_layout` checks the unpacked file again (and that
no partition runs past its end). Errors name ``what`` (``--base FILE``), never the
internal staging file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from .board import Board
from .disk import (
    FS_PROBE_BYTES,
    TABLE_BYTES,
    Part,
    ext4_magic,
    fat_magic,
    read_at,
    read_table,
    read_table_head,
)
from .errors import ImageError

__all__ = ["HeadCheck", "check_layout", "check_parts"]

MAGIC: dict[str, Callable[[bytes], bool]] = {"ext4": ext4_magic, "vfat": fat_magic}


def check_parts(board: Board, parts: list[Part], what: str) -> None:
    """The table must have the board's partitions: as many, in order."""
    if len(parts) != len(board.partitions):
        raise ImageError(
            f"{what}: has {len(parts)} partition(s), board {board.name} expects "
            f"{len(board.partitions)} ({', '.join(f'{p.fs} {p.role}' for p in board.partitions)})")


def check_fs(board: Board, index: int, part: Part, start: bytes, what: str) -> None:
    """Partition ``index`` (0-based) must hold the board's file system, given its start."""
    want = board.partitions[index]
    if not MAGIC[want.fs](start):
        found = next((fs for fs, ok in MAGIC.items() if ok(start)), "unknown")
        raise ImageError(f"{what}: partition {part.number} should be {want.fs} "
                         f"({want.role}, {want.mountpoint}) for board {board.name}, "
                         f"found {found} (type {part.type})")


def check_layout(board: Board, img: Path, what: str) -> list[Part]:
    """The unpacked image's partitions must be the board's, in order, with the right file
    systems, and lie inside the file."""
    parts = read_table(img, what)
    check_parts(board, parts, what)
    for i, part in enumerate(parts):
        check_fs(board, i, part, read_at(img, part.start, FS_PROBE_BYTES), what)
    return parts


class HeadCheck:
    """A :data:`~dpanel_image.compress.Tap` that checks the layout while unpacking."""

    def __init__(self, board: Board, what: str) -> None:
        self.board, self.what = board, what
        self.head = bytearray()
        self.parts: Optional[list[Part]] = None
        self.starts: dict[int, bytearray] = {}  # partition index -> its first bytes
        self.checked: set[int] = set()

    def __call__(self, offset: int, chunk: bytes) -> None:
        if self.parts is None:
            self.head += chunk[:max(0, TABLE_BYTES - offset)]
            if len(self.head) < TABLE_BYTES:
                return
            self._table()
            self._scan(0, bytes(self.head))  # partitions that start inside the first MiB
        self._scan(offset, chunk)

    def _table(self) -> None:
        self.parts = read_table_head(bytes(self.head), self.what)
        check_parts(self.board, self.parts, self.what)

    def _scan(self, offset: int, chunk: bytes) -> None:
        assert self.parts is not None
        end = offset + len(chunk)
        for i, part in enumerate(self.parts):
            if i in self.checked:
                continue
            buf = self.starts.setdefault(i, bytearray())
            have = part.start + len(buf)  # the next byte this partition's probe needs
            stop = part.start + FS_PROBE_BYTES
            if offset <= have < end:
                buf += chunk[have - offset:min(stop, end) - offset]
            if len(buf) >= FS_PROBE_BYTES:
                self.checked.add(i)
                check_fs(self.board, i, part, bytes(buf), self.what)

    def finish(self, size: int) -> None:
        """The stream ended at ``size`` bytes: check what it was too short to show."""
        if self.parts is None:
            self._table()
            self._scan(0, bytes(self.head))
        assert self.parts is not None
        for part in self.parts:
            if part.end > size:
                raise ImageError(f"{self.what}: partition {part.number} ends at {part.end} "
                                 f"bytes, past the end of the image ({size} bytes): "
                                 "truncated image?")

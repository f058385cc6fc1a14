"""bmap files (bmaptool format 2.0): which blocks of a sparse image hold data, with checksums.

Written here rather than with ``bmaptool create`` so that provisioning can rehash only
the partition it changed: ranges never cross a partition boundary. ``bmaptool copy``
reads and verifies these files (the tests check that).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageError

__all__ = ["BLOCK", "Bmap", "data_ranges", "make_bmap", "read_bmap", "render", "update_bmap",
           "write_bmap"]

BLOCK = 4096


@dataclass(frozen=True)
class Bmap:
    image_size: int
    ranges: tuple[tuple[int, int, str], ...]  # (first block, last block, sha256)


def data_ranges(f: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Block ranges [first, last] holding data in bytes [start, end) of fd ``f``."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(f, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        if data >= end:
            return
        hole = min(os.lseek(f, data, os.SEEK_HOLE), end)
        first, last = data // BLOCK, (hole - 1) // BLOCK
        yield first, last
        pos = (last + 1) * BLOCK


def _hash(f: int, first: int, last: int) -> str:
    h = hashlib.sha256()
    pos, end = first * BLOCK, (last + 1) * BLOCK
    while pos < end:
        chunk = os.pread(f, min(8 << 20, end - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def _scan(f: int, bounds: Sequence[int], size: int) -> list[tuple[int, int, str]]:
    """Ranges in [bounds[0], size), split at each boundary (partition starts/ends)."""
    cuts = sorted({b for b in bounds if 0 <= b < size} | {0, size})
    out: list[tuple[int, int, str]] = []
    for a, b in zip(cuts, cuts[1:]):
        for first, last in data_ranges(f, a, b):
            # A block straddling a cut belongs to the earlier range only.
            if out and first <= out[-1][1]:
                first = out[-1][1] + 1
            if first <= last:
                out.append((first, last, _hash(f, first, last)))
    return out


def make_bmap(img: Path, bounds: Sequence[int]) -> Bmap:
    """Scan ``img`` for data (SEEK_DATA/SEEK_HOLE) and hash each range."""
    size = img.stat().st_size
    fd = os.open(img, os.O_RDONLY)
    try:
        return Bmap(size, tuple(_scan(fd, bounds, size)))
    finally:
        os.close(fd)


def update_bmap(old: Bmap, img: Path, start: int, end: int, bounds: Sequence[int]) -> Bmap:
    """Rehash only bytes [start, end) of ``img`` (one partition); keep the other ranges."""
    size = img.stat().st_size
    if size != old.image_size:
        raise ImageError(f"{img}: size changed since its bmap was made")
    a, b = start // BLOCK, (end - 1) // BLOCK
    keep = [r for r in old.ranges if r[1] < a or r[0] > b]
    if any(r[0] < a <= r[1] or r[0] <= b < r[1] for r in old.ranges):
        return make_bmap(img, bounds)  # a range crosses the region: rescan everything
    fd = os.open(img, os.O_RDONLY)
    try:
        fresh = _scan(fd, [start, end, *bounds], size)
    finally:
        os.close(fd)
    new = [r for r in fresh if a <= r[0] and r[1] <= b]
    return Bmap(size, tuple(sorted(keep + new)))


def render(bmap: Bmap) -> bytes:
    blocks = (bmap.image_size + BLOCK - 1) // BLOCK
    mapped = sum(last - first + 1 for first, last, _ in bmap.ranges)
    lines = ['<?xml version="1.0" ?>', '<bmap version="2.0">',
             f"    <ImageSize> {bmap.image_size} </ImageSize>",
             f"    <BlockSize> {BLOCK} </BlockSize>",
             f"    <BlocksCount> {blocks} </BlocksCount>",
             f"    <MappedBlocksCount> {mapped} </MappedBlocksCount>",
             "    <ChecksumType> sha256 </ChecksumType>",
             f"    <BmapFileChecksum> {'0' * 64} </BmapFileChecksum>",
             "    <BlockMap>"]
    for first, last, sha in bmap.ranges:
        span = f"{first}" if first == last else f"{first}-{last}"
        lines.append(f'        <Range chksum="{sha}"> {span} </Range>')
    lines += ["    </BlockMap>", "</bmap>", ""]
    text = "\n".join(lines).encode()
    # The file checksum is taken with its own field zeroed, as bmaptool does.
    digest = hashlib.sha256(text).hexdigest()
    return text.replace(b"0" * 64 + b" </BmapFileChecksum>", digest.encode() +
                        b" </BmapFileChecksum>", 1)


_RANGE = re.compile(rb'<Range chksum="([0-9a-f]{64})">\s*(\d+)(?:-(\d+))?\s*</Range>')


def read_bmap(path: Path) -> Bmap:
    text = path.read_bytes()
    m = re.search(rb"<ImageSize>\s*(\d+)\s*</ImageSize>", text)
    if m is None:
        raise ImageError(f"{path}: not a bmap file")
    ranges = tuple((int(a), int(b or a), sha.decode()) for sha, a, b in _RANGE.findall(text))
    return Bmap(int(m.group(1)), ranges)


def write_bmap(bmap: Bmap, path: Path) -> None:
    path.write_bytes(render(bmap))

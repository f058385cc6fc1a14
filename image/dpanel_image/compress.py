"""Reading vendor images (.img, .xz, .zst, .gz) sparsely, and writing compressed outputs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import IO, Callable, Literal, Optional

from .errors import ImageError
from .util import need_tool

__all__ = ["DECOMPRESSORS", "Compression", "Tap", "compress", "decompress_sparse"]

#: Sees every chunk of the unpacked stream as it passes: (offset, data). It may raise
#: ImageError to stop the unpacking at once (a wrong image refused in its first MiB).
Tap = Callable[[int, bytes], None]

Compression = Literal["zst", "xz", "none"]

DECOMPRESSORS: dict[str, tuple[list[str], str]] = {
    ".xz": (["xz", "-dc"], "xz-utils"),
    ".zst": (["zstd", "-dc"], "zstd"),
    ".gz": (["gzip", "-dc"], "gzip"),
}
COMPRESSORS: dict[str, tuple[list[str], str]] = {
    # -T0: all cores; zstd -19 is slow for little gain on disk images, -10 is a fair point.
    "xz": (["xz", "-T0", "-6", "-c"], "xz-utils"),
    "zst": (["zstd", "-T0", "-10", "-q", "-c"], "zstd"),
}
BLOCK = 64 << 10  # hole granularity when unpacking (ext4 allocates in 4 KiB)


def decompress_sparse(src: Path, dst: Path, tap: Optional[Tap] = None) -> int:
    """Write ``src`` (maybe compressed) to ``dst``, leaving zero blocks as holes; its size.

    A 4 GB vendor image is mostly zeros; holes make the copy, the per-device copies and
    bmaptool fast. A truncated or corrupt archive raises ImageError naming ``src``.
    """
    if not src.exists():
        raise ImageError(f"--base: {src} does not exist")
    if src.is_dir():
        raise ImageError(f"--base: {src} is a directory, not an image")
    dec = DECOMPRESSORS.get(src.suffix)
    zero = bytes(BLOCK)
    size = 0
    with open(dst, "wb") as out:
        if dec is None:
            with open(src, "rb") as f:
                size = _copy_sparse(f, out, zero, tap)
        else:
            argv, pkg = dec
            need_tool(argv[0], pkg)
            with subprocess.Popen([*argv, str(src)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, stdin=subprocess.DEVNULL) as p:
                assert p.stdout is not None and p.stderr is not None
                try:
                    size = _copy_sparse(p.stdout, out, zero, tap)
                except BaseException:
                    p.kill()  # refused (or interrupted) mid-stream: stop decompressing
                    raise
                err = p.stderr.read().decode(errors="replace").strip()
            if p.returncode != 0:
                raise ImageError(f"--base: {src} is corrupt or truncated "
                                 f"({argv[0]}: {err or 'exit ' + str(p.returncode)})")
        out.truncate(size)
    if size == 0:
        raise ImageError(f"--base: {src} is empty")
    return size


def _copy_sparse(f: IO[bytes], out: IO[bytes], zero: bytes, tap: Optional[Tap]) -> int:
    read, seek, write = f.read, out.seek, out.write
    size = 0
    while True:
        chunk = read(BLOCK)
        if not chunk:
            return size
        if tap is not None:
            tap(size, chunk)
        if chunk == zero[:len(chunk)]:
            seek(len(chunk), 1)
        else:
            write(chunk)
        size += len(chunk)


def compress(src: Path, kind: Compression, dst: Path) -> None:
    """Compress ``src`` into ``dst`` (caller publishes it atomically)."""
    argv, pkg = COMPRESSORS[kind]
    need_tool(argv[0], pkg)
    with open(dst, "wb") as out:
        proc = subprocess.run([*argv, str(src)], stdout=out, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ImageError(f"compressing {src.name} with {argv[0]} failed: "
                         f"{proc.stderr.decode(errors='replace').strip()}")


"""Unpack a onedir update bundle (a plain tar) into a fresh slot, trusting none of it.

The tar is signed and hashed before it gets here, yet it is unpacked as if hostile (a
leaked update key, a bad build host): the frozen agent runs Python 3.9, which has no
``tarfile`` extraction filters, so nothing here calls ``extract``/``extractall``.
Each member is checked and written by hand, into a directory this function creates:

- names are relative, with no ``..``, ``.`` or empty part, no NUL, bounded in length;
- only directories and regular files (no symlinks, hard links, devices, FIFOs, sparse
  or GNU long-name tricks that survive parsing): nothing can point outside the slot;
- a file is created with ``O_EXCL | O_NOFOLLOW`` under parents that are real
  directories this run made, so a duplicate name or a clash fails instead of writing
  through anything;
- modes are reduced to 0755/0644 (no setuid, no world-writable), owner is the agent's;
- the total of the file sizes and the member count are capped.
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

__all__ = ["MAX_MEMBERS", "UnpackError", "unpack_tree"]

#: a frozen onedir agent has ~100 files; far more is not a bundle of ours
MAX_MEMBERS = 20000
_MAX_NAME = 1024
_MAX_PARTS = 32


class UnpackError(ValueError):
    """The tar is refused; the message names the member and why."""


def _parts(name: str) -> list[str]:
    if not name or len(name) > _MAX_NAME or "\0" in name or name.startswith("/"):
        raise UnpackError(f"tar member {name[:80]!r}: not a relative path")
    parts = name.rstrip("/").split("/") if name != "/" else [""]
    if len(parts) > _MAX_PARTS or any(p in ("", ".", "..") for p in parts):
        raise UnpackError(f"tar member {name[:80]!r}: '..', '.' or an empty part")
    return parts


def _real_dir(path: Path, top: Path) -> None:
    """``path`` (under ``top``) is a directory and no symlink, or is made one."""
    rel = path.relative_to(top).parts
    cur = top
    for p in rel:
        cur = cur / p
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnpackError(f"tar member under {cur.relative_to(top)}: not a directory")


def unpack_tree(tar_path: Path, dest: Path, max_bytes: int) -> int:
    """Unpack ``tar_path`` (uncompressed) into ``dest``, which must not exist. Returns
    the bytes written. On any error, ``dest`` is left for the caller to remove."""
    os.mkdir(dest, 0o755)
    top = dest
    total = members = 0
    try:
        tar = tarfile.open(tar_path, "r:")  # plain tar only: no decompression bombs
    except (tarfile.TarError, OSError) as exc:
        raise UnpackError(f"not a plain tar: {exc}") from None
    with tar:
        try:
            for ti in tar:
                members += 1
                if members > MAX_MEMBERS:
                    raise UnpackError(f"more than {MAX_MEMBERS} members")
                parts = _parts(ti.name)
                path = top.joinpath(*parts)
                if ti.type == tarfile.DIRTYPE:
                    _real_dir(path, top)
                    continue
                if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    what = ("a symlink" if ti.issym() else "a hard link" if ti.islnk()
                            else f"type {ti.type!r}")
                    raise UnpackError(f"tar member {ti.name[:80]!r}: {what} (only "
                                      "directories and regular files)")
                total += ti.size
                if ti.size < 0 or total > max_bytes:
                    raise UnpackError(f"unpacks to more than {max_bytes} bytes")
                _real_dir(path.parent, top)
                mode = 0o755 if ti.mode & 0o111 else 0o644
                src = tar.extractfile(ti)
                if src is None:
                    raise UnpackError(f"tar member {ti.name[:80]!r}: no data")
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 mode)
                except FileExistsError:
                    raise UnpackError(f"tar member {ti.name[:80]!r}: appears twice") from None
                with os.fdopen(fd, "wb") as out:
                    left = ti.size
                    while left:
                        chunk = src.read(min(left, 1 << 20))
                        if not chunk:
                            raise UnpackError(f"tar member {ti.name[:80]!r}: truncated")
                        out.write(chunk)
                        left -= len(chunk)
                    os.fchmod(out.fileno(), mode)  # the umask does not decide
        except tarfile.TarError as exc:
            raise UnpackError(f"damaged tar: {exc}") from None
    return total

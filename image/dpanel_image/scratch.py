"""A base image built from scratch with mmdebstrap, for boards with a ``[scratch]`` recipe.

The result (FAT with kernel + initrd, ext4 root) is a plain Debian with the board's
partition layout, cached under ~/.cache/dpanel by a hash of the recipe. build-image
then treats it like any vendor image: the board's own files (hostname, fstab, network)
come from its overlay and post-build, as they do for a vendor base.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .arches import Arch
from .board import Board
from .debroot import RootSpec, debian_root, locked, prune_siblings
from .disk import make_disk
from .errors import ImageError
from .util import cache_root, hash_text, log, run

__all__ = ["scratch_base", "scratch_spec"]

#: Bump ROOT_RECIPE when the mmdebstrap call changes, CONFIG_RECIPE when _clean does
#: (it is re-applied to the cached root, which is much cheaper).
ROOT_RECIPE = "3"
CONFIG_RECIPE = "5"


def scratch_spec(board: Board, arch: Arch) -> RootSpec:
    s = board.scratch
    if s is None:
        raise ImageError(f"board {board.name} has no [scratch] section: pass --base")
    mods = "\\n".join(s.initramfs_modules)
    # Before the kernel package is configured: mkinitramfs would otherwise run modinfo
    # on every module under emulation (17 min); MODULES=list takes 2.5 min.
    hook = ('mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"'
            ' && echo MODULES=list > "$1/etc/initramfs-tools/conf.d/dpanel.conf"'
            f' && printf "{mods}\\n" > "$1/usr/share/initramfs-tools/modules.d/dpanel.conf"')
    return RootSpec(name=f"boot-{board.name}", suite=s.suite, arch=arch, packages=s.packages,
                    essential_hooks=(hook,), extra_key=hash_text(ROOT_RECIPE))


def _clean(board: Board, root: Path) -> None:
    """Board-neutral hygiene of the fresh root: mount points, no build leftovers."""
    for spec in board.partitions:
        (root / spec.mountpoint.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for leftover in ("etc/resolv.conf", "etc/dpanel-host-ca.crt"):
        p = root / leftover
        if p.exists() and p.stat().st_size == 0:
            p.unlink()
    (root / "etc" / "machine-id").write_text("uninitialized\n")
    for junk in ("var/lib/apt/lists", "var/cache/apt/archives", "var/log"):
        d = root / junk
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file() or p.is_symlink():
                    p.unlink()
    for p in (root / "usr" / "bin").glob("qemu-*-static"):
        p.unlink()


def _du_mib(path: Path) -> int:
    out = run(["du", "-s", "-x", "--block-size=1M", path], f"du {path}").stdout.decode()
    return int(out.split()[0])


def scratch_base(board: Board, arch: Arch) -> Path:
    """Cached whole-disk base image for a [scratch] board; built on first use."""
    spec = scratch_spec(board, arch)
    key = hash_text(spec.key(), CONFIG_RECIPE, repr(board.partitions), repr(board.scratch))
    dest = cache_root() / f"base-{board.name}-{arch}-{key}.img"
    if dest.exists():
        return dest
    assert board.scratch is not None
    root = debian_root(spec)
    with locked(dest):
        if dest.exists():
            return dest
        _clean(board, root)  # idempotent; re-applied when CONFIG_RECIPE changes
        log(f"assembling the {board.name} base image from {root.name}")
        with tempfile.TemporaryDirectory(prefix="dpanel-scratch-", dir=dest.parent) as td:
            fat = Path(td) / "fat"
            fat.mkdir()
            q = board.qemu
            kernels = sorted((root / "boot").glob("vmlinuz-*"))
            initrds = sorted((root / "boot").glob("initrd.img-*"))
            if not kernels or not initrds:
                raise ImageError(f"{root}: no kernel or initrd in /boot (linux-image "
                                 "missing from [scratch] packages?)")
            shutil.copy(kernels[-1], fat / (q.kernel if q else "vmlinuz"))
            shutil.copy(initrds[-1], fat / (q.initrd if q else "initrd.img"))
            layout = []
            for p in board.partitions:
                if p.role == "boot":
                    layout.append(("vfat", board.scratch.boot_mib, p.label, fat))
                else:
                    size = _du_mib(root) + board.scratch.root_slack_mib
                    layout.append(("ext4", size, p.label, root))
            tmp = Path(td) / "base.img"
            make_disk(tmp, layout, board.table)  # type: ignore[arg-type]
            os.replace(tmp, dest)
    prune_siblings(dest, f"base-{board.name}-{arch}-")
    log(f"base image {dest}")
    return dest


"""Make sure the kernel runs foreign-architecture binaries through qemu-user (binfmt_misc)."""

from __future__ import annotations

import os
from pathlib import Path

from .arches import Arch, arch_info, host_arch
from .errors import ImageError
from .util import log, run

__all__ = ["ensure_binfmt"]

BINFMT = Path("/proc/sys/fs/binfmt_misc")


def ensure_binfmt(arch: Arch) -> None:
    """Mount binfmt_misc and register qemu-<arch> if needed (a clean CI machine has neither).

    Debian's qemu-user-static registers with the F (fix binary) flag, so a chroot into a
    foreign root works without copying qemu into it (and so no qemu binary ends up in
    an image).
    """
    if host_arch() == arch:
        return
    qemu = arch_info(arch).qemu
    entry = BINFMT / f"qemu-{qemu}"
    if not (BINFMT / "register").exists():
        if os.geteuid() != 0:
            raise ImageError(f"{BINFMT} is not mounted; as root run "
                             f"'mount -t binfmt_misc binfmt_misc {BINFMT}'")
        log(f"mounting binfmt_misc on {BINFMT}")
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], "mount binfmt_misc")
    if entry.exists() and entry.read_text().startswith("enabled"):
        return
    if os.geteuid() != 0:
        raise ImageError(f"binfmt_misc has no enabled qemu-{qemu}; as root run "
                         f"'update-binfmts --enable qemu-{qemu}'")
    log(f"registering qemu-{qemu} with binfmt_misc")
    run(["update-binfmts", "--enable", f"qemu-{qemu}"],
        f"update-binfmts --enable qemu-{qemu} (is qemu-user-static installed?)")
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        raise ImageError(f"binfmt_misc: qemu-{qemu} still not enabled after update-binfmts")

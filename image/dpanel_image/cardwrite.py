"""Safety checks before writing an image straight to a card (``provision --to /dev/sdX``)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Callable, Optional

from .errors import ImageError

__all__ = ["check_target", "confirm"]


def _mounted_devnums(proc: Path) -> set[tuple[int, int]]:
    nums = set()
    mountinfo = proc / "self" / "mountinfo"
    if mountinfo.exists():
        for line in mountinfo.read_text().splitlines():
            f = line.split()
            if len(f) > 2 and ":" in f[2]:
                a, b = f[2].split(":")
                nums.add((int(a), int(b)))
    return nums


def _swaps(proc: Path) -> set[str]:
    swaps = proc / "swaps"
    if not swaps.exists():
        return set()
    return {line.split()[0] for line in swaps.read_text().splitlines()[1:] if line.strip()}


def check_target(device: str, sys_root: Path = Path("/sys"),
                 proc: Path = Path("/proc")) -> Path:
    """Refuse anything but an unmounted, removable whole disk; return its /dev path.

    Refuses: a missing path, a regular file, a partition (write the whole card), a
    non-removable disk (the system disk is never removable), a disk with any mounted or
    swapped-on partition, and the disk holding /.
    """
    dev = Path(device)
    try:
        st = dev.stat()
    except FileNotFoundError:
        raise ImageError(f"--to: {device} does not exist") from None
    if not stat.S_ISBLK(st.st_mode):
        raise ImageError(f"--to: {device} is not a block device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    node = sys_root / "dev" / "block" / f"{major}:{minor}"
    if not node.exists():
        raise ImageError(f"--to: {device}: no {node} (is sysfs mounted?)")
    real = node.resolve()
    if (real / "partition").exists():
        raise ImageError(f"--to: {device} is a partition; give the whole card "
                         f"(/dev/{real.parent.name})")
    name = real.name
    removable = (real / "removable").read_text().strip() if (real / "removable").exists() \
        else "0"
    root_dev = os.stat("/").st_dev
    members = {(major, minor)}
    for sub in real.iterdir():
        dev_file = sub / "dev"
        if (sub / "partition").exists() and dev_file.exists():
            a, b = dev_file.read_text().strip().split(":")
            members.add((int(a), int(b)))
    if (os.major(root_dev), os.minor(root_dev)) in members:
        raise ImageError(f"--to: {device} ({name}) holds the running system's root "
                         "file system: refusing")
    if removable != "1":
        raise ImageError(f"--to: {device} ({name}) is not a removable disk: refusing "
                         "(SD cards and USB readers are removable)")
    busy = members & _mounted_devnums(proc)
    swapped = {s for s in _swaps(proc) if Path(s).name.startswith(name)}
    if busy or swapped:
        raise ImageError(f"--to: {device} ({name}) has mounted or swapped partitions: "
                         "unmount them first")
    return Path("/dev") / name


def confirm(question: str, yes: bool,
            ask: Optional[Callable[[str], str]] = None) -> None:
    """Ask before a destructive write; with no terminal and no --yes, refuse."""
    if yes:
        return
    if ask is None:
        if not sys.stdin or not sys.stdin.isatty():
            raise ImageError(f"{question} -- not confirmed: no terminal to ask on "
                             "(pass --yes)")
        ask = input
    answer = ask(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise ImageError("aborted: nothing written")

"""Small synthetic base images with a board's partition layout, for tests and benchmarks.

They stand in for vendor images (Raspberry Pi OS, Armbian): same partition table and
file systems, a root with an ELF header of the right architecture at /usr/bin/env, and
the identity files a vendor image may wrongly carry (SSH host keys, a machine-id).
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from pathlib import Path

from .arches import Arch, arch_info
from .board import Board
from .debroot import locked
from .disk import make_disk
from .util import cache_root, hash_text

__all__ = ["fake_elf", "root_tree", "synthetic_base"]

RECIPE = "3"


def fake_elf(arch: Arch) -> bytes:
    """A 64-byte ELF header for ``arch`` (enough for file(1) and our arch probe)."""
    info = arch_info(arch)
    ident = b"\x7fELF" + bytes([info.elf_class, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHI", 2, info.elf_machine, 1) + bytes(40)


def root_tree(d: Path, arch: Arch, board: Board) -> None:
    for sub in ("usr/bin", "usr/local/bin", "etc/ssh", "etc/systemd/system",
                "var/lib/dbus", "var/log", "boot", "tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "usr/bin/env").write_bytes(fake_elf(arch))
    os.chmod(d / "usr/bin/env", 0o755)  # noqa: S103 - an executable, as on a device
    (d / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (d / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (d / "etc/ssh/ssh_host_ed25519_key").write_text("vendor key that must not ship\n")
    (d / "etc/ssh/ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAA vendor\n")
    os.chmod(d / "etc/ssh/ssh_host_ed25519_key", 0o600)
    # Units a Debian root ships, with bookworm's [Install] sections, so that a board's
    # post-build "enable" has something real to link.
    units = d / "usr/lib/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    (units / "systemd-networkd.service").write_text(
        "[Unit]\nDescription=Network Configuration\n[Service]\n"
        "ExecStart=/lib/systemd/systemd-networkd\n[Install]\nWantedBy=multi-user.target\n"
        "Also=systemd-networkd.socket\nAlias=dbus-org.freedesktop.network1.service\n"
        "Also=systemd-networkd-wait-online.service\n")
    (units / "systemd-networkd.socket").write_text(
        "[Socket]\nListenNetlink=route 1361\n[Install]\nWantedBy=sockets.target\n")
    (units / "systemd-networkd-wait-online.service").write_text(
        "[Service]\nType=oneshot\n[Install]\nWantedBy=network-online.target\n")
    (d / "etc/os-release").write_text(f'PRETTY_NAME="synthetic {board.name} {arch}"\n')
    if board.token_role == "root":
        (d / "boot/armbianEnv.txt").write_text("verbosity=1\n")


def synthetic_base(board: Board, arch: Arch, compressed: bool = False, *, boot_mib: int = 64,
                   root_mib: int = 192) -> Path:
    """Cached synthetic base image (``.img``, or ``.img.xz`` when ``compressed``).

    The sizes are the caller's: the tests keep theirs in tests/imagefix.py.
    """
    key = hash_text(RECIPE, repr(board.partitions), str(boot_mib), str(root_mib), arch)
    dest = cache_root() / f"synthetic-{board.name}-{arch}-{key}.img"
    with locked(dest):
        if not dest.exists():
            with tempfile.TemporaryDirectory(prefix="dpanel-synth-", dir=dest.parent) as td:
                layout = []
                for p in board.partitions:
                    content = Path(td) / p.role
                    content.mkdir()
                    if p.role == "root":
                        root_tree(content, arch, board)
                        size = root_mib
                    else:
                        (content / "config.txt").write_text("arm_64bit=1\n")
                        (content / "cmdline.txt").write_text("console=serial0 root=LABEL=rootfs\n")
                        size = boot_mib
                    layout.append((p.fs, size, p.label, content))
                tmp = Path(td) / "img"
                make_disk(tmp, layout, board.table)
                os.replace(tmp, dest)
        if not compressed:
            return dest
        xz = dest.with_name(dest.name + ".xz")
        if not xz.exists():
            tmp_xz = xz.with_name(xz.name + ".tmp")
            with open(tmp_xz, "wb") as out:
                subprocess.run(["xz", "-T0", "-1", "-c", str(dest)], stdout=out, check=True)
            os.replace(tmp_xz, xz)
        return xz

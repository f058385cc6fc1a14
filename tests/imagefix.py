"""Fixtures for the image builder tests: synthetic bases, fake agents, device tokens."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from dpanel_image.arches import Arch
from dpanel_image.board import load_board
from dpanel_image.disk import Ext4, Fat, Part, ext4_magic_ok, fat_magic_ok, read_table
from dpanel_image.synthetic import fake_elf, synthetic_base
from dpanel_proto.token import DeviceToken

#: Partition sizes (MiB) of the small synthetic bases the tests build with each board's
#: layout: test data, so kept here rather than in the product's board files.
SYNTHETIC_SIZES: dict[str, dict[str, int]] = {
    "rpi": {"boot_mib": 64, "root_mib": 160},
    "orangepi": {"root_mib": 192},
    "qemu-arm64": {"boot_mib": 64, "root_mib": 160},
}

ED_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDpanelDpanelDpanelDpanelDpanelDpanelDpanel0"


def make_token(device: str, host: str = "10.0.2.2") -> str:
    return DeviceToken(device=device, secret=secrets.token_urlsafe(32),
                       broker=f"mqtt://{host}:1883", tunnel=f"{host}:2220",
                       tunnel_host_key=ED_KEY + " tunnel", manager_key=ED_KEY + " mgr").encode()


def fake_agent(path: Path, arch: Arch, size: int = 200_000) -> Path:
    """A file with a real ELF header for ``arch`` (enough for the builder's checks)."""
    path.write_bytes(fake_elf(arch) + bytes(range(256)) * (size // 256))
    path.chmod(0o755)
    return path


def base_image(board: str, arch: Arch = "arm64", xz: bool = False) -> Path:
    return synthetic_base(load_board(board), arch, compressed=xz, **SYNTHETIC_SIZES[board])


def root_fs(img: Path) -> Ext4:
    part = next(p for p in reversed(read_table(img)) if ext4_magic_ok(img, p))
    return Ext4(img, part)


def boot_fs(img: Path) -> Fat:
    part = next(p for p in read_table(img) if fat_magic_ok(img, p))
    return Fat(img, part)


def stat_of(fs: Ext4, path: str) -> tuple[str, int, int, int]:
    """(type, permission bits, uid, gid) of ``path`` inside an ext4 image."""
    out = subprocess.run(["debugfs", "-R", f"stat {path}", fs.spec], capture_output=True,
                         text=True, check=True).stdout
    fields = out.split()
    mode = int(fields[fields.index("Mode:") + 1], 8)
    uid = int(fields[fields.index("User:") + 1])
    gid = int(fields[fields.index("Group:") + 1])
    return fields[fields.index("Type:") + 1], mode, uid, gid


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def part_of(img: Path, n: int) -> Part:
    return read_table(img)[n - 1]


@pytest.fixture
def agent_arm64(tmp_path: Path) -> Path:
    return fake_agent(tmp_path / "dpanel-tunnel", "arm64")


def as_seen_from_qemu(token: str) -> str:
    """The same token, addressed the way a qemu user-net guest reaches the host (10.0.2.2).

    The stack listens on 127.0.0.1; slirp maps the guest's 10.0.2.2 to the host's
    loopback, as a home router maps a device's outgoing connection.
    """
    import dataclasses

    from dpanel_proto.token import parse_token

    t = parse_token(token)
    scheme, hp = t.broker.split("://", 1)
    return dataclasses.replace(
        t, broker=f"{scheme}://10.0.2.2:{hp.rsplit(':', 1)[1]}",
        tunnel=f"10.0.2.2:{t.tunnel.rsplit(':', 1)[1]}").encode()

"""build-image: turn a vendor image (or a from-scratch base) into a dPanel image, rootless."""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import bmap as bmapmod
from .arches import Arch, parse_arch
from .boards import Board, load_board
from .compress import Compression, compress, decompress_sparse
from .disk import Ext4, Fat, Op, Part, ext4_magic_ok, fat_magic_ok, read_table
from .elf import elf_arch, elf_arch_of_file
from .errors import ImageError
from .freeze import FreezeMode, build_agent
from .util import PROJECT_ROOT, AtomicDir, log, run, sha256_file

__all__ = ["AGENT_BIN", "AGENT_CONFIG", "IMAGE_INFO", "BuildResult", "agent_config",
           "build_image", "check_layout", "find_root", "image_arch", "read_image_info"]

AGENT_BIN = "/usr/local/bin/dpanel-tunnel"
AGENT_ONEDIR = "/opt/dpanel-tunnel"
AGENT_CONFIG = "/etc/dpanel/agent.toml"
IMAGE_INFO = "/etc/dpanel/image.toml"
UNIT = PROJECT_ROOT / "systemd" / "dpanel-agent.service"
OVERLAY = PROJECT_ROOT / "image" / "overlay"
WANTS = "/etc/systemd/system/multi-user.target.wants"
#: Where the agent looks for a token dropped by provisioning (FAT first, then ext4 /boot).
TOKEN_IMPORTS = ("/boot/firmware/dpanel-token.txt", "/boot/dpanel-token.txt")
#: Files that make two devices flashed from one image look alike (pi-gen's hygiene list).
SHARED_IDENTITY = ("/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_rsa_key.pub",
                   "/etc/ssh/ssh_host_ecdsa_key", "/etc/ssh/ssh_host_ecdsa_key.pub",
                   "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub",
                   "/etc/ssh/ssh_host_dsa_key", "/etc/ssh/ssh_host_dsa_key.pub",
                   "/var/lib/dbus/machine-id", "/etc/dpanel/token",
                   "/var/lib/dpanel-tunnel/ssh_host_ed25519_key",
                   "/var/lib/dpanel-tunnel/ssh_host_ed25519_key.pub",
                   "/var/lib/dpanel-tunnel/token")
#: Probed in order to learn the image's architecture from a real ELF in its root.
ARCH_PROBES = ("/usr/bin/env", "/usr/bin/ls", "/bin/ls")


def agent_config() -> str:
    imports = ", ".join(f'"{p}"' for p in TOKEN_IMPORTS)
    return ("# dPanel agent configuration, written by `invoke build-image`.\n"
            'token_file = "/etc/dpanel/token"\n'
            f"import_token_from = [{imports}]\n"
            'state_dir = "/var/lib/dpanel-tunnel"\n')


@dataclass(frozen=True)
class BuildResult:
    image: Path
    compressed: Optional[Path]
    sha256: Path
    bmap: Path
    seconds: float


def check_layout(board: Board, img: Path) -> list[Part]:
    """The image's partitions must be the board's, in order, with the right file systems."""
    parts = read_table(img)
    if len(parts) != len(board.partitions):
        raise ImageError(
            f"{img}: has {len(parts)} partition(s), board {board.name} expects "
            f"{len(board.partitions)} ({', '.join(f'{p.fs} {p.role}' for p in board.partitions)})")
    checks = {"ext4": ext4_magic_ok, "vfat": fat_magic_ok}
    for want, part in zip(board.partitions, parts):
        if not checks[want.fs](img, part):
            found = next((fs for fs, ok in checks.items() if ok(img, part)), "unknown")
            raise ImageError(f"{img}: partition {part.number} should be {want.fs} "
                             f"({want.role}, {want.mountpoint}) for board {board.name}, "
                             f"found {found} (type {part.type})")
    return parts


def image_arch(root: Ext4) -> Arch:
    for probe in ARCH_PROBES:
        data = root.cat(probe)
        if data:
            return elf_arch(data[:64], f"{root.img}:{probe}")
    raise ImageError(f"{root.img}: cannot tell the image's architecture "
                     f"(none of {', '.join(ARCH_PROBES)} in the root file system)")


def _agent_ops(agent: Path, mode: FreezeMode, staging: Path) -> list[Op]:
    if mode == "onefile":
        return [Op("file", AGENT_BIN, src=agent, mode=0o755)]
    top = agent.parent
    ops = [Op("dir", AGENT_ONEDIR, mode=0o755)]
    for p in sorted(top.rglob("*")):
        dest = f"{AGENT_ONEDIR}/{p.relative_to(top)}"
        if p.is_symlink():
            ops.append(Op("symlink", dest, target=os.readlink(p)))
        elif p.is_dir():
            ops.append(Op("dir", dest, mode=0o755))
        else:
            ops.append(Op("file", dest, src=p, mode=0o755 if os.access(p, os.X_OK) else 0o644))
    ops.append(Op("symlink", AGENT_BIN, target=f"{AGENT_ONEDIR}/{agent.name}"))
    return ops


def _overlay_ops() -> list[Op]:
    ops = []
    for p in sorted(OVERLAY.rglob("*")):
        if p.name == ".gitkeep":
            continue
        dest = "/" + str(p.relative_to(OVERLAY))
        if p.is_dir():
            ops.append(Op("dir", dest, mode=0o755))
        else:
            ops.append(Op("file", dest, src=p, mode=0o755 if os.access(p, os.X_OK) else 0o644))
            if p.suffix == ".service" and "[Install]" in p.read_text():
                ops.append(Op("symlink", f"{WANTS}/{p.name}", target=dest))
    return ops


def _parents(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _dirs_first(ops: list[Op]) -> list[Op]:
    """Add missing parent directories (mode 0755) ahead of the ops that need them."""
    have = {o.path for o in ops if o.kind == "dir"}
    extra = []
    for o in ops:
        for d in _parents(o.path):
            if d not in have:
                have.add(d)
                extra.append(Op("dir", d, mode=0o755, set_attrs=False))
    return sorted(extra, key=lambda o: o.path.count("/")) + ops


def build_image(board_name: str, out: Path, base: Optional[Path] = None,
                arch: Optional[str] = None, agent: Optional[Path] = None,
                mode: FreezeMode = "onedir", compression: Compression = "zst",
                tunnel_host_key: Optional[Path] = None, manager_key: Optional[Path] = None,
                ) -> BuildResult:
    """Build ``out/dpanel-<board>.img`` (+ compressed, .sha256, .bmap), all or nothing.

    ``mode`` onedir is the default for images: it starts faster than onefile (no unpack
    of ~25 MB into /tmp, i.e. onto the SD card, at every start) and runs as one process.
    """
    t0 = time.monotonic()
    board = load_board(board_name)
    a: Arch = parse_arch(arch) if arch else board.default_arch
    if a not in board.arches:
        raise ImageError(f"--arch {a}: board {board.name} supports {', '.join(board.arches)}")
    pins = {name: p for name, p in (("tunnel_host_key.pub", tunnel_host_key),
                                     ("manager_key.pub", manager_key)) if p is not None}
    for name, p in pins.items():
        _check_pubkey(p, "--tunnel-host-key" if name.startswith("tunnel") else "--manager-key")
    if agent is None:
        agent = build_agent(a, mode).path
    elif not agent.is_file():
        raise ImageError(f"--agent: {agent} is not a file")
    else:
        # A given binary decides the layout: PyInstaller onedir keeps _internal/ beside it.
        mode = "onedir" if (agent.parent / "_internal").is_dir() else "onefile"
    agent_arch = elf_arch_of_file(agent)
    if agent_arch != a:
        raise ImageError(f"--agent: {agent} is an {agent_arch} binary, the image is {a}")
    if base is not None and not base.is_file():
        raise ImageError(f"--base: {base} does not exist" if not base.exists() else
                         f"--base: {base} is not a file")
    if base is None and board.scratch is None:
        raise ImageError(f"--base: board {board.name} needs a vendor image (e.g. "
                         f"raspios-lite-arm64.img.xz)")

    name = board.image_name(a)
    staging = AtomicDir(out)
    with staging.staged():
        img = staging.path(name)
        if base is None:
            from .scratch import scratch_base

            src = scratch_base(board, a)
            run(["cp", "--sparse=always", "--reflink=auto", src, img], "copying the base")
        else:
            _check_space(out, base, _size_of(agent, mode))
            log(f"unpacking {base}")
            decompress_sparse(base, img)
        parts = check_layout(board, img)
        root = Ext4(img, parts[board.index("root")])
        img_arch = image_arch(root)
        if img_arch != a:
            raise ImageError(f"--base: {base or img} is an {img_arch} image, but the agent "
                             f"binary is {a} (pass --arch {img_arch} or another image)")
        need = _size_of(agent, mode) + (4 << 20)
        free = root.free_bytes()
        if free < need:
            raise ImageError(f"{base or img}: root file system has {free >> 20} MiB free, "
                             f"the agent needs {need >> 20} MiB (grow the partition first)")
        with tempfile.TemporaryDirectory(prefix="dpanel-build-") as td:
            _inject(root, board, a, agent, mode, pins, Path(td))
        if board.token_role == "boot":
            # FAT holds nothing of ours until provisioning, but must be readable by mtools.
            Fat(img, parts[board.index("boot")]).names()
        run(["e2fsck", "-fn", f"{img}?offset={root.part.start}"],
            "e2fsck of the root file system after editing")
        outputs = _finish(img, parts, compression, staging)
        published = staging.publish(outputs)
    comp = next((p for p in published if p.suffix in (".zst", ".xz")), None)
    result = BuildResult(published[0], comp, out / f"{name}.sha256", out / f"{name[:-4]}.bmap",
                         time.monotonic() - t0)
    log(f"built {result.image} in {result.seconds:.1f} s")
    return result


def _check_pubkey(path: Path, what: str) -> None:
    if not path.is_file():
        raise ImageError(f"{what}: {path} does not exist")
    line = path.read_text().strip()
    if not line.startswith(("ssh-ed25519 ", "ecdsa-sha2-", "ssh-rsa ")) or "\n" in line:
        raise ImageError(f"{what}: {path} is not one OpenSSH public key line")


def _check_space(out: Path, base: Path, agent_bytes: int) -> None:
    """Refuse early when the output directory cannot hold the unpacked image's data.

    A raw base counts by its allocated blocks (vendor images are sparse once unpacked);
    a compressed one by a rough 4x ratio. Running out later is still caught and cleaned.
    """
    st = os.statvfs(out)
    free = st.f_bavail * st.f_frsize
    bst = base.stat()
    data = bst.st_size * 4 if base.suffix in (".xz", ".zst", ".gz") else bst.st_blocks * 512
    need = data + agent_bytes
    if free < need:
        raise ImageError(f"output directory {out}: {free >> 20} MiB free, about "
                         f"{need >> 20} MiB needed")


def _size_of(agent: Path, mode: FreezeMode) -> int:
    if mode == "onefile":
        return agent.stat().st_size
    return sum(p.stat().st_size for p in agent.parent.rglob("*") if p.is_file())


def _inject(root: Ext4, board: Board, arch: Arch, agent: Path, mode: FreezeMode,
            pins: dict[str, Path], tmp: Path) -> None:
    (tmp / "agent.toml").write_text(agent_config())
    info = (f'# Written by invoke build-image; read by invoke provision.\n'
            f'board = "{board.name}"\narch = "{arch}"\nagent_mode = "{mode}"\n'
            f'agent_sha256 = "{sha256_file(agent)}"\n'
            f'token_partition = "{board.token_role}"\ntoken_path = "{board.token_path}"\n'
            f'built = "{datetime.datetime.now(datetime.timezone.utc).isoformat()}"\n')
    (tmp / "image.toml").write_text(info)
    (tmp / "machine-id").write_text("uninitialized\n")
    ops: list[Op] = [Op("rm", p) for p in SHARED_IDENTITY if root.exists(p)]
    ops += [Op("rm", f"/usr/bin/{n}") for n in root.list_dir("/usr/bin")
            if n.startswith("qemu-") and n.endswith("-static")]
    ops += [Op("dir", "/etc/dpanel", mode=0o755)]
    ops += _agent_ops(agent, mode, tmp)
    ops += [Op("file", "/etc/systemd/system/dpanel-agent.service", src=UNIT),
            Op("symlink", f"{WANTS}/dpanel-agent.service",
               target="/etc/systemd/system/dpanel-agent.service"),
            Op("file", AGENT_CONFIG, src=tmp / "agent.toml"),
            Op("file", IMAGE_INFO, src=tmp / "image.toml"),
            Op("file", "/etc/machine-id", src=tmp / "machine-id", mode=0o444),
            # machine-id "uninitialized" makes this a first boot; systemd-firstboot would
            # then wait for answers on the console of a headless device. Mask it.
            Op("symlink", "/etc/systemd/system/systemd-firstboot.service", target="/dev/null")]
    if pins:
        ops.append(Op("dir", "/etc/dpanel/pins", mode=0o755))
        ops += [Op("file", f"/etc/dpanel/pins/{n}", src=p) for n, p in pins.items()]
    ops += _overlay_ops()
    root.apply(_dirs_first(ops))


def _finish(img: Path, parts: list[Part], compression: Compression,
            staging: AtomicDir) -> list[str]:
    """Write .bmap, compressed copy and .sha256 next to the image (still in staging)."""
    name = img.name
    bounds = [b for p in parts for b in (p.start, p.end)]
    bm = bmapmod.make_bmap(img, bounds)
    bmap_name = f"{name[:-4]}.bmap"
    bmapmod.write_bmap(bm, staging.path(bmap_name))
    outputs = [name, bmap_name]
    sums = [f"{sha256_file(img)}  {name}"]
    if compression != "none":
        cname = f"{name}.{compression}"
        compress(img, compression, staging.path(cname))
        outputs.append(cname)
        sums.append(f"{sha256_file(staging.path(cname))}  {cname}")
    staging.path(f"{name}.sha256").write_text("\n".join(sums) + "\n")
    outputs.append(f"{name}.sha256")
    return outputs


def find_root(img: Path) -> tuple[list[Part], Ext4]:
    """The ext4 partition that carries /etc/dpanel/image.toml (a dPanel image's root)."""
    parts = read_table(img)
    for p in parts:
        if ext4_magic_ok(img, p):
            e = Ext4(img, p)
            if e.exists(IMAGE_INFO):
                return parts, e
    raise ImageError(f"--image: {img} is not a dPanel image (no {IMAGE_INFO}); "
                     "run invoke build-image first")


def read_image_info(root: Ext4) -> dict[str, str]:
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    data = root.cat(IMAGE_INFO) or b""
    try:
        info = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise ImageError(f"{root.img}: {IMAGE_INFO} is damaged") from None
    return {k: str(v) for k, v in info.items()}

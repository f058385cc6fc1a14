"""build-image: turn a vendor image (or a from-scratch base) into a dPanel image, rootless.

The stages, in order, each a function below: :func:`unpack` the base (its layout is
checked on the stream), :func:`check` it against the board, :func:`inject` the agent
and the overlays, run the board's :func:`post_build`, :func:`verify` the result, and
write the :func:`outputs`. Nothing is published unless all of them succeed.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import bmap as bmapmod
from .arches import Arch, parse_arch
from .board import Board, load_board
from .compress import Compression, compress, decompress_sparse
from .disk import Ext4, Fat, Op, Part, ext4_magic_ok, read_table
from .elf import elf_arch, elf_arch_of_file
from .errors import ImageError
from .freeze import FreezeMode, build_agent
from .layout import HeadCheck, check_layout
from .postbuild import parse_post_build, post_build_ops, unit_links
from .util import AtomicDir, log, package_dir, run, sha256_file

__all__ = [
    "AGENT_BIN",
    "AGENT_CONFIG",
    "AGENT_CURRENT",
    "AGENT_SLOT",
    "IMAGE_INFO",
    "PINS",
    "UPDATE_ROOT",
    "BuildResult",
    "Job",
    "agent_config",
    "build_image",
    "find_root",
    "image_arch",
    "read_image_info",
]

AGENT_BIN = "/usr/local/bin/dpanel-tunnel"
#: The agent's update slots (dpanel_agent/updater.py): the image fills slot a and points
#: current at it; an update unpacks into slot b and swaps the link. The unit runs
#: current/dpanel-tunnel (overlay: dpanel-agent.service.d/slots.conf), AGENT_BIN links
#: there too, so a shell on the device runs whatever version is current.
UPDATE_ROOT = "/opt/dpanel"
AGENT_SLOT = f"{UPDATE_ROOT}/slots/a"
AGENT_CURRENT = f"{UPDATE_ROOT}/current"
AGENT_CONFIG = "/etc/dpanel/agent.toml"
IMAGE_INFO = "/etc/dpanel/image.toml"
#: Baked pins: file name in /etc/dpanel/pins/ -> the build-image option that gives it.
#: The agent reads these names; provision checks a token against them.
#: user_ca.pub is the agent's first SSH user CA (operator certificates), not a strict pin:
#: the manager may rotate it later with a request signed by the pinned manager key.
#: update_key.pub verifies agent update bundles (the manager's STATE_DIR/update_key.pub).
PINS = {"tunnel_host_key.pub": "--tunnel-host-key", "manager_key.pub": "--manager-key",
        "user_ca.pub": "--user-ca", "update_key.pub": "--update-key"}
PINS_DIR = "/etc/dpanel/pins"
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
#: Directories this builder owns in the root: (re)set to 0755 root:root. Others that
#: already exist (/etc, /usr/local, ...) keep the vendor's mode and owner.
OWNED_DIRS = ("/etc/dpanel", PINS_DIR, UPDATE_ROOT, f"{UPDATE_ROOT}/slots", AGENT_SLOT,
              "/usr/local/lib/dpanel")


def agent_config() -> str:
    """The image's /etc/dpanel/agent.toml (the agent's own parse_config accepts it)."""
    return ("# dPanel agent configuration, written by `invoke build-image`.\n" + tomli_w.dumps({
        "token_file": "/etc/dpanel/token",
        "import_token_from": list(TOKEN_IMPORTS),
        "state_dir": "/var/lib/dpanel-tunnel",
        # spelled out (they are the agent's defaults): updates verify bundles with
        # pins_dir/update_key.pub (build-image --update-key) and swap slots here
        "pins_dir": PINS_DIR,
        "update_root": UPDATE_ROOT}))


@dataclass(frozen=True)
class BuildResult:
    image: Path
    compressed: Optional[Path]
    sha256: Path
    bmap: Path
    seconds: float


@dataclass(frozen=True)
class Job:
    """Every input of one build, checked before anything is written."""

    board: Board
    arch: Arch
    agent: Path  # the onefile binary, or the executable inside a onedir folder
    mode: FreezeMode
    base: Optional[Path]  # None: the board's from-scratch base
    pins: Mapping[str, Path]  # PINS name -> public key file
    compression: Compression

    @property
    def name(self) -> str:
        return self.board.image_name(self.arch)


def build_image(board_name: str, out: Path, base: Optional[Path] = None,
                arch: Optional[str] = None, agent: Optional[Path] = None,
                mode: FreezeMode = "onedir", compression: Compression = "zst",
                tunnel_host_key: Optional[Path] = None, manager_key: Optional[Path] = None,
                user_ca: Optional[Path] = None,
                update_key: Optional[Path] = None) -> BuildResult:
    """Build ``out/dpanel-<board>.img`` (+ compressed, .sha256, .bmap), all or nothing.

    ``mode`` onedir is the default for images: it starts faster than onefile (no unpack
    of ~25 MB into /tmp, i.e. onto the SD card, at every start) and runs as one process.
    """
    t0 = time.monotonic()
    job = resolve(board_name, base, arch, agent, mode, compression,
                  {"tunnel_host_key.pub": tunnel_host_key, "manager_key.pub": manager_key,
                   "user_ca.pub": user_ca, "update_key.pub": update_key})
    staging = AtomicDir(out)
    with staging.staged(), tempfile.TemporaryDirectory(prefix="dpanel-build-") as td:
        img = staging.path(job.name)
        what = unpack(job, img, out)
        parts, root = check(job, img, what)
        inject(job, root, Path(td))
        post_build(job, root)
        verify(job, img, parts, root)
        published = staging.publish(outputs(job, img, parts, staging))
    comp = next((p for p in published if p.suffix in (".zst", ".xz")), None)
    result = BuildResult(published[0], comp, out / f"{job.name}.sha256",
                         out / f"{job.name[:-4]}.bmap", time.monotonic() - t0)
    log(f"built {result.image} in {result.seconds:.1f} s")
    return result


# ------------------------------------------------------------------------------ inputs

def resolve(board_name: str, base: Optional[Path], arch: Optional[str],
            agent: Optional[Path], mode: FreezeMode, compression: Compression,
            pins: Mapping[str, Optional[Path]]) -> Job:
    """Check every input (board, arch, agent, base, pin files); freeze the agent if none."""
    board = load_board(board_name)
    a: Arch = parse_arch(arch) if arch else board.default_arch
    if a not in board.arches:
        raise ImageError(f"--arch {a}: board {board.name} supports {', '.join(board.arches)}")
    given = {n: p for n, p in pins.items() if p is not None}
    for n, p in given.items():
        _check_pubkey(p, PINS[n])
    if agent is None:
        agent = build_agent(a, mode).path
    elif not agent.is_file():
        raise ImageError(f"--agent: {agent} is not a file")
    else:
        # A given binary decides the layout: PyInstaller onedir keeps _internal/ beside it.
        mode = "onedir" if (agent.parent / "_internal").is_dir() else "onefile"
        if mode == "onedir" and agent.name != "dpanel-tunnel":
            raise ImageError(f"--agent: {agent}: a onedir agent's executable must be named "
                             "dpanel-tunnel (the unit runs slots/a/dpanel-tunnel)")
    agent_arch = elf_arch_of_file(agent)
    if agent_arch != a:
        raise ImageError(f"--agent: {agent} is an {agent_arch} binary, the image is {a}")
    if base is not None and not base.is_file():
        raise ImageError(f"--base: {base} does not exist" if not base.exists() else
                         f"--base: {base} is not a file")
    if base is None and board.scratch is None:
        raise ImageError(f"--base: board {board.name} needs a vendor image (e.g. "
                         f"raspios-lite-arm64.img.xz)")
    return Job(board, a, agent, mode, base, given, compression)


def _check_pubkey(path: Path, what: str) -> None:
    if not path.is_file():
        raise ImageError(f"{what}: {path} does not exist")
    line = path.read_text().strip()
    if not line.startswith(("ssh-ed25519 ", "ecdsa-sha2-", "ssh-rsa ")) or "\n" in line:
        raise ImageError(f"{what}: {path} is not one OpenSSH public key line")


# ------------------------------------------------------------------------------ 1. unpack

def unpack(job: Job, img: Path, out: Path) -> str:
    """Write the base into ``img`` (sparse); the layout is checked as it streams past.

    Returns how errors name the base (``--base FILE``), never the staging file.
    """
    if job.base is None:
        from .scratch import scratch_base

        src = scratch_base(job.board, job.arch)
        run(["cp", "--sparse=always", "--reflink=auto", src, img], "copying the base")
        return f"the {job.board.name} base {src}"
    what = f"--base {job.base}"
    _check_space(out, job.base, _size_of(job.agent, job.mode))
    log(f"unpacking {job.base}")
    head = HeadCheck(job.board, what)
    head.finish(decompress_sparse(job.base, img, tap=head))
    return what


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


# ------------------------------------------------------------------------------ 2. check

def check(job: Job, img: Path, what: str) -> tuple[list[Part], Ext4]:
    """The board's layout (again, in full), the image's architecture, room for the agent."""
    parts = check_layout(job.board, img, what)
    root = Ext4(img, parts[job.board.index("root")])
    img_arch = image_arch(root, what)
    if img_arch != job.arch:
        raise ImageError(f"{what}: is an {img_arch} image, but the agent binary is "
                         f"{job.arch} (pass --arch {img_arch} or another image)")
    need = _size_of(job.agent, job.mode) + (4 << 20)
    free = root.free_bytes()
    if free < need:
        raise ImageError(f"{what}: root file system has {free >> 20} MiB free, "
                         f"the agent needs {need >> 20} MiB (grow the partition first)")
    return parts, root


def image_arch(root: Ext4, what: str = "") -> Arch:
    for probe in ARCH_PROBES:
        data = root.cat(probe)
        if data:
            return elf_arch(data[:64], f"{what or root.img}:{probe}")
    raise ImageError(f"{what or root.img}: cannot tell the image's architecture "
                     f"(none of {', '.join(ARCH_PROBES)} in the root file system)")


# ------------------------------------------------------------------------------ 3. inject

def inject(job: Job, root: Ext4, tmp: Path) -> None:
    """Into the root: the agent, its unit and config, the overlays, the pins; and remove
    what would make two devices alike."""
    (tmp / "agent.toml").write_text(agent_config())
    (tmp / "image.toml").write_text(image_info(job))
    (tmp / "machine-id").write_text("uninitialized\n")
    ops: list[Op] = [Op("rm", p) for p in SHARED_IDENTITY if root.exists(p)]
    ops += [Op("rm", f"/usr/bin/{n}") for n in root.list_dir("/usr/bin")
            if n.startswith("qemu-") and n.endswith("-static")]
    ops += [Op("dir", "/etc/dpanel", mode=0o755)]
    ops += _agent_ops(job.agent, job.mode)
    ops += [Op("file", AGENT_CONFIG, src=tmp / "agent.toml"),
            Op("file", IMAGE_INFO, src=tmp / "image.toml"),
            Op("file", "/etc/machine-id", src=tmp / "machine-id", mode=0o444),
            # machine-id "uninitialized" makes this a first boot; systemd-firstboot would
            # then wait for answers on the console of a headless device. Mask it.
            Op("symlink", "/etc/systemd/system/systemd-firstboot.service", target="/dev/null")]
    if job.pins:
        ops.append(Op("dir", PINS_DIR, mode=0o755))
        ops += [Op("file", f"{PINS_DIR}/{n}", src=p) for n, p in job.pins.items()]
    # The common overlay (the agent's unit, first-boot host keys), then the board's own.
    ops += _overlay_ops(package_dir("overlay"), root)
    if job.board.overlay is not None:
        ops += _overlay_ops(job.board.overlay, root)
    root.apply(_dirs_first(ops))


def image_info(job: Job) -> str:
    """/etc/dpanel/image.toml: what provision needs to know about the image."""
    return "# Written by invoke build-image; read by invoke provision.\n" + tomli_w.dumps({
        "board": job.board.name, "arch": job.arch, "agent_mode": job.mode,
        "agent_sha256": sha256_file(job.agent), "token_partition": job.board.token_role,
        "token_path": job.board.token_path,
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat()})


def _agent_ops(agent: Path, mode: FreezeMode) -> list[Op]:
    """The agent in slot a (a onefile binary, or the onedir folder's contents), current
    -> slots/a (relative, as the updater and the rollback hook write it), AGENT_BIN ->
    current."""
    ops = [Op("dir", d, mode=0o755) for d in (UPDATE_ROOT, f"{UPDATE_ROOT}/slots", AGENT_SLOT)]
    ops += [Op("symlink", AGENT_CURRENT, target="slots/a"),
            Op("symlink", AGENT_BIN, target=f"{AGENT_CURRENT}/dpanel-tunnel")]
    if mode == "onefile":  # whatever its name on the build host: the unit runs this one
        return [*ops, Op("file", f"{AGENT_SLOT}/dpanel-tunnel", src=agent, mode=0o755)]
    top = agent.parent
    for p in sorted(top.rglob("*")):
        dest = f"{AGENT_SLOT}/{p.relative_to(top)}"
        if p.is_symlink():
            ops.append(Op("symlink", dest, target=os.readlink(p)))
        elif p.is_dir():
            ops.append(Op("dir", dest, mode=0o755))
        else:
            ops.append(Op("file", dest, src=p, mode=0o755 if os.access(p, os.X_OK) else 0o644))
    return ops


def _overlay_ops(overlay: Path, root: Ext4) -> list[Op]:
    """An overlay folder copied into the root (files root:root, 0755 if executable, else
    0644); a unit with an [Install] section is enabled as ``systemctl enable`` would."""
    ops = []
    for p in sorted(overlay.rglob("*")):
        if p.name == ".gitkeep":
            continue
        dest = "/" + str(p.relative_to(overlay))
        if p.is_dir():
            ops.append(Op("dir", dest, mode=0o755, set_attrs=dest in OWNED_DIRS))
            continue
        ops.append(Op("file", dest, src=p, mode=0o755 if os.access(p, os.X_OK) else 0o644))
        if dest.startswith("/etc/systemd/system/") and p.suffix in (".service", ".timer",
                                                                      ".socket", ".path"):
            ops += unit_links(p.name, dest, p.read_text(), root.cat, str(p))
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


# ------------------------------------------------------------------------------ 4. post-build

def post_build(job: Job, root: Ext4) -> None:
    """The board's ``post-build`` edits (enable a unit, mask, rm, symlink), rootless."""
    if job.board.post_build is None:
        return
    ops = post_build_ops(parse_post_build(job.board.post_build), root.cat)
    ops = [o for o in ops if o.kind != "rm" or root.exists(o.path)]
    if ops:
        log(f"post-build: {len(ops)} edit(s) from {job.board.post_build}")
        root.apply(_dirs_first(ops))


# ------------------------------------------------------------------------------ 5. verify

def verify(job: Job, img: Path, parts: list[Part], root: Ext4) -> None:
    """The edited image is sound: e2fsck-clean root, readable FAT, a config the agent
    accepts, and our files where the agent and provision look for them."""
    from dpanel_agent.config import ConfigError, parse_config

    if job.board.token_role == "boot":
        # FAT holds nothing of ours until provisioning, but must be readable by mtools.
        Fat(img, parts[job.board.index("boot")]).names()
    run(["e2fsck", "-fn", f"{img}?offset={root.part.start}"],
        "e2fsck of the root file system after editing")
    conf = root.cat(AGENT_CONFIG)
    try:
        parse_config((conf or b"").decode(), AGENT_CONFIG)
    except (ConfigError, UnicodeDecodeError) as e:
        raise ImageError(f"the image's {AGENT_CONFIG} is refused by the agent: {e}") from None
    if not root.exists(f"{AGENT_SLOT}/dpanel-tunnel") or not root.exists(AGENT_BIN):
        raise ImageError(f"{AGENT_SLOT}/dpanel-tunnel or {AGENT_BIN} is missing from the "
                         "image after injection")


# ------------------------------------------------------------------------------ 6. outputs

def outputs(job: Job, img: Path, parts: list[Part], staging: AtomicDir) -> list[str]:
    """Write .bmap, compressed copy and .sha256 next to the image (still in staging)."""
    name = img.name
    bounds = [b for p in parts for b in (p.start, p.end)]
    bm = bmapmod.make_bmap(img, bounds)
    bmap_name = f"{name[:-4]}.bmap"
    bmapmod.write_bmap(bm, staging.path(bmap_name))
    result = [name, bmap_name]
    sums = [f"{sha256_file(img)}  {name}"]
    if job.compression != "none":
        cname = f"{name}.{job.compression}"
        compress(img, job.compression, staging.path(cname))
        result.append(cname)
        sums.append(f"{sha256_file(staging.path(cname))}  {cname}")
    staging.path(f"{name}.sha256").write_text("\n".join(sums) + "\n")
    result.append(f"{name}.sha256")
    return result


# ------------------------------------------------------------------------------ provision's view

def find_root(img: Path, what: str = "--image") -> tuple[list[Part], Ext4]:
    """The ext4 partition that carries /etc/dpanel/image.toml (a dPanel image's root)."""
    parts = read_table(img, f"{what} {img}")
    for p in parts:
        if ext4_magic_ok(img, p):
            e = Ext4(img, p)
            if e.exists(IMAGE_INFO):
                return parts, e
    raise ImageError(f"{what}: {img} is not a dPanel image (no {IMAGE_INFO}); "
                     "run invoke build-image first")


def read_image_info(root: Ext4) -> dict[str, str]:
    data = root.cat(IMAGE_INFO) or b""
    try:
        info = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise ImageError(f"{root.img}: {IMAGE_INFO} is damaged") from None
    return {k: str(v) for k, v in info.items()}

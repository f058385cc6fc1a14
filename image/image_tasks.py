"""invoke tasks for freezing the agent and building/provisioning images.

Outside the dpanel_image package on purpose: invoke is a dev-only dependency, and the
package is shipped (the server .deb); tasks.py puts image/ on sys.path to import this.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, cast

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from dpanel_image.errors import ImageError

__all__ = ["agent_ns", "image_ns"]

F = TypeVar("F", bound=Callable[..., Any])


def _clear_errors(fn: F) -> F:
    """Bad input ends with one clear line and exit 1, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImageError as e:
            raise Exit(f"error: {e}", code=1) from None
    return cast(F, wrapper)


def _mode(mode: str) -> Any:
    if mode not in ("onefile", "onedir"):
        raise ImageError(f"--mode: {mode!r} is not onefile or onedir")
    return mode


@task(help={"arch": "arm64, armhf or amd64 (repeat for several); default arm64",
            "mode": "onefile (one binary, default) or onedir (a folder; starts faster)",
            "dist": "output directory (default: dist/)",
            "version": "stamp this agent version (default: the sources')",
            "update_key": "also write a signed update bundle (of the --mode layout: onedir "
                          "is what images run), signed with this Ed25519 key (the "
                          "manager's STATE_DIR/update_key)"},
      iterable=["arch"])
@_clear_errors
def build(c: Context, arch: Optional[list[str]] = None, mode: str = "onefile",
          dist: str = "", version: str = "", update_key: str = "") -> None:
    """Freeze dpanel-tunnel with PyInstaller for ARM (under qemu-user), cached."""
    from dpanel_image.arches import parse_arch
    from dpanel_image.freeze import build_agent

    for a in arch or ["arm64"]:
        r = build_agent(parse_arch(a), _mode(mode), Path(dist) if dist else None,
                        version=version or None)
        size = r.path.stat().st_size
        print(f"{r.path}  {a} {mode} {size / 1e6:.1f} MB  "
              f"{'cached' if r.cached else 'built'} in {r.seconds:.1f} s")
        if update_key:
            print(_bundle(r, version, Path(update_key)))


def _bundle(r: Any, version: str, key_path: Path) -> str:
    """``dist/<arch>/update/<version>/``: the payload + its signed manifest."""
    from dpanel_image.freeze import bundle_agent
    from dpanel_proto.update import read_bundle

    out = bundle_agent(r, key_path, version or None)
    m = read_bundle(out)[0]
    return (f"{out}  (bundle: {m.version} {m.arch} {m.layout} {m.size} bytes, "
            f"sha256 {m.sha256})")


@task(name="build", help={
    "board": "rpi, orangepi or qemu-arm64 (dpanel_image/boards/<name>/), or a board folder",
    "base": "vendor image (.img, .img.xz, .img.zst, .img.gz); qemu-arm64 builds its own",
    "out": "output directory (default out/)",
    "arch": "target architecture (default: the board's first)",
    "agent": "use this frozen agent (onefile binary, or the executable of a onedir)",
    "mode": "agent layout: onedir (default: starts faster) or onefile",
    "compress": "zst (default), xz or none",
    "tunnel_host_key": "tunnel server public key file, copied to /etc/dpanel/pins/",
    "manager_key": "manager public key file, copied to /etc/dpanel/pins/",
    "user_ca": "manager's SSH user CA public key (STATE_DIR/user_ca.pub), copied to "
               "/etc/dpanel/pins/",
    "update_key": "the agent update key (the manager's STATE_DIR/update_key.pub), copied "
                  "to /etc/dpanel/pins/"})
@_clear_errors
def build_image_task(c: Context, board: str = "rpi", base: str = "", out: str = "out",
                     arch: str = "", agent: str = "", mode: str = "onedir",
                     compress: str = "zst", tunnel_host_key: str = "",
                     manager_key: str = "", user_ca: str = "", update_key: str = "") -> None:
    """Bake the agent into an SD image, rootless: outputs .img, .zst/.xz, .sha256, .bmap."""
    from dpanel_image.build import build_image

    if compress not in ("zst", "xz", "none"):
        raise ImageError(f"--compress: {compress!r} is not zst, xz or none")
    r = build_image(board, Path(out), base=Path(base) if base else None, arch=arch or None,
                    agent=Path(agent) if agent else None, mode=_mode(mode),
                    compression=compress,  # type: ignore[arg-type]
                    tunnel_host_key=Path(tunnel_host_key) if tunnel_host_key else None,
                    manager_key=Path(manager_key) if manager_key else None,
                    user_ca=Path(user_ca) if user_ca else None,
                    update_key=Path(update_key) if update_key else None)
    for p in (r.image, r.compressed, r.bmap, r.sha256):
        if p is not None:
            print(p)


@task(help={"image": "a dPanel image from build-image",
            "device": "device name to enrol with the manager (dpanel device add)",
            "token": "use this token instead of enrolling",
            "out": "write per-device images into this directory (image unchanged)",
            "to": "write the card /dev/sdX directly (removable, unmounted disks only)",
            "count": "bulk: provision N devices named PREFIX01..",
            "prefix": "bulk: device name prefix, e.g. site-a-",
            "yes": "do not ask before writing a card"})
@_clear_errors
def provision(c: Context, image: str, device: str = "", token: str = "", out: str = "",
              to: str = "", count: int = 0, prefix: str = "", yes: bool = False) -> None:
    """Give an image its device token (enrolled via the manager, or --token)."""
    from dpanel_image.provision import provision as do

    res = do(Path(image), device=device or None, token=token or None,
             out=Path(out) if out else None, to=to or None, count=count, prefix=prefix,
             yes=yes)
    for r in res:
        print(f"{r.device}\t{r.image}\t{r.seconds:.2f} s")


@task(name="boot-qemu", help={"image": "a qemu-arm64 image (default out/dpanel-qemu-arm64.img)",
                              "log": "write the serial console here instead of the terminal",
                              "persist": "write guest changes into the image (no -snapshot)"})
@_clear_errors
def boot_qemu(c: Context, image: str = "out/dpanel-qemu-arm64.img", log: str = "",
              persist: bool = False) -> None:
    """Boot an image under qemu as its board says (user networking, host = 10.0.2.2)."""
    from dpanel_image.qemu import QemuVM

    vm = QemuVM(Path(image), Path(log or os.devnull), snapshot=not persist)
    try:
        argv = vm.argv(serial=log or "stdio")
        print(shlex.join(argv), flush=True)
        subprocess.run(argv, check=False)
    finally:
        vm.stop()


@task(help={"board": "board whose layout to copy", "arch": "architecture of the fake root",
            "out": "where to put the image", "xz": "also write .img.xz",
            "boot_mib": "size of the boot partition (default 64)",
            "root_mib": "size of the root partition (default 192)"})
@_clear_errors
def synthetic(c: Context, board: str = "rpi", arch: str = "", out: str = "out",
              xz: bool = False, boot_mib: int = 64, root_mib: int = 192) -> None:
    """Make a small synthetic base image with a board's partition layout (for trying out)."""
    from dpanel_image.arches import parse_arch
    from dpanel_image.board import load_board
    from dpanel_image.synthetic import synthetic_base
    from dpanel_image.util import make_out_dir

    b = load_board(board)
    src = synthetic_base(b, parse_arch(arch) if arch else b.default_arch, compressed=xz,
                         boot_mib=boot_mib, root_mib=root_mib)
    make_out_dir(Path(out), "--out")
    dest = Path(out) / f"synthetic-{b.name}{'.img.xz' if xz else '.img'}"
    shutil.copyfile(src, dest)
    print(dest)


@task(name="bench")
def bench_task(c: Context) -> None:
    """Time build-agent (cold/cached), build-image, provision; binary size, start-up."""
    # The benchmark lives with the others in tests/bench (it is not product code).
    c.run(f"{shlex.quote(sys.executable)} -m tests.bench.image", pty=False)


agent_ns = Collection("agent")
agent_ns.add_task(build)
image_ns = Collection("image")
image_ns.add_task(build_image_task, name="build")
image_ns.add_task(provision)
image_ns.add_task(boot_qemu, name="boot-qemu")
image_ns.add_task(synthetic)
image_ns.add_task(bench_task, name="bench")

"""Debian roots built with mmdebstrap (any architecture, via qemu-user), cached by inputs."""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .arches import Arch
from .binfmt import ensure_binfmt
from .errors import ImageError
from .util import cache_root, hash_text, log, need_tool, run

__all__ = ["MIRROR", "RootSpec", "chroot_run", "debian_root", "locked", "prune_siblings"]

MIRROR = "http://deb.debian.org/debian"
#: The host's CA bundle (it may hold a TLS-intercepting proxy's CA that the
#: root's own ca-certificates lacks); bind-mounted for pip inside the chroot.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class RootSpec:
    """What goes into a root; its hash names the cache directory."""

    name: str
    suite: str
    arch: Arch
    packages: tuple[str, ...]
    variant: str = "apt"
    #: shell run by mmdebstrap before packages are installed, "$1" is the root
    essential_hooks: tuple[str, ...] = ()
    #: anything else the setup step depends on (its script, a lock file, ...)
    extra_key: str = ""
    components: tuple[str, ...] = field(default=("main",))

    def key(self) -> str:
        return hash_text(self.name, self.suite, self.arch, self.variant, *self.packages,
                         *self.essential_hooks, self.extra_key, *self.components)

    def path(self) -> Path:
        return cache_root() / f"root-{self.name}-{self.suite}-{self.arch}-{self.key()}"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise builders of one cache entry (two test workers, two shells)."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(f"{what} needs root (chroot into a Debian root); "
                         "image editing itself does not")


def debian_root(spec: RootSpec, setup: Optional[Callable[[Path], None]] = None) -> Path:
    """Return a cached root for ``spec``, building it (then ``setup``) when missing.

    The root is built in ``<path>.tmp`` and renamed when complete, so an interrupted
    build is never mistaken for a cached one.
    """
    dest = spec.path()
    done = dest.with_name(dest.name + ".ok")  # outside the root: mke2fs -d copies it all
    if done.exists():
        return dest
    _require_root(f"building the {spec.arch} {spec.suite} root")
    need_tool("mmdebstrap", "mmdebstrap")
    ensure_binfmt(spec.arch)
    with locked(dest):
        if done.exists():
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        cmd = ["mmdebstrap", "--mode=root", f"--variant={spec.variant}", f"--arch={spec.arch}",
               f"--components={','.join(spec.components)}",
               f"--include={','.join(spec.packages)}"]
        cmd += [f"--essential-hook={h}" for h in spec.essential_hooks]
        cmd += [spec.suite, str(tmp), MIRROR]
        log(f"mmdebstrap {spec.suite}/{spec.arch} ({spec.name}): {len(spec.packages)} packages")
        try:
            run(cmd, f"mmdebstrap {spec.suite} {spec.arch}")
            if setup is not None:
                setup(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        done.write_text(spec.key())
        log(f"root {dest.name} built in {time.monotonic() - t0:.0f} s")
    prune_siblings(dest, f"root-{spec.name}-{spec.suite}-{spec.arch}-")
    return dest


def prune_siblings(keep: Path, prefix: str) -> None:
    """Drop older cache entries with the same prefix (a root is ~0.5 GB)."""
    for p in keep.parent.glob(prefix + "*"):
        if p == keep or p.name.startswith(keep.name):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif not p.name.endswith(".lock"):
            p.unlink(missing_ok=True)


def _root_arch(root: Path) -> Arch:
    """Architecture of a Debian root, from dpkg's own record."""
    from .arches import parse_arch

    arch_file = root / "var" / "lib" / "dpkg" / "arch"
    if arch_file.exists():
        lines = arch_file.read_text().split()
        if lines:
            return parse_arch(lines[0], f"{arch_file}")
    raise ImageError(f"{root}: not a Debian root (no {arch_file})")


def chroot_run(root: Path, argv: Sequence[str], what: str,
               env: Optional[Mapping[str, str]] = None) -> str:
    """Run ``argv`` chrooted in ``root`` with /proc, /sys, /dev and DNS available.

    The mounts live in a private mount namespace (unshare -m), so they vanish with the
    process, even if it is killed: nothing stays mounted on the build host.
    """
    _require_root(what)
    ensure_binfmt(_root_arch(root))
    r = shlex.quote(str(root))
    (root / "etc" / "resolv.conf").unlink(missing_ok=True)
    (root / "etc" / "resolv.conf").touch()
    (root / "etc" / "dpanel-host-ca.crt").touch()
    binds = (f"mount -t proc proc {r}/proc && mount --rbind /sys {r}/sys && "
             f"mount --rbind /dev {r}/dev && "
             f"mount --bind /etc/resolv.conf {r}/etc/resolv.conf && "
             f"mount --bind {shlex.quote(str(HOST_CA))} {r}/etc/dpanel-host-ca.crt")
    envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root", "LANG": "C.UTF-8", "PIP_CERT": "/etc/dpanel-host-ca.crt",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})}.items())
    inner = f"exec chroot {r} /usr/bin/env -i {envs} {shlex.join(argv)}"
    proc = run(["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c",
                f"{binds} && {inner}"], what)
    return proc.stdout.decode(errors="replace")

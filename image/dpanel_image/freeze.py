"""Freeze the agent with PyInstaller inside a bullseye root of the target architecture.

PyInstaller cannot cross-compile, and libc is only forward compatible, so the freeze runs
under qemu-user in the oldest Debian we support (bullseye, glibc 2.31): the binary then
runs on bullseye and bookworm devices alike.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from .arches import Arch, arch_info, host_arch
from .binfmt import ensure_binfmt
from .debroot import RootSpec, chroot_run, debian_root, locked
from .elf import elf_arch_of_file
from .errors import ImageError
from .util import cache_root, hash_paths, hash_text, log, need_tool, run

__all__ = ["FreezeMode", "FreezeResult", "build_agent", "build_root_spec", "bundle_agent",
           "run_frozen"]

FreezeMode = Literal["onefile", "onedir"]
SUITE = "bullseye"
LOCK = Path(__file__).with_name("freeze-lock.txt")
#: What is frozen: the agent and the protocol package it stands on.
SOURCES = ("dpanel_agent", "dpanel_proto")
#: Bump when the freeze recipe below changes, so cached binaries are rebuilt.
RECIPE = "3"
BASE_PACKAGES = ("python3", "python3-venv", "libpython3.9", "binutils", "file",
                 "ca-certificates")
#: No wheels on PyPI for armv7 cffi and pyinstaller: pip builds them (bootloader too).
BUILD_PACKAGES = ("gcc", "libc6-dev", "zlib1g-dev", "python3-dev", "libffi-dev")
#: PyInstaller follows static imports; these are imported lazily by asyncssh/paho.
HIDDEN_IMPORTS = (
    "asyncssh.crypto", "asyncssh.crypto.ed", "asyncssh.crypto.ec", "asyncssh.crypto.rsa",
    "asyncssh.crypto.cipher", "asyncssh.crypto.kdf", "asyncssh.crypto.x509",
    "cryptography.hazmat.primitives.asymmetric.ed25519",
    "cryptography.hazmat.primitives.kdf.pbkdf2",
)


def build_root_spec(arch: Arch) -> RootSpec:
    pkgs = BASE_PACKAGES + (BUILD_PACKAGES if arch == "armhf" else ())
    return RootSpec(name="freeze", suite=SUITE, arch=arch, packages=pkgs,
                    extra_key=hash_text(LOCK.read_text(), _SETUP))


_SETUP = ("python3 -m venv /opt/freeze && /opt/freeze/bin/pip install -q --no-cache-dir "
          "pip==24.3.1 && /opt/freeze/bin/pip install -q --no-cache-dir -r /tmp/freeze-lock.txt")


def _setup_root(root: Path) -> None:
    shutil.copy(LOCK, root / "tmp" / "freeze-lock.txt")
    t0 = time.monotonic()
    chroot_run(root, ["sh", "-ec", _SETUP], "pip install of the freeze lock in the build root")
    log(f"pip install in the build root took {time.monotonic() - t0:.0f} s")


@dataclass(frozen=True)
class FreezeResult:
    arch: Arch
    mode: FreezeMode
    path: Path  # the executable (onefile) or the executable inside the onedir folder
    cached: bool
    seconds: float
    root: Path


def _output_path(dist: Path, arch: Arch, mode: FreezeMode) -> Path:
    if mode == "onefile":
        return dist / arch / "dpanel-tunnel"
    return dist / arch / "dpanel-tunnel.d" / "dpanel-tunnel"


def source_dirs() -> list[Path]:
    """Where the agent's packages are on this machine: the checkout's agent/ or, from an
    installed dpanel_image (the server .deb), the installed copies beside it."""
    import importlib.util

    dirs = []
    for name in SOURCES:
        spec = importlib.util.find_spec(name)
        locs = list(spec.submodule_search_locations or []) if spec else []
        if not locs or not (Path(locs[0]) / "__init__.py").is_file():
            raise ImageError(f"build-agent: the {name} package (its .py sources) is not "
                             "installed here; run it from a checkout (python3 tasks.py "
                             "build-agent) or install dpanel-edge")
        dirs.append(Path(locs[0]))
    return dirs


def agent_key(arch: Arch, mode: FreezeMode, version: Optional[str] = None) -> str:
    srcs = source_dirs()
    extra = (f"version={version}",) if version else ()
    return hash_text(build_root_spec(arch).key(), mode, RECIPE, *HIDDEN_IMPORTS,
                     hash_paths(srcs, srcs[0].parent), *extra)


def build_agent(arch: Arch, mode: FreezeMode = "onefile", dist: Optional[Path] = None,
                verify: bool = True, version: Optional[str] = None) -> FreezeResult:
    """Freeze ``dpanel_agent`` for ``arch``; cached by sources + lock + recipe.

    ``dist`` defaults to ./dist (the tasks run from the checkout's top). ``version``
    stamps another ``__version__`` into the frozen copy (a release, or the update tests'
    "newer" agent) and is part of the cache key.
    """
    t0 = time.monotonic()
    if version is not None and not re.fullmatch(r"[A-Za-z0-9._+~:-]{1,64}", version):
        raise ImageError(f"--version: {version!r}: 1-64 letters, digits and . _ + ~ : -")
    agent_src = source_dirs()[0]
    if not (agent_src / "__main__.py").exists():
        raise ImageError(f"agent entry point {agent_src / '__main__.py'} is missing")
    dist = dist or Path.cwd() / "dist"
    if verify:
        ensure_binfmt(arch)  # a cached binary is still run under qemu-user to check it
    spec = build_root_spec(arch)
    tag = f"{version}-" if version else ""
    cache = cache_root() / f"agent-{arch}-{mode}-{tag}{agent_key(arch, mode, version)}"
    cached = (cache / ".dpanel-complete").exists()
    root = spec.path()
    if not cached:
        root = debian_root(spec, _setup_root)
        with locked(root):
            _freeze(root, arch, mode, cache, version)
        _prune(arch, mode, keep=6)  # room for versioned builds (update tests)
    out = _output_path(dist, arch, mode)
    _publish(cache / "dpanel-tunnel", out.parent if mode == "onedir" else out)
    if verify:
        check_binary(out, arch, root)
    return FreezeResult(arch, mode, out, cached, time.monotonic() - t0, root)


def bundle_agent(r: FreezeResult, key_path: Path, version: Optional[str] = None) -> Path:
    """``dist/<arch>/update/<version>/``: the signed update bundle of a frozen agent.

    onefile: the binary + manifest; onedir (the images' layout): a plain tar of the
    folder + a manifest with ``layout = "onedir"`` (size and hash are the tar's), which
    the agent unpacks into its inactive slot (dpanel_agent/untar.py).
    """
    import asyncssh

    from dpanel_proto import __version__
    from dpanel_proto.update import write_bundle
    from dpanel_proto.wire import DecodeError

    try:
        key = asyncssh.read_private_key(str(key_path))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ImageError(f"--update-key: {key_path}: {exc}") from None
    v = version or __version__
    top = r.path.parent if r.mode == "onefile" else r.path.parent.parent
    out = top / "update" / v
    # one layout per bundle folder: a payload of the other layout would be stale
    shutil.rmtree(out, ignore_errors=True)
    try:
        write_bundle(out, r.path, v, r.arch, key, layout=r.mode)
    except DecodeError as exc:
        raise ImageError(f"--update-key: {exc}") from None
    return out


def _freeze(root: Path, arch: Arch, mode: FreezeMode, cache: Path,
            version: Optional[str] = None) -> None:
    build = root / "build"
    shutil.rmtree(build, ignore_errors=True)
    (build / "src").mkdir(parents=True)
    for src in source_dirs():
        shutil.copytree(src, build / "src" / src.name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if version:
        init = build / "src" / "dpanel_proto" / "__init__.py"
        text, n = re.subn(r'^__version__ = ".*"$', f'__version__ = "{version}"',
                          init.read_text(), flags=re.M)
        if n != 1:
            raise ImageError(f"{init}: no __version__ line to stamp {version!r} into")
        init.write_text(text)
    argv = ["/opt/freeze/bin/pyinstaller", "--noconfirm", "--clean", "--log-level=WARN",
            f"--{mode}", "--name", "dpanel-tunnel", "--paths", "/build/src",
            "--collect-submodules", "dpanel_agent",
            "--collect-submodules", "dpanel_proto", "--distpath", "/build/dist",
            "--workpath", "/build/work", "--specpath", "/build", "--strip"]
    for mod in HIDDEN_IMPORTS:
        argv += ["--hidden-import", mod]
    argv.append("/build/src/dpanel_agent/__main__.py")
    t0 = time.monotonic()
    how = "natively" if host_arch() == arch else "under qemu-user"
    log(f"freezing the agent for {arch} ({mode}) {how}")
    chroot_run(root, argv, f"PyInstaller freeze for {arch}")
    log(f"freeze took {time.monotonic() - t0:.0f} s")
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.move(str(build / "dist" / "dpanel-tunnel"), tmp / "dpanel-tunnel")
    (tmp / ".dpanel-complete").touch()
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    shutil.rmtree(build, ignore_errors=True)


def _prune(arch: Arch, mode: FreezeMode, keep: int) -> None:
    """Keep the newest ``keep`` frozen agents per arch/mode (each is ~11 MB)."""
    entries = sorted((p for p in cache_root().glob(f"agent-{arch}-{mode}-*")
                      if p.is_dir() and not p.name.endswith(".tmp")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _publish(src: Path, dest: Path) -> None:
    """Copy a cached build to dist/ atomically (tmp + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    if src.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, symlinks=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    else:
        shutil.copy2(src, tmp)
        os.replace(tmp, dest)


def run_frozen(binary: Path, arch: Arch, root: Path, args: list[str],
               timeout: float = 120) -> str:
    """Run a frozen binary on this host, under qemu-user when foreign.

    ``QEMU_LD_PREFIX`` (not ``qemu -L``) because the onefile bootloader re-executes
    itself and the child would lose ``-L``.
    """
    env = None if host_arch() == arch else {"QEMU_LD_PREFIX": str(root)}
    import subprocess

    try:
        proc = subprocess.run([str(binary), *args], capture_output=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ImageError(f"{binary} {' '.join(args)}: no answer in {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise ImageError(f"{binary} {' '.join(args)} failed (exit {proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def check_binary(path: Path, arch: Arch, root: Path) -> str:
    """`file` must name the right ELF machine and ``--version`` must run (qemu-user)."""
    need_tool("file", "file")
    desc = run(["file", "-b", path], f"file {path}").stdout.decode()
    want = arch_info(arch).file_word
    if want not in desc or elf_arch_of_file(path) != arch:
        raise ImageError(f"{path}: expected an {arch} ELF ({want}), file says: {desc.strip()}")
    if root.exists():
        out = run_frozen(path, arch, root, ["--version"])
        if "dpanel-tunnel" not in out:
            raise ImageError(f"{path} --version printed {out!r}")
        return out.strip()
    return ""

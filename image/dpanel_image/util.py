"""Small helpers: running tools with clear errors, hashing inputs, atomic outputs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

from .errors import ImageError

__all__ = [
    "AtomicDir", "cache_root", "hash_paths", "hash_text", "log", "make_out_dir", "need_tool",
    "package_dir", "run", "sha256_file",
]

StrPath = Union[str, Path]


def package_dir(*parts: str) -> Path:
    """A data folder shipped inside this package (boards, overlay), checkout or installed.

    Read through importlib.resources so that it is found wherever the package is
    installed; debugfs and mtools need real files, so a zipped install is refused.
    """
    from importlib.resources import files

    here = files("dpanel_image")
    if not isinstance(here, Path):
        raise ImageError(f"dpanel_image is installed as {here!r}: it needs to be unpacked "
                         "on disk (not zipped) to read its boards and overlay")
    return here.joinpath(*parts)


def make_out_dir(path: Path, what: str = "--out") -> Path:
    """Create an output directory; a read-only or unwritable place is one clear line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError(f"{what}: cannot create {path}: {e.strerror or e}") from None
    if not path.is_dir():
        raise ImageError(f"{what}: {path} is not a directory")
    if not os.access(path, os.W_OK):
        raise ImageError(f"{what}: {path} is not writable")
    return path


def log(msg: str) -> None:
    print(f"[dpanel-image] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``~/.cache/dpanel`` (or $DPANEL_CACHE): where slow artefacts are kept by input hash."""
    root = Path(os.environ.get("DPANEL_CACHE", Path.home() / ".cache" / "dpanel"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise ImageError(f"{name} not found: install the Debian package {package} "
                         f"(python3 tasks.py installs it)")
    return path


def run(cmd: Sequence[StrPath], what: str, *, env: Optional[Mapping[str, str]] = None,
        input: Optional[bytes] = None, capture: bool = True, check: bool = True,
        cwd: Optional[StrPath] = None) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; on failure raise ImageError with ``what`` and the tool's stderr tail."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run([str(c) for c in cmd], input=input, env=full_env, cwd=cwd,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise ImageError(f"{what}: {cmd[0]} not found ({e})") from None
    if check and proc.returncode != 0:
        err = (proc.stderr or b"").decode(errors="replace").strip()
        out = (proc.stdout or b"").decode(errors="replace").strip()
        tail = "\n".join((err or out).splitlines()[-15:])
        raise ImageError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def hash_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def hash_paths(paths: Sequence[Path], base: Path) -> str:
    """Hash the names and contents of files (dirs walked, caches skipped), sorted."""
    h = hashlib.sha256()
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        elif p.exists():
            files.append(p)
    for f in sorted(files):
        h.update(str(f.relative_to(base)).encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


class AtomicDir:
    """Stage outputs in a hidden temp dir beside ``dest``; publish them all at the end.

    On failure (or interrupt) the staging dir is removed, so a failed build leaves no
    half-written image in ``dest``. Publishing renames inside one file system
    (os.replace), so readers never see a partial file.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = make_out_dir(dest, "--out")
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=".dpanel-staging-", dir=self.dest))
        except OSError as e:
            raise ImageError(f"--out: {self.dest}: cannot write ({e.strerror})") from None

    def path(self, name: str) -> Path:
        return self.tmp / name

    def publish(self, names: Sequence[str]) -> list[Path]:
        out = []
        for n in names:
            os.replace(self.tmp / n, self.dest / n)
            out.append(self.dest / n)
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    @contextlib.contextmanager
    def staged(self) -> Iterator[AtomicDir]:
        try:
            yield self
        except OSError as e:
            # ENOSPC / EROFS / EACCES mid-build: say which directory, not a traceback.
            raise ImageError(f"writing into {self.dest} failed: {e.strerror or e}") from None
        finally:
            self.cleanup()

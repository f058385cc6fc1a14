"""Build the ``dpanel-server`` Debian package: a self-contained venv in /opt/dpanel + units.

Why a .deb holding a venv (the dh-virtualenv layout) and not a venv made on the server:
the server needs no compiler, no PyPI access and no pip run (an apt transaction pulls
only Debian's python3 and mosquitto), dpkg owns every file (clean upgrade, ``dpkg -L``,
``apt purge``), and the exact dependency versions that passed our tests are the ones
installed. The price: the package is built for one target, Debian 12 / Python 3.11,
on the architecture of the building machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

__all__ = [
    "BUILD_ID_PATH",
    "PACKAGE",
    "DebBuild",
    "build_deb",
    "deb_inputs_hash",
    "read_deb",
    "repo_root",
]

PACKAGE = "dpanel-server"
PREFIX = "/opt/dpanel"
#: Where the installed package records which build it is (deploy compares it).
BUILD_ID_PATH = f"{PREFIX}/BUILD-ID"
#: The target's interpreter: Debian 12 ships 3.11; wheels with C code are cp311.
TARGET_PYTHON = (3, 11)
#: Bump when the package layout changes, so cached packages are rebuilt.
LAYOUT_VERSION = "5"

#: Units installed into /lib/systemd/system (repo path -> package path).
UNITS = {
    "dpanel-tunnel.service": "lib/systemd/system/dpanel-tunnel.service",
    "dpanel-manager.service": "lib/systemd/system/dpanel-manager.service",
    "dpanel-edge.service": "lib/systemd/system/dpanel-edge.service",
    "dpanel-broker-reload.path": "lib/systemd/system/dpanel-broker-reload.path",
    "dpanel-broker-reload.service": "lib/systemd/system/dpanel-broker-reload.service",
    "mosquitto.service.d/dpanel.conf": "lib/systemd/system/mosquitto.service.d/dpanel.conf",
}

SYSUSERS = 'u dpanel - "dPanel Edge server" /var/lib/dpanel /usr/sbin/nologin\n'

POSTINST = """#!/bin/sh
# dpanel-server postinst: the system user and a daemon-reload. Keys, config and service
# starts are `dpanel-configure`'s job (run by `invoke deploy-server`), because they need
# the server's public name; until then the units are installed but not enabled.
set -e
if [ "$1" = configure ]; then
    systemd-sysusers dpanel.conf >/dev/null
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
exit 0
"""

PRERM = """#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now dpanel-manager.service dpanel-tunnel.service \\
        dpanel-edge.service dpanel-broker-reload.path >/dev/null 2>&1 || true
fi
exit 0
"""

POSTRM = """#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
if [ "$1" = purge ]; then
    # keys, registry and config are the operator's data: purge removes them only when
    # asked to, explicitly (apt purge dpanel-server)
    rm -rf /etc/dpanel /var/lib/dpanel /var/cache/dpanel
    # the listen drop-ins dpanel-configure wrote for public/privileged ports
    rm -f /etc/systemd/system/dpanel-manager.service.d/50-dpanel-listen.conf \
        /etc/systemd/system/dpanel-edge.service.d/50-dpanel-listen.conf
    rmdir /etc/systemd/system/dpanel-manager.service.d \
        /etc/systemd/system/dpanel-edge.service.d 2>/dev/null || true
fi
exit 0
"""

CONTROL = """Package: {package}
Version: {version}
Architecture: {arch}
Maintainer: dPanel Edge <dpanel@localhost>
Depends: python3 (>= 3.11~), python3 (<< 3.12), mosquitto (>= 2.0), systemd
Section: net
Priority: optional
Installed-Size: {size_kb}
Description: dPanel Edge server: SSH tunnel, manager and MQTT broker config
 Reach Raspberry Pi / Orange Pi devices behind NAT through on-demand SSH reverse
 tunnels. This package holds the tunnel and the manager (a Python venv in /opt/dpanel)
 and their hardened systemd units. Run dpanel-configure (or invoke deploy-server) to
 generate keys and configuration and start the services.
"""


@dataclass(frozen=True)
class DebBuild:
    path: Path
    version: str
    build_id: str


#: The source packages the .deb ships, protocol package first (the layers' order).
PACKAGE_DIRS = ("agent/dpanel_proto", "agent/dpanel_agent", "server/dpanel_server",
                "server/dpanel_deploy", "image/dpanel_image")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _source_files(root: Path) -> Iterable[Path]:
    """Everything that ends up in the package, in a stable order."""
    yield root / "pyproject.toml"
    for top in PACKAGE_DIRS:
        for p in sorted((root / top).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                yield p
    for rel in UNITS:
        yield root / "systemd" / rel
    readme = root / "README.md"
    if readme.exists():
        yield readme


def _pins(venv_python: str) -> str:
    """``name==version`` of the dev venv (minus our own project): the versions the test
    suite ran against are the ones the server gets."""
    out = subprocess.run([venv_python, "-m", "pip", "freeze", "--exclude-editable",
                          "--disable-pip-version-check"],
                         check=True, capture_output=True, text=True).stdout
    return "".join(line + "\n" for line in sorted(out.splitlines())
                   if "==" in line and not line.lower().startswith("dpanel"))


def _arch() -> str:
    out = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True)
    if out.returncode == 0:
        return out.stdout.strip()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def deb_inputs_hash(root: Path, pins: str, version_suffix: str = "") -> str:
    h = hashlib.sha256()
    h.update(f"layout={LAYOUT_VERSION};suffix={version_suffix};arch={_arch()}\n".encode())
    h.update(pins.encode())
    h.update(Path(__file__).read_bytes())
    for p in _source_files(root):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def _project_version(root: Path) -> str:
    import tomllib

    return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])


def _run(cmd: list[str]) -> None:
    """Quiet unless it fails (pip warns about every unreachable index it is configured
    with); on failure the output is in the error."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({res.returncode}):\n"
                           f"{(res.stdout + res.stderr)[-3000:]}")


def _copy_sources(root: Path, dest: Path) -> None:
    """A clean copy of the packages to build our wheel from (an in-tree build would leave
    build/ and egg-info in the working copy)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copy2(root / "pyproject.toml", dest / "pyproject.toml")
    for top in PACKAGE_DIRS:
        shutil.copytree(root / top, dest / top, ignore=ignore)


def _fix_venv_paths(venv: Path, stage_prefix: str) -> None:
    """The venv was made at ``stage_prefix`` but runs at /opt/dpanel: rewrite shebangs and
    activate scripts (what dh-virtualenv does)."""
    for p in (venv / "bin").iterdir():
        if p.is_symlink() or not p.is_file():
            continue
        data = p.read_bytes()
        if stage_prefix.encode() in data:
            p.write_bytes(data.replace(stage_prefix.encode(), PREFIX.encode()))
    cfg = venv / "pyvenv.cfg"
    cfg.write_text("".join(line + "\n" for line in cfg.read_text().splitlines()
                           if not line.startswith("command")))


def _installed_size_kb(tree: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(tree):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total // 1024 + 1


def _assemble(root: Path, pkg: Path, work: Path, pins: str, version: str, build_id: str,
              python: str) -> None:
    stage_venv = pkg / PREFIX.lstrip("/")
    wheel_src = work / "src"
    wheel_src.mkdir()
    _copy_sources(root, wheel_src)
    wheels = work / "wheels"
    _run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
          "-w", str(wheels), str(wheel_src)])
    wheel = next(wheels.glob("*.whl"))
    (work / "pins.txt").write_text(pins)
    # The venv uses the system python3 (Debian 12's 3.11 on the server).
    _run(["/usr/bin/python3", "-m", "venv", str(stage_venv)])
    _run([str(stage_venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
          "--disable-pip-version-check", "-c", str(work / "pins.txt"), f"{wheel}[server]"])
    _run([str(stage_venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y",
          "pip", "setuptools"])
    _fix_venv_paths(stage_venv, str(stage_venv))
    # Byte-code compiled here with the paths it will have on the server: the services run
    # with /opt read-only (ProtectSystem=strict), so Python could never cache it there.
    _run(["/usr/bin/python3", "-m", "compileall", "-q", "-j0", "--invalidation-mode",
          "unchecked-hash", "-s", str(pkg), "-p", "/", str(stage_venv / "lib")])
    (stage_venv / "BUILD-ID").write_text(build_id + "\n")
    doc = stage_venv / "share" / "doc"
    doc.mkdir(parents=True, exist_ok=True)
    if (root / "README.md").exists():
        shutil.copy2(root / "README.md", doc / "README.md")
    for rel, dest in UNITS.items():
        target = pkg / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / "systemd" / rel, target)
        target.chmod(0o644)
    sysusers = pkg / "usr/lib/sysusers.d/dpanel.conf"
    sysusers.parent.mkdir(parents=True)
    sysusers.write_text(SYSUSERS)
    bindir = pkg / "usr/bin"
    bindir.mkdir(parents=True)
    (bindir / "dpanel").symlink_to(f"{PREFIX}/bin/dpanel")
    configure = bindir / "dpanel-configure"
    configure.write_text(f"#!/bin/sh\nexec {PREFIX}/bin/python -m dpanel_deploy.configure"
                         ' "$@"\n')
    configure.chmod(0o755)
    debian = pkg / "DEBIAN"
    debian.mkdir()
    for name, text in (("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)):
        (debian / name).write_text(text)
        (debian / name).chmod(0o755)
    (debian / "control").write_text(CONTROL.format(
        package=PACKAGE, version=version, arch=_arch(), size_kb=_installed_size_kb(pkg)))


def _prune(root: Path, keep: Path, count: int = 4) -> None:
    """Every source edit makes a new package: keep only the newest few (~10 MB each)."""
    olds = sorted((p for p in root.glob("deb-*") if p.is_dir() and p != keep),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for p in olds[count - 1:]:
        shutil.rmtree(p, ignore_errors=True)


def build_deb(out_dir: Optional[Path] = None, *, version_suffix: str = "",
              cache_root: Optional[Path] = None, python: Optional[str] = None,
              log: bool = True) -> DebBuild:
    """Build (or take from the cache) the package; copy it into ``out_dir`` if given."""
    if sys.platform != "linux" or shutil.which("dpkg-deb") is None:
        raise RuntimeError("build-deb needs a Debian machine (dpkg-deb not found)")
    sysver = subprocess.run(["/usr/bin/python3", "-c",
                             "import sys; print(sys.version_info[0], sys.version_info[1])"],
                            capture_output=True, text=True, check=True).stdout.split()
    if tuple(int(x) for x in sysver) != TARGET_PYTHON:
        raise RuntimeError(
            f"build-deb must run on Debian 12 (python3 {TARGET_PYTHON[0]}.{TARGET_PYTHON[1]}), "
            f"the server's Python; this machine has {'.'.join(sysver)}")
    root = repo_root()
    python = python or sys.executable
    pins = _pins(python)
    build_id = deb_inputs_hash(root, pins, version_suffix)
    cache_root = cache_root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache = cache_root / "dpanel" / f"deb-{build_id[:16]}"
    meta = cache / "build.json"
    if meta.exists() and (cache / json.loads(meta.read_text())["file"]).exists():
        info = json.loads(meta.read_text())
        deb, version = cache / info["file"], info["version"]
        if log:
            print(f"build-deb: {deb.name} (cached)", flush=True)
    else:
        # The build time orders versions, so apt sees every newer build as an upgrade;
        # the hash names exactly what is inside.
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        version = f"{_project_version(root)}+{stamp}.{build_id[:12]}"
        if version_suffix:
            version += f".{version_suffix}"
        deb = cache / f"{PACKAGE}_{version}_{_arch()}.deb"
        if log:
            print(f"build-deb: building {deb.name}", flush=True)
        with tempfile.TemporaryDirectory(prefix="dpanel-deb-") as tmp:
            work = Path(tmp)
            pkg = work / "pkg"
            pkg.mkdir()
            _assemble(root, pkg, work, pins, version, build_id, python)
            cache.mkdir(parents=True, exist_ok=True)
            part = deb.with_suffix(".part")
            # zstd: dpkg >= 1.21.18 (Debian 12) reads it, and it unpacks ~10x faster
            # than xz on a small server
            _run(["dpkg-deb", "--root-owner-group", "-Zzstd", "-z9", "--build", str(pkg),
                  str(part)])
            os.replace(part, deb)
            tmp_meta = meta.with_suffix(".tmp")
            tmp_meta.write_text(json.dumps({"version": version, "build_id": build_id,
                                            "file": deb.name}))
            os.replace(tmp_meta, meta)
        _prune(cache.parent, keep=cache)
    result = deb
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result = out_dir / deb.name
        shutil.copy2(deb, result)
    return DebBuild(path=result, version=version, build_id=build_id)


def read_deb(path: Path) -> DebBuild:
    """Version and build id of a dpanel-server .deb made by :func:`build_deb`."""
    if not path.is_file():
        raise RuntimeError(f"--deb {path}: no such file")
    try:
        version = subprocess.run(["dpkg-deb", "-f", str(path), "Version"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], check=True,
                             capture_output=True).stdout
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"--deb {path}: not a Debian package ({exc.stderr!r})") from None
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        try:
            member = tf.extractfile("." + BUILD_ID_PATH)
        except KeyError:
            member = None
        if member is None:
            raise RuntimeError(f"--deb {path}: not a {PACKAGE} package (no {BUILD_ID_PATH})")
        return DebBuild(path=path, version=version, build_id=member.read().decode().strip())

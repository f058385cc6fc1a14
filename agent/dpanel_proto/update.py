"""Agent update bundles: the manifest (version, arch, size, sha256), its Ed25519
signature by the update key, and the checks a device makes before anything is swapped.

The update key is not the manager's request key: a bundle is signed once where it is
built (``build-agent --update-key``) and may be served by any manager, and a device
pins the update key separately (``<pins_dir>/update_key.pub``, baked by the image).
Signing takes an asyncssh-shaped key (as :mod:`.signing`); verification needs only
``cryptography``, through :class:`~.signing.ManagerKey`'s SSH-signature check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

from .signing import ManagerKey, SigningKey
from .util import atomic_write
from .wire import DecodeError

__all__ = [
    "ARCHES",
    "BINARY_NAME",
    "LAYOUTS",
    "MANIFEST_NAME",
    "TAR_NAME",
    "Manifest",
    "elf_arch",
    "file_sha256",
    "machine_arch",
    "read_bundle",
    "sign_manifest",
    "verify_manifest",
    "write_bundle",
]

ARCHES = ("amd64", "arm64", "armhf")
MANIFEST_NAME = "manifest.json"
BINARY_NAME = "dpanel-tunnel"
#: a onedir bundle's payload: the PyInstaller folder as a plain tar (see payload_name)
TAR_NAME = "dpanel-tunnel.tar"
#: "onefile": the payload is the binary; "onedir": a tar of the folder that holds it
LAYOUTS = ("onefile", "onedir")
#: a frozen agent is ~10-15 MB; anything far bigger is refused before it is fetched
MAX_SIZE = 256 << 20
_VERSION_RE = re.compile(r"^[A-Za-z0-9._+~:-]{1,64}\Z")
_SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")
#: ELF e_machine -> our arch names (EM_X86_64, EM_AARCH64, EM_ARM)
_ELF_MACHINES = {62: "amd64", 183: "arm64", 40: "armhf"}
_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
             "armv7l": "armhf", "armv6l": "armhf", "armhf": "armhf"}


@dataclass(frozen=True)
class Manifest:
    """What a bundle claims; every field is checked against the bytes fetched."""

    version: str
    arch: str
    size: int
    sha256: str
    #: "onedir": size and sha256 are those of the tar (the bytes fetched)
    layout: str = "onefile"

    def __post_init__(self) -> None:
        if not isinstance(self.version, str) or not _VERSION_RE.match(self.version):
            raise DecodeError("version: 1-64 letters, digits and . _ + ~ : - only")
        if self.arch not in ARCHES:
            raise DecodeError(f"arch: {self.arch!r} is not one of {', '.join(ARCHES)}")
        if (isinstance(self.size, bool) or not isinstance(self.size, int)
                or not 0 < self.size <= MAX_SIZE):
            raise DecodeError(f"size: {self.size!r} is not 1-{MAX_SIZE} bytes")
        if not isinstance(self.sha256, str) or not _SHA_RE.match(self.sha256):
            raise DecodeError("sha256: expected 64 lowercase hex characters")
        if self.layout not in LAYOUTS:
            raise DecodeError(f"layout: {self.layout!r} is not one of {', '.join(LAYOUTS)}")

    def signed_bytes(self) -> bytes:
        """What the update key signs: a domain tag, then the canonical JSON.

        ``layout`` is signed when it is not the default, so a onefile manifest signs
        exactly as before the field existed (old bundles and agents stay valid), and a
        onedir one cannot be passed off as a onefile or the other way round."""
        d = asdict(self)
        if self.layout == "onefile":
            del d["layout"]
        body = json.dumps(d, separators=(",", ":"), sort_keys=True)
        return b"dpanel-update-v1\0" + body.encode()

    @property
    def payload_name(self) -> str:
        """The file of the bundle that is fetched and hashed."""
        return BINARY_NAME if self.layout == "onefile" else TAR_NAME


def sign_manifest(m: Manifest, key: SigningKey) -> str:
    """The base64 SSH signature blob of ``m`` by the update key."""
    return base64.b64encode(key.sign(m.signed_bytes(), b"ssh-ed25519")).decode()


def verify_manifest(m: Manifest, sig: str, key: ManagerKey) -> bool:
    """True only if ``sig`` is the update key's signature of exactly this manifest."""
    try:
        blob = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        return False
    return key.verify(m.signed_bytes(), blob)


def elf_arch(head: bytes) -> Optional[str]:
    """The arch of an ELF file from its first 20 bytes, or None if not a known ELF."""
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    n = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(n)


def machine_arch() -> str:
    """This machine's arch in our names (``amd64``, ``arm64``, ``armhf``)."""
    m = platform.machine().lower()
    return _MACHINES.get(m, m)


def file_sha256(path: Path) -> Tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
            h.update(chunk)
    return n, h.hexdigest()


def write_bundle(out: Path, binary: Path, version: str, arch: str, key: SigningKey,
                 layout: str = "onefile") -> Manifest:
    """``out/dpanel-tunnel`` (or, for ``layout="onedir"``, ``out/dpanel-tunnel.tar``: a
    tar of ``binary``'s folder) + ``out/manifest.json`` (manifest and signature)."""
    if layout not in LAYOUTS:
        raise DecodeError(f"layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    out.mkdir(parents=True, exist_ok=True)
    name = BINARY_NAME if layout == "onefile" else TAR_NAME
    tmp = out / f".{name}.tmp{os.getpid()}"
    if layout == "onedir":
        write_tree_tar(binary.parent, tmp)
    else:
        with binary.open("rb") as src, tmp.open("wb") as dst:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                dst.write(chunk)
        tmp.chmod(0o755)
    size, digest = file_sha256(tmp)
    m = Manifest(version=version, arch=arch, size=size, sha256=digest, layout=layout)
    os.replace(tmp, out / name)
    doc = asdict(m)
    if layout == "onefile":
        del doc["layout"]  # as before the field existed
    doc["sig"] = sign_manifest(m, key)
    atomic_write(out / MANIFEST_NAME, json.dumps(doc, indent=1, sort_keys=True).encode(),
                 0o644)
    return m


def write_tree_tar(top: Path, dest: Path) -> None:
    """A plain (uncompressed) tar of the folder ``top``: directories and regular files
    only, named relative to it, owner root and modes 0755/0644, in sorted order (so the
    same tree gives the same bytes). A frozen onedir is already compressed (.pyz, .so),
    and a plain tar lets the device check it before it unpacks anything."""
    import tarfile

    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = 0
        ti.mode = 0o755 if ti.isdir() or ti.mode & 0o111 else 0o644
        return ti

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(top.rglob("*")):
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise DecodeError(f"{p}: only directories and regular files go in a bundle")
            tar.add(p, arcname=str(p.relative_to(top)), recursive=False, filter=clean)


def parse_manifest(doc: object) -> Tuple[Manifest, str]:
    if not isinstance(doc, dict):
        raise DecodeError("manifest: expected a JSON object")
    try:
        m = Manifest(version=doc.get("version"), arch=doc.get("arch"),  # type: ignore[arg-type]
                     size=doc.get("size"), sha256=doc.get("sha256"),  # type: ignore[arg-type]
                     layout=doc.get("layout", "onefile"))
    except TypeError as exc:
        raise DecodeError(f"manifest: {exc}") from None
    sig = doc.get("sig")
    if not isinstance(sig, str) or len(sig) > 256:
        raise DecodeError("sig: missing or not a string")
    return m, sig


def read_bundle(d: Path) -> Tuple[Manifest, str, Path]:
    """(manifest, signature, payload path) of a bundle directory; DecodeError names what
    is wrong. The payload (binary or tar) is not hashed here (the caller decides when)."""
    try:
        raw = (d / MANIFEST_NAME).read_bytes()
    except OSError as exc:
        raise DecodeError(f"bundle {d}: no {MANIFEST_NAME} ({exc.strerror})") from None
    if len(raw) > 8192:
        raise DecodeError(f"bundle {d}: {MANIFEST_NAME} is too big")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise DecodeError(f"bundle {d}: {MANIFEST_NAME} is not JSON ({exc})") from None
    m, sig = parse_manifest(doc)
    return m, sig, d / m.payload_name

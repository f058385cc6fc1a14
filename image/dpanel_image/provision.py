"""provision: give a built image its device token (in place, per-device copies, or a card).

The stages, in order: :func:`check_request` (the options), :func:`open_image` (a dPanel
image, its token place and baked pins), :func:`check_out`, :func:`resolve_tokens`
(enrol, check the pins), then one writer per device: :func:`write_in_place`,
:func:`write_copy` or :func:`write_card`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from dpanel_proto.token import DeviceToken, parse_token
from dpanel_proto.wire import DecodeError, validate_device_id

from . import bmap as bmapmod
from .build import PINS, PINS_DIR, find_root, read_image_info
from .cardwrite import check_target, confirm
from .disk import Ext4, Fat, Op, Part, fat_magic_ok
from .errors import ImageError
from .util import log, make_out_dir, need_tool, run, sha256_file

__all__ = ["SECRET_MODE", "Enrol", "Master", "Provisioned", "bulk_names", "check_pins",
           "dpanel_enrol", "fingerprint", "provision"]

#: Enrolment: device name -> token string. Default: the server CLI.
Enrol = Callable[[str], str]
#: Mode of every image that holds a token (the device's secret).
SECRET_MODE = 0o600


@dataclass(frozen=True)
class Provisioned:
    device: str
    image: Path  # the image that now carries the token (or the card written)
    seconds: float


def _dpanel_cli() -> list[str]:
    """The server CLI: on PATH, or beside this Python (the project venv)."""
    exe = shutil.which("dpanel") or str(Path(sys.executable).parent / "dpanel")
    if not Path(exe).exists():
        raise ImageError("cannot enrol: the dpanel CLI is not installed (pass --token)")
    return [exe]


def dpanel_enrol(name: str, dpanel: Optional[Sequence[str]] = None) -> str:
    """``dpanel device add NAME --print-token`` (server from $DPANEL_CONFIG or
    /etc/dpanel/server.toml); its error, e.g. a duplicate name, is relayed."""
    argv = list(dpanel) if dpanel else _dpanel_cli()
    proc = subprocess.run([*argv, "device", "add", name, "--print-token"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ImageError(f"enrolling {name} with the manager failed: "
                         f"{(proc.stderr or proc.stdout).strip()}")
    tokens = [w for w in proc.stdout.split() if w.startswith("dpt1.")]
    if len(tokens) != 1:
        raise ImageError(f"dpanel device add {name} printed no token")
    return tokens[0]


def bulk_names(prefix: str, count: int) -> list[str]:
    if count < 1:
        raise ImageError(f"--count must be at least 1, got {count}")
    width = max(2, len(str(count)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]


@dataclass(frozen=True)
class Master:
    """The built image being provisioned, as provision needs to know it."""

    path: Path
    parts: list[Part]
    root: Ext4
    info: dict[str, str]
    pins: dict[str, str]  # PINS file name -> the public key line baked into the image


def provision(image: Path, device: Optional[str] = None, token: Optional[str] = None,
              out: Optional[Path] = None, to: Optional[str] = None, count: int = 0,
              prefix: str = "", yes: bool = False, enrol: Enrol = dpanel_enrol,
              ask: Optional[Callable[[str], str]] = None) -> list[Provisioned]:
    """Provision one device (``device``/``token``) or ``count`` devices named ``prefix``NN.

    Without ``out`` or ``to`` the token goes into ``image`` itself. With ``out`` each
    device gets ``out/<image>-<device>.img`` (a sparse/reflink copy: only changed blocks
    are written) and its own .bmap. With ``to`` the image is written to a card.
    Every input is checked before anything is enrolled or written. An image that holds a
    token holds the device's secret: it is mode 0600.
    """
    names = check_request(image, device, token, out, to, count, prefix)
    master = open_image(image)
    target = check_target(to) if to else None
    if out is not None:
        check_out(out, master, names)
    if target is not None:
        confirm(f"Write {image.name} for {names[0] if names else 'the token device'} to "
                f"{target}? Everything on it is lost.", yes, ask)
    results = []
    for name, tok in resolve_tokens(master, names, token, enrol):
        t0 = time.monotonic()
        if target is not None:
            where = write_card(master, target, tok)
        elif out is not None:
            where = write_copy(master, out, name, tok)
        else:
            where = write_in_place(master, tok)
        results.append(Provisioned(name, where, time.monotonic() - t0))
        log(f"{name}: {where} ({results[-1].seconds:.2f} s)")
    return results


# ------------------------------------------------------------------------------ inputs

def check_request(image: Path, device: Optional[str], token: Optional[str],
                  out: Optional[Path], to: Optional[str], count: int, prefix: str) -> list[str]:
    """The options must make sense together; returns the device names asked for."""
    if not image.is_file():
        raise ImageError(f"--image: {image} does not exist")
    if count and (device or token):
        raise ImageError("--count/--prefix names the devices: do not also pass --device "
                         "or --token")
    if count and not (out or to):
        raise ImageError("--count needs --out DIR (one image per device)")
    if count and to:
        raise ImageError("--count and --to: one card holds one device")
    names = bulk_names(prefix, count) if count else ([device] if device else [])
    if not names and token is None:
        raise ImageError("give --device NAME (enrolled via the manager), --token, or "
                         "--count N --prefix P")
    for n in names:
        try:
            validate_device_id(n, "--device" if not count else "--prefix")
        except DecodeError as e:
            raise ImageError(str(e)) from None
    if len(set(names)) != len(names):
        raise ImageError(f"duplicate device name in {names}")
    return names


def open_image(image: Path) -> Master:
    parts, root = find_root(image)
    pins = {}
    for name in PINS:
        data = root.cat(f"{PINS_DIR}/{name}")
        if data is not None:
            pins[name] = data.decode(errors="replace").strip()
    return Master(image, parts, root, read_image_info(root), pins)


def _stem(master: Master) -> str:
    name = master.path.name
    return name[:-4] if name.endswith(".img") else name


def check_out(out: Path, master: Master, names: list[str]) -> None:
    make_out_dir(out, "--out")
    for n in names:
        dest = out / f"{_stem(master)}-{n}.img"
        if dest.exists():
            raise ImageError(f"device {n} already provisioned: {dest} exists "
                             "(duplicate device name? remove it first)")


def resolve_tokens(master: Master, names: list[str], token: Optional[str],
                   enrol: Enrol) -> list[tuple[str, str]]:
    """(device, token) pairs: the given token, or one enrolled per name; each must pin the
    keys the image was built with."""
    if token is not None:
        try:
            tok: DeviceToken = parse_token(token)
        except DecodeError as e:
            raise ImageError(f"--token: {e}") from None
        if names and names != [tok.device]:
            raise ImageError(f"--token is for device {tok.device!r}, not --device "
                             f"{names[0]!r}")
        check_pins(master, tok, "--token")
        return [(tok.device, token.strip())]
    out = []
    for n in names:
        t = enrol(n)
        try:
            parsed = parse_token(t)
        except DecodeError as e:
            raise ImageError(f"enrolment of {n} returned a bad token: {e}") from None
        if parsed.device != n:
            raise ImageError(f"enrolment of {n} returned a token for another device")
        check_pins(master, parsed, f"the token enrolled for {n} (enrolled, not written: "
                                   f"revoke it if unwanted)")
        out.append((n, t))
    return out


def _key(line: str) -> tuple[str, str]:
    f = line.split()
    return (f[0], f[1]) if len(f) >= 2 else (line, "")


def fingerprint(line: str) -> str:
    """``ssh-ed25519 SHA256:...`` as ssh-keygen -l shows it (the raw line if not base64)."""
    kind, blob = _key(line)
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return line
    return f"{kind} SHA256:{base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip('=')}"


def check_pins(master: Master, tok: DeviceToken, what: str) -> None:
    """A token must pin the keys baked into the image's /etc/dpanel/pins/: the agent
    enforces those, so a device with another server's token could never come up."""
    for name, option in PINS.items():
        baked = master.pins.get(name)
        if baked is None:
            continue
        field = name[:-len(".pub")]
        given: Optional[str] = getattr(tok, field, None)  # update_key: not in tokens
        if field == "user_ca" or given is None:
            continue  # the first user CA only: rotated later by signed request, not pinned
        if _key(given) != _key(baked):
            label = field.replace("_", " ")
            raise ImageError(
                f"{what} pins {label} {fingerprint(given)}, but {master.path} was built "
                f"with {option} {fingerprint(baked)} ({PINS_DIR}/{name}): use a token "
                "of the server the image was built for, or rebuild the image")


# ------------------------------------------------------------------------------ writing

def _write_token(img: Path, parts: list[Part], root: Ext4, info: dict[str, str],
                 token: str) -> Part:
    """Put the token where the agent imports it from; returns the partition changed."""
    path = info.get("token_path", "/dpanel-token.txt")
    data = (token + "\n").encode()
    if info.get("token_partition") == "boot":
        fat = next((p for p in parts if fat_magic_ok(img, p)), None)
        if fat is None:
            raise ImageError(f"{img}: no FAT boot partition for the token")
        Fat(img, fat).write(path, data)
        return fat
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        # A secret: root-only even before the agent moves it to /etc/dpanel/token.
        root.apply([Op("file", path, src=Path(f.name), mode=0o600)])
    return root.part


def write_in_place(master: Master, tok: str) -> Path:
    """The token into the built image itself (its .bmap and .sha256 refreshed)."""
    img = master.path
    os.chmod(img, SECRET_MODE)  # before the secret goes in
    changed = _write_token(img, master.parts, master.root, master.info, tok)
    _update_sidecars(img, changed, master.parts, _bmap_of(img), _bmap_of(img))
    _refresh_sha256(img)
    return img


def write_card(master: Master, target: Path, tok: str) -> Path:
    """Flash the master, then put the token on the card itself: no copy of the image."""
    _write_card(master.path, _bmap_of(master.path), target)
    _write_token(target, master.parts, Ext4(target, master.root.part), master.info, tok)
    run(["sync"], "sync")
    return target


def write_copy(master: Master, out: Path, name: str, tok: str) -> Path:
    """``out/<image>-<name>.img`` (0600) with its .bmap, published by rename."""
    final = out / f"{_stem(master)}-{name}.img"
    tmp = out / f".{final.name}.tmp{os.getpid()}"
    try:
        # Created 0600 before any byte is copied: it will hold the device's secret.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE))
        # Reflink where the file system can (btrfs, XFS): then only the token's blocks
        # are new. Elsewhere a sparse copy: only the image's data blocks are copied.
        run(["cp", "--reflink=auto", "--sparse=always", master.path, tmp],
            f"copying {master.path.name} for {name}")
        p2, r2 = find_root(tmp, f"the copy for {name}")
        changed = _write_token(tmp, p2, Ext4(tmp, r2.part), master.info, tok)
        _update_sidecars(tmp, changed, p2, _bmap_of(master.path), _bmap_of(final))
        if final.exists():
            raise ImageError(f"device {name} already provisioned: {final} exists")
        os.replace(tmp, final)
    except OSError as e:
        raise ImageError(f"writing the image for {name} into {out} failed: "
                         f"{e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _update_sidecars(img: Path, changed: Part, parts: list[Part], base_bmap: Optional[Path],
                     dest_bmap: Path) -> None:
    bounds = [b for p in parts for b in (p.start, p.end)]
    if base_bmap is not None and base_bmap.exists():
        old = bmapmod.read_bmap(base_bmap)
        new = bmapmod.update_bmap(old, img, changed.start, changed.end, bounds)
    else:
        new = bmapmod.make_bmap(img, bounds)
    tmp = dest_bmap.with_name(f".{dest_bmap.name}.tmp")
    bmapmod.write_bmap(new, tmp)
    os.replace(tmp, dest_bmap)


def _bmap_of(img: Path) -> Path:
    return img.with_suffix(".bmap")


def _refresh_sha256(img: Path) -> None:
    side = img.with_name(img.name + ".sha256")
    if not side.exists():
        return
    lines = [ln for ln in side.read_text().splitlines()
             if not re.search(rf"\s\*?{re.escape(img.name)}$", ln)]
    lines.insert(0, f"{sha256_file(img)}  {img.name}")
    tmp = side.with_name(f".{side.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, side)


def _write_card(img: Path, bmap: Path, device: Path) -> None:
    need_tool("bmaptool", "bmap-tools")
    log(f"writing {img.name} to {device} (bmaptool)")
    args = ["--bmap", str(bmap)] if bmap.exists() else ["--nobmap"]
    run(["bmaptool", "copy", *args, img, device], f"writing {device}")

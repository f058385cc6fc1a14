"""provision: give a built image its device token (in place, per-device copies, or a card)."""

from __future__ import annotations

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
from .build import find_root, read_image_info
from .cardwrite import check_target, confirm
from .disk import Ext4, Fat, Op, Part, fat_magic_ok
from .errors import ImageError
from .util import log, need_tool, run, sha256_file

__all__ = ["Enrol", "Provisioned", "bulk_names", "dpanel_enrol", "provision"]

#: Enrolment: device name -> token string. Default: the server CLI.
Enrol = Callable[[str], str]


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


def _token_target(img: Path) -> tuple[list[Part], Ext4, dict[str, str]]:
    parts, root = find_root(img)
    return parts, root, read_image_info(root)


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


def _resolve_tokens(names: list[str], token: Optional[str],
                    enrol: Enrol) -> list[tuple[str, str]]:
    if token is not None:
        try:
            tok: DeviceToken = parse_token(token)
        except DecodeError as e:
            raise ImageError(f"--token: {e}") from None
        if names and names != [tok.device]:
            raise ImageError(f"--token is for device {tok.device!r}, not --device "
                             f"{names[0]!r}")
        return [(tok.device, token.strip())]
    out = []
    for n in names:
        t = enrol(n)
        try:
            if parse_token(t).device != n:
                raise ImageError(f"enrolment of {n} returned a token for another device")
        except DecodeError as e:
            raise ImageError(f"enrolment of {n} returned a bad token: {e}") from None
        out.append((n, t))
    return out


def provision(image: Path, device: Optional[str] = None, token: Optional[str] = None,
              out: Optional[Path] = None, to: Optional[str] = None, count: int = 0,
              prefix: str = "", yes: bool = False, enrol: Enrol = dpanel_enrol,
              ask: Optional[Callable[[str], str]] = None) -> list[Provisioned]:
    """Provision one device (``device``/``token``) or ``count`` devices named ``prefix``NN.

    Without ``out`` or ``to`` the token goes into ``image`` itself. With ``out`` each
    device gets ``out/<image>-<device>.img`` (a sparse/reflink copy: only changed blocks
    are written) and its own .bmap. With ``to`` the image is written to a card.
    Every input is checked before anything is enrolled or written.
    """
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
    parts, root, info = _token_target(image)
    target = check_target(to) if to else None
    stem = image.name[:-4] if image.name.endswith(".img") else image.name
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise ImageError(f"--out: {out} is not writable")
        for n in names:
            dest = out / f"{stem}-{n}.img"
            if dest.exists():
                raise ImageError(f"device {n} already provisioned: {dest} exists "
                                 "(duplicate device name? remove it first)")
    if target is not None:
        confirm(f"Write {image.name} for {names[0] if names else 'the token device'} to "
                f"{target}? Everything on it is lost.", yes, ask)
    results = []
    for name, tok in _resolve_tokens(names, token, enrol):
        t0 = time.monotonic()
        if out is None and target is None:
            changed = _write_token(image, parts, root, info, tok)
            _update_sidecars(image, changed, parts, _bmap_of(image), _bmap_of(image))
            _refresh_sha256(image)
            results.append(Provisioned(name, image, time.monotonic() - t0))
            continue
        if target is not None:
            # Flash the master, then put the token on the card itself: no copy of the image.
            _write_card(image, _bmap_of(image), target)
            _write_token(target, parts, Ext4(target, root.part), info, tok)
            run(["sync"], "sync")
            results.append(Provisioned(name, target, time.monotonic() - t0))
            continue
        assert out is not None
        final = out / f"{stem}-{name}.img"
        tmp = out / f".{final.name}.tmp{os.getpid()}"
        try:
            # Reflink where the file system can (btrfs, XFS): then only the token's blocks
            # are new. Elsewhere a sparse copy: only the image's data blocks are copied.
            run(["cp", "--reflink=auto", "--sparse=always", image, tmp],
                f"copying {image.name} for {name}")
            p2, r2 = find_root(tmp)
            changed = _write_token(tmp, p2, Ext4(tmp, r2.part), info, tok)
            _update_sidecars(tmp, changed, p2, _bmap_of(image), _bmap_of(final))
            if final.exists():
                raise ImageError(f"device {name} already provisioned: {final} exists")
            os.replace(tmp, final)
        except OSError as e:
            raise ImageError(f"writing the image for {name} into {out} failed: "
                             f"{e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        results.append(Provisioned(name, final, time.monotonic() - t0))
        log(f"{name}: {final} ({results[-1].seconds:.2f} s)")
    return results


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

"""A board's ``post-build``: edits of the root file system after the overlays, as data.

Buildroot runs a post-build shell script as the build user against its target tree.
Here the root file system is never unpacked into a tree (debugfs edits it in place,
rootless), so a board's post-build is a short list of edits instead, one a line::

    # comment
    enable UNIT          what `systemctl enable` does: the links of the unit's [Install]
    mask UNIT            /etc/systemd/system/UNIT -> /dev/null
    rm PATH              remove a file (an absent one is fine)
    symlink PATH TARGET

``enable`` reads the unit from the image itself (``/etc/systemd/system``, then
``/usr/lib/systemd/system``, ``/lib/systemd/system``), so it works on a vendor image
and needs neither root nor a systemd on the build host.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .disk import Op
from .errors import ImageError

__all__ = ["UNIT_DIRS", "Step", "enable_ops", "find_unit", "parse_post_build", "post_build_ops",
           "unit_links"]

#: Where units are looked up, in systemd's order of precedence.
UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
ETC_UNITS = "/etc/systemd/system"
#: Reads a file of the image: its bytes, or None when it does not exist.
Reader = Callable[[str], Optional[bytes]]
ARITY = {"enable": 1, "mask": 1, "rm": 1, "symlink": 2}


@dataclass(frozen=True)
class Step:
    kind: str
    args: tuple[str, ...]
    where: str  # file:line, for errors


def _unit_name(name: str, where: str) -> str:
    if "/" in name or "." not in name:
        raise ImageError(f"{where}: {name!r} is not a unit name (e.g. foo.service)")
    if "@." in name:
        raise ImageError(f"{where}: template unit {name!r}: name an instance "
                         "(e.g. getty@tty1.service)")
    return name


def parse_post_build(path: Path) -> list[Step]:
    """Parse a post-build file; every error names the file and line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError(f"{path}: cannot read ({e})") from None
    steps = []
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{n}"
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ImageError(f"{where}: {e}") from None
        if not words:
            continue
        kind, args = words[0], tuple(words[1:])
        if kind not in ARITY:
            raise ImageError(f"{where}: unknown edit {kind!r} (use {', '.join(ARITY)})")
        if len(args) != ARITY[kind]:
            raise ImageError(f"{where}: {kind} takes {ARITY[kind]} argument(s), got {len(args)}")
        if kind in ("enable", "mask"):
            _unit_name(args[0], where)
        elif not args[0].startswith("/"):
            raise ImageError(f"{where}: {kind}: path {args[0]!r} must be absolute")
        steps.append(Step(kind, args, where))
    return steps


def _install_section(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Install" and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).extend(value.split())
    return out


def find_unit(name: str, read: Reader) -> Optional[tuple[str, bytes]]:
    """The unit's file (for an instance foo@x.service, its template foo@.service)."""
    names = [name]
    if "@" in name:
        prefix, _, rest = name.partition("@")
        names.append(f"{prefix}@.{rest.rsplit('.', 1)[-1]}")
    for n in names:
        for d in UNIT_DIRS:
            data = read(f"{d}/{n}")
            if data is not None:
                return f"{d}/{n}", data
    return None


def unit_links(name: str, unit_path: str, text: str, read: Reader, where: str,
               _seen: Optional[set[str]] = None) -> list[Op]:
    """The symlinks ``systemctl enable NAME`` makes, from the unit's [Install] section."""
    seen = _seen if _seen is not None else set()
    if name in seen:
        return []
    seen.add(name)
    install = _install_section(text)
    ops = []
    for key, suffix in (("WantedBy", ".wants"), ("RequiredBy", ".requires"),
                        ("UpheldBy", ".upholds")):
        for target in install.get(key, []):
            ops.append(Op("symlink", f"{ETC_UNITS}/{target}{suffix}/{name}", target=unit_path))
    for alias in install.get("Alias", []):
        ops.append(Op("symlink", f"{ETC_UNITS}/{_unit_name(alias, where)}", target=unit_path))
    for also in install.get("Also", []):
        ops += enable_ops(_unit_name(also, where), read, where, seen)
    return ops


def enable_ops(name: str, read: Reader, where: str,
               _seen: Optional[set[str]] = None) -> list[Op]:
    found = find_unit(name, read)
    if found is None:
        raise ImageError(f"{where}: enable {name}: no such unit in the image "
                         f"({', '.join(UNIT_DIRS)})")
    path, data = found
    return unit_links(name, path, data.decode(errors="replace"), read, where, _seen)


def post_build_ops(steps: list[Step], read: Reader) -> list[Op]:
    """Turn parsed steps into file-system edits (``read`` looks into the image)."""
    ops: list[Op] = []
    for s in steps:
        if s.kind == "enable":
            links = enable_ops(s.args[0], read, s.where)
            if not links:
                raise ImageError(f"{s.where}: {s.args[0]} has no [Install] section: "
                                 "nothing to enable")
            ops += links
        elif s.kind == "mask":
            ops.append(Op("symlink", f"{ETC_UNITS}/{s.args[0]}", target="/dev/null"))
        elif s.kind == "rm":
            ops.append(Op("rm", s.args[0]))
        else:
            ops.append(Op("symlink", s.args[0], target=s.args[1]))
    return ops

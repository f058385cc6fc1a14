"""Read just enough of an ELF header to tell which architecture a binary is for."""

from __future__ import annotations

import struct
from pathlib import Path

from .arches import ARCHES, Arch
from .errors import ImageError

__all__ = ["elf_arch", "elf_arch_of_file"]


def elf_arch(header: bytes, what: str) -> Arch:
    """Architecture of an ELF given its first 20+ bytes; ImageError naming ``what``."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise ImageError(f"{what}: not an ELF binary")
    elf_class, data = header[4], header[5]
    fmt = "<H" if data == 1 else ">H"
    (machine,) = struct.unpack_from(fmt, header, 18)
    for info in ARCHES.values():
        if info.elf_machine == machine and info.elf_class == elf_class:
            return info.name
    raise ImageError(f"{what}: ELF machine {machine} (class {elf_class}) is not a target "
                     f"architecture")


def elf_arch_of_file(path: Path) -> Arch:
    with open(path, "rb") as f:
        return elf_arch(f.read(64), str(path))

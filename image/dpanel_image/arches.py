"""Target architectures: Debian names, ELF machine ids, qemu-user names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast, get_args

from .errors import ImageError

__all__ = ["ARCHES", "Arch", "ArchInfo", "arch_info", "host_arch", "parse_arch"]

Arch = Literal["arm64", "armhf", "amd64"]


@dataclass(frozen=True)
class ArchInfo:
    """Everything the pipeline needs to know about one Debian architecture."""

    name: Arch
    elf_machine: int  # e_machine in the ELF header
    elf_class: int  # 1 = 32-bit, 2 = 64-bit
    qemu: str  # qemu-user / binfmt_misc name ("" for the host's own)
    uname: str  # what `uname -m` says on such a device
    file_word: str  # what file(1) prints for such an ELF


ARCHES: dict[Arch, ArchInfo] = {
    "arm64": ArchInfo("arm64", 183, 2, "aarch64", "aarch64", "ARM aarch64"),
    "armhf": ArchInfo("armhf", 40, 1, "arm", "armv7l", "ARM, EABI5"),
    "amd64": ArchInfo("amd64", 62, 2, "x86_64", "x86_64", "x86-64"),
}


def parse_arch(value: str, what: str = "--arch") -> Arch:
    """Validate an architecture name; the error lists the valid ones."""
    if value not in get_args(Arch):
        raise ImageError(f"{what}: unknown architecture {value!r} "
                         f"(choose from {', '.join(get_args(Arch))})")
    return cast(Arch, value)


def arch_info(arch: Arch) -> ArchInfo:
    return ARCHES[arch]


def host_arch() -> Arch | None:
    """The Debian architecture of this machine, if it is one we target."""
    import platform

    machine = platform.machine()
    for info in ARCHES.values():
        if info.uname == machine or (info.name == "arm64" and machine == "arm64"):
            return info.name
    return None

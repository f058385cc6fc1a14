"""boot-qemu: boot a dPanel image under qemu, as its board's ``[qemu]`` section says.

User-mode networking only, with no port forwarded into the guest: the guest reaches the
host's loopback services at 10.0.2.2, like a device behind NAT reaches the internet.
The kernel and initrd are read out of the image's FAT partition (mtools, no mount).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Optional

from .board import Board, load_board
from .disk import Fat, fat_magic_ok, read_table
from .errors import ImageError
from .util import need_tool

__all__ = ["QemuVM", "qemu_argv"]


def qemu_argv(board: Board, image: Path, kernel: Path, initrd: Path, serial: str,
              snapshot: bool = True) -> list[str]:
    q = board.qemu
    if q is None:
        raise ImageError(f"board {board.name} cannot boot under qemu (no [qemu] section)")
    argv = [q.binary, "-M", q.machine, "-cpu", q.cpu, "-smp", str(q.smp),
            "-m", str(q.memory_mib), "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", q.append,
            "-drive", f"file={image},if=none,id=disk,format=raw",
            "-device", f"{q.disk_device},drive=disk",
            "-netdev", "user,id=net0", "-device", f"{q.net_device},netdev=net0",
            "-no-reboot"]
    if snapshot:
        # Keeps the image unchanged; killing qemu then cannot leave a dirty journal.
        argv.append("-snapshot")
    if serial == "stdio":
        argv.append("-nographic")
    else:
        argv += ["-display", "none", "-monitor", "none", "-serial", f"file:{serial}"]
    return argv


class QemuVM:
    """A booted guest; use as a context manager so qemu is always killed."""

    def __init__(self, image: Path, console_log: Path, board: str = "qemu-arm64",
                 snapshot: bool = True) -> None:
        self.board = load_board(board)
        if self.board.qemu is None:
            raise ImageError(f"board {self.board.name} cannot boot under qemu "
                             "(no [qemu] section)")
        need_tool(self.board.qemu.binary, self.board.qemu.package)
        if not image.is_file():
            raise ImageError(f"--image: {image} does not exist")
        self.image, self.log, self.snapshot = image, console_log, snapshot
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._tmp = Path(tempfile.mkdtemp(prefix="dpanel-qemu-"))

    def _boot_files(self) -> tuple[Path, Path]:
        q = self.board.qemu
        assert q is not None
        fat = next((p for p in read_table(self.image) if fat_magic_ok(self.image, p)), None)
        if fat is None:
            raise ImageError(f"{self.image}: no FAT partition with a kernel")
        f = Fat(self.image, fat)
        kernel, initrd = self._tmp / q.kernel, self._tmp / q.initrd
        f.copy_out(f"/{q.kernel}", kernel)
        f.copy_out(f"/{q.initrd}", initrd)
        return kernel, initrd

    def argv(self, serial: Optional[str] = None) -> list[str]:
        kernel, initrd = self._boot_files()
        return qemu_argv(self.board, self.image, kernel, initrd, serial or str(self.log),
                         self.snapshot)

    def start(self) -> QemuVM:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        return self

    def console(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the serial console matches ``pattern``; raise with the tail if not."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.console())
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise ImageError(f"qemu exited ({self.proc.returncode}) before "
                                 f"{pattern!r}: {err}\n{self.console()[-3000:]}")
            time.sleep(0.5)
        raise ImageError(f"no {pattern!r} on the console after {timeout:.0f} s; "
                         f"last output:\n{self.console()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> QemuVM:
        return self.start()

    def __exit__(self, et: Optional[type[BaseException]], ev: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()

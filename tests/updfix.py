"""Agent-update test support: the frozen amd64 agents (two versions, cached by their
inputs under ~/.cache/dpanel), a device installed in update slots, and a supervisor that
runs it the way systemd runs the slots unit.

There is no systemd (PID 1) on the test machines, so :class:`Supervisor` is a small
restart loop that mirrors ``systemd/dpanel-agent.service`` + ``dpanel-agent.service.d/
slots.conf`` + ``dpanel-tunnel-rollback.timer``: before every start it runs
``dpanel-tunnel-rollback pre`` (ExecStartPre), then ``current/dpanel-tunnel --config``
(ExecStart), restarts it whenever it exits (Restart=always, RestartSec), and runs
``dpanel-tunnel-rollback check`` every second (the timer), restarting the agent when
that reverted it (the timer service's ``systemctl restart``). The hook script is the
real one from ``systemd/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from support import stop_proc

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "systemd" / "dpanel-tunnel-rollback"
#: the "newer" agent the tests update to (the sources' own version is the older one)
NEW_VERSION = "0.2.0-upd"


def frozen_agents(dist: Path) -> dict[str, Path]:
    """{version: binary} of the amd64 onefile agent frozen from these sources, as is and
    stamped NEW_VERSION; each cached by its inputs (a freeze is ~40 s, cached ~1 s)."""
    from dpanel_image.freeze import build_agent
    from dpanel_proto import __version__

    out = {}
    for v in (None, NEW_VERSION):
        r = build_agent("amd64", "onefile", dist / (v or "base"), version=v)
        out[v or __version__] = r.path
    return out


class SlotDevice:
    """A device installed in update slots: ``root/slots/a/dpanel-tunnel``, ``current``."""

    def __init__(self, base: Path, token: str, binary: Path, update_key: str) -> None:
        self.base = base
        self.root = base / "opt"
        self.state = base / "state"
        self.pins = base / "pins"
        for d in (self.root / "slots" / "a", self.state, self.pins):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, self.root / "slots" / "a" / "dpanel-tunnel")
        os.symlink("slots/a", self.root / "current")
        (self.pins / "update_key.pub").write_text(update_key + "\n")
        tok = base / "token"
        tok.write_text(token + "\n")
        tok.chmod(0o600)
        self.config = base / "agent.toml"
        self.config.write_text(
            f'state_dir = "{self.state}"\ntoken_file = "{tok}"\npins_dir = "{self.pins}"\n'
            f'update_root = "{self.root}"\nreconnect_min = 0.2\nreconnect_max = 2.0\n'
            'log_level = "debug"\n')

    def current(self) -> str:
        return os.readlink(self.root / "current")

    def slot_binary(self, slot: str) -> Path:
        return self.root / "slots" / slot / "dpanel-tunnel"

    def hook(self, mode: str) -> int:
        return subprocess.run(["sh", str(HOOK), mode, str(self.state), str(self.root)],
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=30).returncode


class Supervisor:
    """Restart loop standing in for systemd (see the module docstring)."""

    def __init__(self, dev: SlotDevice, log: Path, restart_sec: float = 0.5,
                 netns: Optional[str] = None) -> None:
        self.dev = dev
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.log = log
        self.restart_sec = restart_sec
        self.starts: list[str] = []  # the slot each start ran
        self.before_start: Optional[Callable[[], None]] = None
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._checker = threading.Thread(target=self._check, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._checker.start()

    def pid(self) -> Optional[int]:
        p = self.proc
        return p.pid if p is not None and p.poll() is None else None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.dev.hook("pre")  # ExecStartPre=-...: its failure never stops the start
            if self.before_start is not None:
                self.before_start()
            with self._lock:
                if self._stop.is_set():
                    return
                self.starts.append(self.dev.current())
                with self.log.open("ab") as f:
                    f.write(f"--- supervisor: start #{len(self.starts)} from "
                            f"{self.dev.current()}\n".encode())
                out = self.log.open("ab")
                self.proc = subprocess.Popen(
                    [*self.prefix, str(self.dev.root / "current" / "dpanel-tunnel"), "--config",
                     str(self.dev.config)], stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)
                out.close()
            self.proc.wait()
            self._stop.wait(self.restart_sec)

    def _check(self) -> None:
        while not self._stop.wait(1.0):
            if self.dev.hook("check") == 0:  # reverted: restart into the previous slot
                self._kill(signal.SIGTERM)

    def _kill(self, sig: int) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._kill(signal.SIGTERM)
            if self.proc is not None:
                stop_proc(self.proc, signal.SIGKILL)
                self._kill(signal.SIGKILL)
        self._thread.join(30)
        self._checker.join(30)

    def wait_starts(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.starts) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} starts: {self.starts}")
            time.sleep(0.2)

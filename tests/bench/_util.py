"""Bench plumbing: process memory/CPU readers, ports, rlimits, medians, child processes."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Optional

__all__ = [
    "BIN",
    "PY",
    "ROOT",
    "Child",
    "children_of",
    "cpu_seconds",
    "descendants",
    "fd_count",
    "median",
    "pss_kb",
    "raise_nofile",
    "rss_kb",
    "section",
]

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
BIN = Path(sys.executable).parent
_TICK = os.sysconf("SC_CLK_TCK")


def raise_nofile(want: int) -> int:
    """Raise our open-file limit (children inherit it: mosquitto, the stack, simulators).
    As root the hard limit can go up too; returns the soft limit we ended with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    for new_hard in (max(hard, want), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def rss_kb(pid: int) -> int:
    return _status_field(pid, "VmRSS")


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages divided among their users, so forked sshd
    children are not charged the whole shared binary each."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """user+system CPU of ``pid`` (children it already waited for included)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17
    return sum(int(f) for f in fields[11:15]) / _TICK


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(raw[raw.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        kids = children_of(todo.pop())
        seen += kids
        todo += kids
    return seen


def median(values: Iterable[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one bench section; a failure is recorded in its result, never raised, so the
    other sections still run."""
    t0 = time.monotonic()
    print(f"== {name}", file=sys.stderr, flush=True)
    try:
        result = fn()
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


class Child:
    """A helper process speaking JSON lines on stdin/stdout (see tunnel_proc/fwd_clients);
    killed on close even if the bench section failed half-way."""

    def __init__(self, argv: list[str], log: Path, env: Optional[dict[str, str]] = None) -> None:
        self.log = log
        self.name = " ".join(argv[1:4])
        self._log_file = log.open("ab")
        # Unbuffered: select() on the pipe must see every line we have not read yet.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log_file, cwd=ROOT, env=env, bufsize=0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, timeout: float = 600) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout)
        if not line:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.poll()}): {tail}")
        return dict(json.loads(line))

    def ask(self, command: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    import select

    if not select.select([stream], [], [], timeout)[0]:
        raise TimeoutError(f"no answer from helper process within {timeout} s")
    return stream.readline()

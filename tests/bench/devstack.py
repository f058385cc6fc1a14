"""A real stack (``dpanel stack up``) with real ``dpanel-tunnel`` agents, for the sections
that go through the agent: SSH-in-tunnel throughput, exec latency, agent idle cost."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

from stackfix import Stack
from support import free_port

from ._util import BIN, children_of, descendants

__all__ = ["AGENT_EXE", "agent_ssh_argv", "close_stack", "running_stack", "start_agent"]

AGENT_EXE = BIN / "dpanel-tunnel"


@contextlib.contextmanager
def running_stack(workdir: Path, name: str, *, port_range: str,
                  keepalive: float = 15.0) -> Iterator[Stack]:
    """Stack in ``workdir/name`` on free ports; everything it started is killed after."""
    d = workdir / name
    shutil.rmtree(d, ignore_errors=True)
    stack = Stack(dir=d, broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), port_range=port_range, keepalive=keepalive)
    try:
        stack.start()
        yield stack
    finally:
        close_stack(stack)


def close_stack(stack: Stack) -> None:
    """``Stack.close`` plus the broker: with uvicorn >= 0.29 the stack process dies of the
    SIGTERM that uvicorn re-raises after its graceful shutdown, before ``stack_up`` can stop
    its mosquitto, which is left running (reported; not our file to fix)."""
    leftovers: list[tuple[int, str]] = []
    if stack.proc is not None:
        leftovers += [(p, "mosquitto") for p in children_of(stack.proc.pid)
                      if _comm(p) == "mosquitto"]
    # A PyInstaller onefile agent is a bootloader plus a child; Stack.close kills only the
    # bootloader, which would leave the real agent running.
    for agent in stack.agents:
        leftovers += [(p, _comm(p)) for p in descendants(agent.pid)]
    stack.close()
    for pid, comm in leftovers:
        if comm and _comm(pid) == comm:  # still the same program under that pid
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(c and _comm(p) == c for p, c in leftovers) and time.monotonic() < deadline:
        time.sleep(0.05)


def _comm(pid: int) -> str:
    """The program name of a live process ('' if gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    if stat[stat.rindex(")") + 2] == "Z":
        return ""
    return stat[stat.index("(") + 1:stat.rindex(")")]


def start_agent(stack: Stack, device: str, workdir: Path, *, token: Optional[str] = None,
                exe: Path = AGENT_EXE, log_level: str = "info") -> subprocess.Popen[bytes]:
    """Enrol ``device`` (unless a token is given) and run an agent for it; the stack kills
    it on close. ``info`` logging, as on a device (``debug`` would cost idle CPU)."""
    token = token or stack.enrol(device)
    state = workdir / f"agent-{device}"
    state.mkdir(parents=True, exist_ok=True)
    log = (state / "agent.log").open("ab")
    proc = subprocess.Popen([str(exe), "--state-dir", str(state), "--log-level", log_level,
                             token], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    stack.agents.append(proc)
    return proc


def agent_ssh_argv(stack: Stack, port: int) -> list[str]:
    """OpenSSH straight to a device's tunnel port with the manager key (what
    ``dpanel proxy`` ends up carrying)."""
    return ["ssh", "-F", "/dev/null", "-i", str(stack.dir / "keys" / "manager_key"),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-p", str(port), "dpanel@127.0.0.1"]

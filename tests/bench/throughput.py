"""Section 1: bulk throughput through a reverse tunnel, OpenSSH ``ssh -R`` vs ours.

Raw forward rows: bytes go client -> forwarded port -> SSH server -> SSH client ->
a local endpoint ("push", manager to device) and back ("pull", device to manager). Each
SSH side runs in its own process, as in production. SSH-in-tunnel rows carry an SSH
session inside the tunnel (``ssh ... cat >/dev/null``), which is what scp/rsync do.
Repetitions are interleaved across rows so that load from other processes on this
shared machine hits every row alike; the median is reported.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ._util import PY, Child, cpu_seconds, descendants, median
from .devstack import agent_ssh_argv, running_stack, start_agent
from .endpoints import CHUNK, Endpoint, pull, push
from .openssh import ReverseForward, Sshd

__all__ = ["run_throughput"]

AGENT_WINDOW = 8 * 1024 * 1024  # dpanel_agent.config.AgentConfig.ssh_window


class _Pids:
    """The processes doing the SSH work of a row: fixed ones, plus ``tree`` and everything
    it forked (sshd forks per connection; the agent forks the command)."""

    def __init__(self, fixed: list[int], tree: Optional[int] = None) -> None:
        self.fixed, self.tree = fixed, tree

    def __call__(self) -> list[int]:
        if self.tree is None:
            return list(self.fixed)
        return [*self.fixed, self.tree, *descendants(self.tree)]


def _exit(ctx: contextlib.AbstractContextManager[Any]) -> None:
    ctx.__exit__(None, None, None)


@dataclass
class _Row:
    name: str
    kind: str  # "raw" | "ssh"
    cipher: str
    pids: Callable[[], list[int]]
    # raw: the forwarded port; ssh: argv prefix of an ssh command into the tunnel
    port: int = 0
    ssh: list[str] = field(default_factory=list)
    push: list[float] = field(default_factory=list)
    pull: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    setup: Optional[float] = None


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def _ssh_push(argv: list[str], nbytes: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([*argv, "cat > /dev/null"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    zeros = bytes(CHUNK)
    left = nbytes
    while left > 0:
        n = min(left, CHUNK)
        proc.stdin.write(zeros[:n])
        left -= n
    proc.stdin.close()
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait(300) != 0:
        raise RuntimeError(f"ssh push failed ({proc.returncode}): {err[-400:]!r}")
    return time.perf_counter() - t0


def _ssh_pull(argv: list[str], nbytes: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([*argv, f"head -c {nbytes} /dev/zero"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    got = 0
    while True:
        chunk = proc.stdout.read(CHUNK)
        if not chunk:
            break
        got += len(chunk)
    proc.wait(300)
    if got != nbytes:
        raise RuntimeError(f"ssh pull: got {got} of {nbytes} bytes (exit {proc.returncode})")
    return time.perf_counter() - t0


def _ssh_setup(argv: list[str], reps: int = 3) -> float:
    """Median cost of an ``ssh ... true`` through the same path; subtracted from the SSH
    rows so that they show the data rate, not the handshake."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([*argv, "true"], check=True, capture_output=True, timeout=60)
        times.append(time.perf_counter() - t0)
    return float(median(times) or 0.0)


def _measure(row: _Row, nbytes: int, endpoint: Endpoint) -> None:
    before = _cpu(row.pids())
    if row.kind == "raw":
        row.push.append(push(row.port, nbytes, endpoint))
        row.pull.append(pull(row.port, nbytes, endpoint))
    else:
        setup = row.setup or 0.0
        row.push.append(max(1e-6, _ssh_push(row.ssh, nbytes) - setup))
        row.pull.append(max(1e-6, _ssh_pull(row.ssh, nbytes) - setup))
    row.cpu.append(_cpu(row.pids()) - before)


def _summary(row: _Row, nbytes: int) -> dict[str, Any]:
    mb = nbytes / 1e6
    out: dict[str, Any] = {
        "kind": row.kind, "cipher": row.cipher,
        "push_mbps": round(mb / (median(row.push) or 1), 1) if row.push else None,
        "pull_mbps": round(mb / (median(row.pull) or 1), 1) if row.pull else None,
        "push_runs_mbps": [round(mb / t, 1) for t in row.push],
        "pull_runs_mbps": [round(mb / t, 1) for t in row.pull],
    }
    if row.cpu and row.pids():
        # CPU of the two SSH ends per GB moved (push + pull = 2 x nbytes per repetition)
        out["ssh_cpu_s_per_gb"] = round(median(row.cpu) / (2 * nbytes / 1e9), 2)  # type: ignore[operator]
    if row.setup is not None:
        out["ssh_setup_s"] = round(row.setup, 3)
    return out


def run_throughput(workdir: Path, *, nbytes: int, reps: int, with_agent: bool = True,
                   ciphers: tuple[str, ...] = ("aes128-gcm@openssh.com",)) -> dict[str, Any]:
    """``ciphers``: extra rows forcing that cipher on both implementations (the defaults
    differ: OpenSSH and asyncssh both prefer chacha20-poly1305)."""
    result: dict[str, Any] = {"bytes": nbytes, "reps": reps, "unit": "MB/s (1e6 bytes/s)",
                              "goal": "dpanel >= 0.8 x openssh (ssh -R)", "errors": {}}
    rows: list[_Row] = []
    cleanup: list[Callable[[], None]] = []
    endpoint = Endpoint()
    cleanup.append(endpoint.close)
    try:
        rows.append(_Row("loopback", "raw", "none", lambda: [], port=endpoint.port))
        _add_openssh(rows, cleanup, endpoint, ciphers, result["errors"])
        _add_dpanel(workdir, rows, cleanup, endpoint, ciphers, result["errors"])
        if with_agent:
            _add_agent(workdir, rows, cleanup, result["errors"])
        for _ in range(reps):
            for row in rows:
                try:
                    _measure(row, nbytes, endpoint)
                except Exception as exc:
                    result["errors"][row.name] = f"{type(exc).__name__}: {exc}"
    finally:
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception as exc:
                result["errors"].setdefault("cleanup", str(exc))
    result["paths"] = {row.name: _summary(row, nbytes) for row in rows}
    result["ratios"] = _ratios(result["paths"])
    return result


def _ratios(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
    """Each non-OpenSSH row against the OpenSSH row of the same kind and cipher choice."""
    baseline = {"dpanel": "openssh", "agent-ssh": "openssh-ssh"}
    out: dict[str, dict[str, Optional[float]]] = {}
    for name, row in paths.items():
        stem, _, variant = name.partition(":")
        base_name = baseline.get(stem)
        if base_name is None:
            continue
        base = paths.get(base_name + (f":{variant}" if variant else ""))
        if not base:
            continue
        out[name] = {d: (round(row[f"{d}_mbps"] / base[f"{d}_mbps"], 2)
                         if row.get(f"{d}_mbps") and base.get(f"{d}_mbps") else None)
                     for d in ("push", "pull")}
    return out


def _add_openssh(rows: list[_Row], cleanup: list[Callable[[], None]], endpoint: Endpoint,
                 ciphers: tuple[str, ...], errors: dict[str, str]) -> None:
    try:
        sshd = Sshd().start()
    except Exception as exc:
        errors["openssh"] = f"{type(exc).__name__}: {exc}"
        return
    cleanup.append(sshd.close)
    for cipher in ("", *ciphers):
        name = "openssh" + (f":{cipher}" if cipher else "")
        try:
            fwd = ReverseForward(sshd, endpoint.port,
                                 *(["-c", cipher] if cipher else [])).wait()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        cleanup.append(fwd.close)
        rows.append(_Row(name, "raw", fwd.cipher, _Pids([fwd.proc.pid], sshd.pid),
                         port=fwd.port))
    # SSH inside the OpenSSH tunnel: ssh -R back to sshd itself, then ssh through it
    try:
        loop = ReverseForward(sshd, sshd.port).wait()
        cleanup.append(loop.close)
        argv = sshd.ssh_argv(port=loop.port)
        row = _Row("openssh-ssh", "ssh", loop.cipher, _Pids([loop.proc.pid], sshd.pid),
                   ssh=argv)
        row.setup = _ssh_setup(argv)
        rows.append(row)
    except Exception as exc:
        errors["openssh-ssh"] = f"{type(exc).__name__}: {exc}"


def _add_dpanel(workdir: Path, rows: list[_Row], cleanup: list[Callable[[], None]],
                endpoint: Endpoint, ciphers: tuple[str, ...], errors: dict[str, str]) -> None:
    try:
        server = Child([PY, "-m", "tests.bench.tunnel_proc", "--key",
                        str(workdir / "tput_host_key"), "--ports", "27100-27199"],
                       workdir / "tput-tunnel.log")
        cleanup.append(server.close)
        port = int(server.read(60)["port"])
    except Exception as exc:
        errors["dpanel"] = f"{type(exc).__name__}: {exc}"
        return
    for cipher in ("", *ciphers):
        name = "dpanel" + (f":{cipher}" if cipher else "")
        try:
            client = Child([PY, "-m", "tests.bench.fwd_clients", "--port", str(port),
                            "--prefix", f"tput{len(rows)}", "--window", str(AGENT_WINDOW),
                            *(["--cipher", cipher] if cipher else [])],
                           workdir / "tput-client.log")
            cleanup.append(client.close)
            client.read(60)
            got = client.ask({"cmd": "open", "n": 1, "target": endpoint.port}, 60)
            if got["ok"] != 1:
                raise RuntimeError(f"forward failed: {got['errors']}")
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        rows.append(_Row(name, "raw", str(got["cipher"]), _Pids([server.pid, client.pid]),
                         port=int(got["ports"][0])))


def _add_agent(workdir: Path, rows: list[_Row], cleanup: list[Callable[[], None]],
               errors: dict[str, str]) -> None:
    """SSH inside our tunnel through the real agent to its built-in SSH server."""
    try:
        ctx = running_stack(workdir, "tput-stack", port_range="27200-27299")
        stack = ctx.__enter__()
        cleanup.append(lambda: _exit(ctx))
        agent = start_agent(stack, "tput-dev", workdir)
        stack.wait_online("tput-dev", 30)
        out = stack.cli_ok("tunnel", "open", "tput-dev")
        port = int(out.strip().rsplit(":", 1)[1])
        argv = agent_ssh_argv(stack, port)
        assert stack.proc is not None
        stack_pid = stack.proc.pid
        row = _Row("agent-ssh", "ssh", "default", _Pids([stack_pid], agent.pid), ssh=argv)
        row.setup = _ssh_setup(argv)
        rows.append(row)
    except Exception as exc:
        errors["agent-ssh"] = f"{type(exc).__name__}: {exc}"

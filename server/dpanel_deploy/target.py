"""Where a deploy runs its commands: a remote host over OpenSSH, or this machine."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

from dpanel_proto.result import RESULT_PREFIX

__all__ = ["DeployError", "LocalTarget", "SshTarget", "Target"]


class DeployError(Exception):
    """A deploy stopped; the message says why and what to do."""


class Target(Protocol):
    name: str

    def run(self, script: str, *, check: bool = True, stream: bool = False,
            timeout: Optional[float] = None) -> subprocess.CompletedProcess[str]: ...

    def put(self, src: Path, dest: str) -> None: ...

    def close(self) -> None: ...


def _finish(res: subprocess.CompletedProcess[str], what: str,
            check: bool) -> subprocess.CompletedProcess[str]:
    if check and res.returncode != 0:
        detail = (res.stderr or "").strip() or (res.stdout or "").strip()[-2000:]
        raise DeployError(f"{what} failed (exit {res.returncode}): {detail}")
    return res


def _run_streaming(cmd: Sequence[str],
                   timeout: Optional[float]) -> subprocess.CompletedProcess[str]:
    """Echo the output as it comes (a deploy takes a while) and keep it for parsing."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not line.startswith(RESULT_PREFIX):
            sys.stdout.write(line)
            sys.stdout.flush()
    rc = proc.wait(timeout)
    return subprocess.CompletedProcess(list(cmd), rc, "".join(lines), "")


@dataclass
class SshTarget:
    """``ssh`` with BatchMode (never prompts) and one multiplexed connection for the
    whole deploy; ``destination`` is anything ssh accepts (``root@host``,
    ``ssh://root@host:2222``, a Host alias from ``ssh_config``)."""

    destination: str
    ssh_config: Optional[str] = None
    identity: Optional[str] = None
    connect_timeout: int = 10
    name: str = ""
    _dir: Optional[str] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.name = self.destination
        if shutil.which("ssh") is None:
            raise DeployError("the OpenSSH client (ssh) is not installed on this machine")

    def _base(self) -> list[str]:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="dpanel-ssh-")
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
               "-o", "ServerAliveInterval=15", "-o", "ControlMaster=auto",
               "-o", f"ControlPath={self._dir}/cm", "-o", "ControlPersist=120"]
        if self.ssh_config:
            cmd += ["-F", self.ssh_config]
        if self.identity:
            cmd += ["-i", self.identity]
        return cmd

    def run(self, script: str, *, check: bool = True, stream: bool = False,
            timeout: Optional[float] = None) -> subprocess.CompletedProcess[str]:
        # Quoted once for the remote login shell; stdin stays /dev/null so that nothing
        # in the script (apt, debconf) can read from or wait on it.
        cmd = [*self._base(), self.destination, f"sh -c {shlex.quote(script)}"]
        if stream:
            res = _run_streaming(cmd, timeout)
        else:
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=timeout)
        if res.returncode == 255:
            raise DeployError(f"cannot reach {self.destination} over ssh: "
                              f"{(res.stderr or res.stdout).strip() or 'connection failed'}")
        return _finish(res, f"on {self.destination}: {script.strip().splitlines()[0]}", check)

    def put(self, src: Path, dest: str) -> None:
        tmp = f"{dest}.part"
        with src.open("rb") as f:
            res = subprocess.run([*self._base(), self.destination,
                                  f"cat > {shlex.quote(tmp)} && mv {shlex.quote(tmp)} "
                                  f"{shlex.quote(dest)}"],
                                 stdin=f, capture_output=True, text=True)
        _finish(res, f"copying {src.name} to {self.destination}:{dest}", True)

    def close(self) -> None:
        if self._dir is None:
            return
        subprocess.run([*self._base(), "-O", "exit", self.destination],
                       capture_output=True, timeout=15)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None


@dataclass
class LocalTarget:
    """This machine (``--local``): the same scripts, run with ``sh``."""

    name: str = "localhost (--local)"

    def run(self, script: str, *, check: bool = True, stream: bool = False,
            timeout: Optional[float] = None) -> subprocess.CompletedProcess[str]:
        if stream:
            res = _run_streaming(["sh", "-c", script], timeout)
        else:
            res = subprocess.run(["sh", "-c", script], stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=timeout)
        return _finish(res, script.strip().splitlines()[0], check)

    def put(self, src: Path, dest: str) -> None:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest + ".part")
        Path(dest + ".part").replace(dest)

    def close(self) -> None:
        pass

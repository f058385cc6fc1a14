"""The OpenSSH baseline: a throwaway ``sshd`` on a free port and ``ssh -R`` clients."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from support import free_port, wait_port

from ._util import descendants, pss_kb, rss_kb

__all__ = ["ReverseForward", "Sshd"]

SSHD = "/usr/sbin/sshd"
_ALLOCATED = re.compile(rb"Allocated port (\d+) for remote forward")
_CIPHER = re.compile(rb"kex: server->client cipher: (\S+)")


class Sshd:
    """``sshd -D`` as root with its own host key, authorized_keys and config; no PAM, no
    pid file, loopback only. One client key is generated for the bench's ``ssh``."""

    def __init__(self, max_startups: int = 200, extra_config: str = "") -> None:
        if not os.path.exists(SSHD):
            raise RuntimeError(f"{SSHD} not found (apt-get install openssh-server)")
        if os.geteuid() != 0:
            raise RuntimeError("the sshd baseline needs root (sshd refuses to run otherwise)")
        self.dir = Path(tempfile.mkdtemp(prefix="dpanel-bench-sshd-"))
        self.port = free_port()
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.client_key = self.dir / "client_key"
        self._max_startups = max_startups
        self._extra = extra_config  # more sshd_config lines (a test's TrustedUserCAKeys)

    def start(self) -> Sshd:
        d = self.dir
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                           check=True, stdin=subprocess.DEVNULL)
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        host_pub = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        n = self._max_startups
        # extra lines first: for each keyword sshd keeps the first value it reads
        (d / "sshd_config").write_text(f"""{self._extra}\
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile none
UsePAM no
StrictModes no
AuthorizedKeysFile {d / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
# scp speaks SFTP since OpenSSH 9.0 (the scp section compares it with dPanel's)
Subsystem sftp internal-sftp
GatewayPorts clientspecified
MaxStartups {n}:30:{n * 2}
PrintMotd no
# Root's ~/.bashrc here runs pyenv init (~0.3 s): bash skips it for nested shells, so
# the baseline measures SSH, not this machine's shell profile.
SetEnv SHLVL=1
LogLevel ERROR
""")
        # privilege separation directory; present on any host where sshd ever ran
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = (d / "sshd.log").open("ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config"),
                                      "-p", str(self.port)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        try:
            wait_port(self.port, timeout=20.0)
        except TimeoutError:
            self.close()
            raise RuntimeError(
                f"sshd did not start: {(d / 'sshd.log').read_text()[-1000:]}") from None
        return self

    def ssh_argv(self, *extra: str, port: Optional[int] = None) -> list[str]:
        """``ssh`` as root with the bench key to this sshd (host key pinned), or to
        ``port`` (a forward leading back to it: host key not checked there)."""
        d = self.dir
        known = ["-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o",
                 "StrictHostKeyChecking=yes"]
        if port is not None:
            known = ["-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no",
                     "-o", "LogLevel=ERROR"]
        return ["ssh", "-F", "/dev/null", "-i", str(self.client_key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", *known, "-p", str(port or self.port), *extra,
                "root@127.0.0.1"]

    def per_connection_memory(self) -> dict[str, int]:
        """PSS and RSS summed over every forked per-connection sshd process."""
        kids = [p for p in descendants(self.pid) if os.path.exists(f"/proc/{p}")]
        pss = rss = 0
        for pid in kids:
            try:
                pss += pss_kb(pid)
                rss += rss_kb(pid)
            except OSError:
                continue
        return {"processes": len(kids), "pss_kb": pss, "rss_kb": rss}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # sshd -D: SIGTERM to the listener; per-connection children die with their
            # clients, which the caller closes first.
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReverseForward:
    """``ssh -N -R 127.0.0.1:0:127.0.0.1:TARGET`` to ``sshd``; ``port`` is what sshd
    allocated. The listen address is explicit (sshd has ``GatewayPorts clientspecified``):
    with plain ``-R 0:...`` sshd binds "localhost", ::1 first, then tries the same port on
    127.0.0.1, which on a busy machine may already belong to someone else."""

    def __init__(self, sshd: Sshd, target_port: int, *extra: str) -> None:
        self._err_path = sshd.dir / f"ssh-R-{target_port}-{time.monotonic_ns()}.log"
        self._err = self._err_path.open("wb")
        argv = sshd.ssh_argv("-v", "-N", "-o", "ExitOnForwardFailure=yes",
                             "-R", f"127.0.0.1:0:127.0.0.1:{target_port}", *extra)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._err)
        self.port = 0
        self.cipher = ""

    def wait(self, timeout: float = 30) -> ReverseForward:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._err_path.read_bytes()
            m = _ALLOCATED.search(text)
            if m:
                self.port = int(m.group(1))
                c = _CIPHER.search(text)
                self.cipher = c.group(1).decode() if c else "?"
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.close()
        raise RuntimeError("ssh -R gave no port: " + self._err_path.read_text(errors="replace")
                           [-800:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()

"""The built-in SSH server the tunnel points at: exec, PTY shell, SFTP, direct-tcpip.

It listens on 127.0.0.1 only, on a port the kernel picks, so nothing on the device's
LAN can ever reach it; the only way in from outside is the reverse forward. It accepts
exactly one client key, the pinned manager key (any username), and runs commands as the
agent's own user through that user's shell, like OpenSSH would:

* exec: ``$SHELL -c CMD`` with separate stdout/stderr pipes and the real exit status
  (or exit signal);
* shell: ``$SHELL -l``; with a PTY it gets a real pseudo-terminal as its controlling
  terminal, window-change requests resize it, and break/signals reach the process;
* SFTP and scp, in process (asyncssh's server, with the agent's file permissions);
* direct-tcpip only to ``allow_forward_hosts`` (device services such as a web UI on :80).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import pwd
import signal
import struct
import termios
from typing import Callable, Dict, List, Optional, Sequence, Set

import asyncssh

__all__ = ["BuiltinSSHServer"]

log = logging.getLogger("dpanel.agent.sshd")

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Client-sent environment accepted, as OpenSSH's default AcceptEnv does.
_ACCEPT_ENV_PREFIXES = ("LC_",)
_ACCEPT_ENV = frozenset({"LANG", "LANGUAGE"})
#: After a PTY session's shell exits, how long to wait for output still in the pty.
_PTY_DRAIN = 2.0


def _set_ctty() -> None:  # runs in the child between fork and exec
    # start_new_session made the child a session leader; make the pty (its stdin) the
    # controlling terminal so job control, ^C and SIGWINCH work.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_winsize(fd: int, size: Sequence[int]) -> None:
    width, height, pixw, pixh = [*size, 0, 0, 0, 0][:4]
    if width and height:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixw, pixh))


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name[3:]
    except ValueError:
        return "KILL"


class _Server(asyncssh.SSHServer):
    """Per-connection auth and forwarding policy."""

    def __init__(self, owner: BuiltinSSHServer) -> None:
        self._owner = owner
        self._peer = "?"
        self._conn: Optional[asyncssh.SSHServerConnection] = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self._conn = conn
        self._owner._conns.add(conn)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._owner._conns.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        ok = key.public_data == self._owner.client_key.public_data
        if not ok:
            log.warning("refused key %s for %r from %s: not the pinned manager key",
                        key.get_fingerprint(), username[:64], self._peer)
        return ok

    def auth_completed(self) -> None:
        log.info("manager session opened from %s", self._peer)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        if dest_host.lower() not in self._owner.allow_forward_hosts:
            log.warning("refused direct-tcpip to %s:%d (not in allow_forward_hosts)",
                        dest_host, dest_port)
            return False
        log.info("forwarding to %s:%d", dest_host, dest_port)
        return True


class BuiltinSSHServer:
    """Start with :meth:`start`; ``port`` is where the reverse forward must point."""

    def __init__(self, host_key: asyncssh.SSHKey, client_key: asyncssh.SSHKey, *,
                 allow_forward_hosts: Sequence[str], shell: Optional[str] = None,
                 window: int = 8 * 1024 * 1024, keepalive: float = 30) -> None:
        self.host_key = host_key
        self.client_key = client_key
        self.allow_forward_hosts = frozenset(h.lower() for h in allow_forward_hosts)
        pw = pwd.getpwuid(os.geteuid())
        self._user, self._home = pw.pw_name, pw.pw_dir or "/"
        self._cwd = self._home if os.path.isdir(self._home) else "/"
        self.shell = shell or pw.pw_shell or "/bin/sh"
        if not os.access(self.shell, os.X_OK):  # e.g. /usr/sbin/nologin for a system user
            self.shell = "/bin/sh"
        self._window = window
        self._keepalive = keepalive
        self._acceptor: Optional[asyncssh.SSHAcceptor] = None
        self._children: Dict[int, asyncio.subprocess.Process] = {}
        self._conns: Set[Optional[asyncssh.SSHServerConnection]] = set()

    @property
    def port(self) -> int:
        if self._acceptor is None:
            raise RuntimeError("built-in SSH server not started")
        return self._acceptor.get_port()

    async def start(self) -> int:
        # 127.0.0.1 is hard-coded on purpose: this server must never face a LAN.
        self._acceptor = await asyncssh.create_server(
            lambda: _Server(self), "127.0.0.1", 0,
            server_host_keys=[self.host_key],
            process_factory=self._handle, sftp_factory=_SFTPServer, allow_scp=True,
            encoding=None, line_editor=False,
            public_key_auth=True, password_auth=False, kbdint_auth=False,
            host_based_auth=False, gss_host=None,
            agent_forwarding=False, x11_forwarding=False, allow_pty=True,
            keepalive_interval=self._keepalive, keepalive_count_max=3, login_timeout=30,
            window=self._window, compression_algs=None, server_version="dpanel_agent",
        )
        log.debug("built-in SSH server on 127.0.0.1:%d", self.port)
        return self.port

    async def close(self) -> None:
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.close()
        for child in list(self._children.values()):
            _killpg(child.pid, signal.SIGHUP)
        conns = [c for c in self._conns if c is not None]
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns],
                               timeout=5)

    # ------------------------------------------------------------------ sessions

    def _env(self, process: asyncssh.SSHServerProcess[bytes]) -> Dict[str, str]:
        env = {
            "HOME": self._home, "USER": self._user, "LOGNAME": self._user,
            "SHELL": self.shell, "PATH": os.environ.get("PATH") or _DEFAULT_PATH,
        }
        for name in ("LANG", "TZ"):
            if name in os.environ:
                env[name] = os.environ[name]
        for name, value in process.env.items():
            if name in _ACCEPT_ENV or name.startswith(_ACCEPT_ENV_PREFIXES):
                env[name] = value
        if process.term_type:
            env["TERM"] = process.term_type
        return env

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        if process.subsystem:  # sftp is served before we get here; nothing else exists
            process.stderr.write(f"subsystem {process.subsystem!r} not supported\n".encode())
            process.exit(1)
            return
        argv = [self.shell, "-l"] if process.command is None else [
            self.shell, "-c", process.command]
        try:
            if process.term_type:
                await self._run_pty(process, argv)
            else:
                await self._run_pipes(process, argv)
        except Exception as exc:  # keep the server up whatever one session does
            log.exception("session failed")
            if not process.is_closing():
                process.stderr.write(f"dpanel agent: {exc}\n".encode())
                process.exit(255)
        # Lets asyncssh finish its pipe cleanup tasks (they are awaited only here).
        try:
            await asyncio.wait_for(process.wait_closed(), 30)
        except (asyncio.TimeoutError, OSError, asyncssh.Error):
            pass

    async def _spawn(self, process: asyncssh.SSHServerProcess[bytes], argv: List[str],
                     stdin: int, stdout: int, stderr: int,
                     pty: bool) -> Optional[asyncio.subprocess.Process]:
        try:
            # preexec_fn is needed for TIOCSCTTY (no portable alternative on 3.9); it
            # only makes one ioctl, safe even though paho runs a thread.
            return await asyncio.create_subprocess_exec(
                *argv, stdin=stdin, stdout=stdout, stderr=stderr, env=self._env(process),
                cwd=self._cwd,
                start_new_session=True, preexec_fn=_set_ctty if pty else None,
            )
        except OSError as exc:
            log.warning("cannot start %s: %s", argv[0], exc)
            process.stderr.write(f"dpanel agent: cannot start {argv[0]}: {exc.strerror}\n"
                                 .encode())
            process.exit(127)
            return None

    async def _run_pipes(self, process: asyncssh.SSHServerProcess[bytes],
                         argv: List[str]) -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            child = await self._spawn(process, argv, in_r, out_w, err_w, pty=False)
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        if child is None:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            return
        # send_eof=False: an SSH EOF ends the whole channel, stderr included, so it must
        # wait until both streams are drained (exit() then sends EOF + close).
        await process.redirect(stdin=in_w, stdout=out_r, stderr=err_r, send_eof=False)
        pid = child.pid
        _deliver_signals(process, lambda: pid)  # its own process group (new session)
        await self._supervise(process, child, drain_timeout=None)

    async def _run_pty(self, process: asyncssh.SSHServerProcess[bytes],
                       argv: List[str]) -> None:
        master, slave = os.openpty()
        try:
            _set_winsize(slave, process.term_size)
            child = await self._spawn(process, argv, slave, slave, slave, pty=True)
        finally:
            os.close(slave)  # else reading the master never sees EIO when the shell ends
        if child is None:
            os.close(master)
            return
        await process.redirect(stdin=os.dup(master), stdout=master, send_eof=False)
        pid = child.pid
        # the terminal's foreground job, like ^C would; the shell's group if that fails
        _deliver_signals(process, lambda: _foreground_pgrp(master, pid))
        await self._supervise(process, child, drain_timeout=_PTY_DRAIN)

    async def _supervise(self, process: asyncssh.SSHServerProcess[bytes],
                         child: asyncio.subprocess.Process,
                         drain_timeout: Optional[float]) -> None:
        """Wait for the child or the channel, whichever ends first; report exit status
        only after all output reached the channel."""
        self._children[child.pid] = child
        exited = asyncio.ensure_future(child.wait())
        closed = asyncio.ensure_future(process.channel.wait_closed())
        try:
            await asyncio.wait({exited, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                # The client went away (or the tunnel dropped): hang up like sshd does.
                log.info("session closed by the client; hanging up pid %d", child.pid)
                await _terminate(child)
                return
            rc = exited.result()
            drained = asyncio.ensure_future(self._drain(process))
            await asyncio.wait({drained, closed}, timeout=drain_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
            if process.is_closing():
                return
            if rc >= 0:
                process.exit(rc)
            else:
                process.exit_with_signal(_signal_name(rc))
        finally:
            self._children.pop(child.pid, None)
            for fut in (exited, closed):
                fut.cancel()

    @staticmethod
    async def _drain(process: asyncssh.SSHServerProcess[bytes]) -> None:
        # Blocks while a redirected reader is still feeding the channel (until its EOF).
        await process.stdout.drain()
        await process.stderr.drain()



class _SFTPServer(asyncssh.SFTPServer):
    """asyncssh's SFTP server, plus the exit status that OpenSSH's sftp-server sends:
    without it, OpenSSH's scp (which speaks SFTP since 9.0) reports failure."""

    def exit(self) -> None:
        super().exit()
        try:
            self.channel.exit(0)
        except (OSError, asyncssh.Error, AttributeError):
            pass  # the channel is already gone


def _foreground_pgrp(fd: int, fallback: int) -> int:
    try:
        return os.tcgetpgrp(fd)
    except OSError:
        return fallback


def _deliver_signals(process: asyncssh.SSHServerProcess[bytes],
                     pgrp: Callable[[], int]) -> None:
    """Send the client's ``signal`` and ``break`` requests to the command's process
    group (sshd signals only the shell, which leaves ``sh -c 'a; b'`` children running
    and the channel open).

    asyncssh 2.21 (the last release for Python 3.9, which the frozen agent uses) drops
    them for redirected processes, and later releases need ``set_redirect_pid``; hooking
    the two session callbacks on this instance works the same with both. Window changes
    need nothing: asyncssh resizes the pty and the kernel sends SIGWINCH itself.
    """

    def on_signal(name: str) -> None:
        sig = getattr(signal, f"SIG{name}", None)
        if isinstance(sig, signal.Signals):
            group = pgrp()
            log.debug("delivering SIG%s to process group %d", name, group)
            _killpg(group, sig)

    def on_break(msec: int) -> bool:
        _killpg(pgrp(), signal.SIGINT)
        return True

    process.signal_received = on_signal  # type: ignore[method-assign,assignment]
    process.break_received = on_break  # type: ignore[method-assign]


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _terminate(child: asyncio.subprocess.Process) -> None:
    _killpg(child.pid, signal.SIGHUP)
    _killpg(child.pid, signal.SIGCONT)
    try:
        await asyncio.wait_for(child.wait(), 5)
    except asyncio.TimeoutError:
        _killpg(child.pid, signal.SIGKILL)
        await child.wait()

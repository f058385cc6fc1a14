"""The built-in SSH server the tunnel points at: exec, PTY shell, SFTP, direct-tcpip.

It listens on 127.0.0.1 only, on a port the kernel picks, so nothing on the device's
LAN can ever reach it; the only way in from outside is the reverse forward. It accepts
the pinned manager key (any username), and operator certificates signed by the pinned
SSH user CA (see :mod:`.userca`) whose principals name this device (``dpanel:<device>``)
or every device (``dpanel:*``), within their validity window; a refused certificate gets
one log line saying why (expired, another CA, principal mismatch). It runs commands as
the agent's own user through that user's shell, like OpenSSH would:

* exec: ``$SHELL -c CMD`` with separate stdout/stderr pipes and the real exit status
  (or exit signal);
* shell: ``$SHELL -l``; with a PTY it gets a real pseudo-terminal as its controlling
  terminal, window-change requests resize it, and break/signals reach the process;
* SFTP and scp, in process (asyncssh's server, with the agent's file permissions);
* direct-tcpip only to ``allow_forward_hosts`` (device services such as a web UI on :80).

Every session is audited (:mod:`.audit`): who (a certificate's key id, or for the pinned
manager key the operator the manager names in ``DPANEL_OPERATOR``), from where, what, the
exit status and the bytes each way; a PTY shell's output is recorded as asciicast, and a
shell whose recording cannot be written is refused unless ``record_failure = "allow"``.

Sessions get the environment sshd would give them, not the agent's own (the image's unit
runs the agent with ``UMask=0077``, and its PATH is whatever started it): the standard
PATH, umask 022, HOME, USER, LOGNAME, SHELL, MAIL, SSH_CONNECTION, SSH_CLIENT, SSH_TTY
and TERM with a PTY, TZ if the agent has it, LANG and LC_* from /etc/default/locale
(overridden by what the client sends, as AcceptEnv LANG LC_* does). SFTP and scp create
files with umask 022 too.

Process lifetime (why it is done this way): every command runs in its own session and
process group, and the group ends when the SSH session ends, as with OpenSSH: SIGHUP
(and SIGCONT, so that stopped jobs see it) to the group, then SIGKILL after
:data:`HANGUP_GRACE` seconds to whatever is left. The same must happen when the agent
itself is SIGKILLed (or crashes, or is OOM-killed), when no code of the agent runs any
more. Each session therefore gets a watchdog: a tiny ``/bin/sh`` process (dash: well
under 1 MB, no Python, nothing to unpack from the PyInstaller bundle) in a session of
its own, blocked reading a pipe whose only writer is the agent. When the session ends the
agent closes the pipe; when the agent dies the kernel does. Either way the watchdog reads
EOF and hangs up the group (and, through ``pkill -s``, job-control groups of a PTY
session), waits the grace period and kills what is left. One code path covers a clean
end, a client that vanished and a dead agent, and nothing has to be remembered across a
restart. Besides, the command's leader gets ``PR_SET_PDEATHSIG`` = SIGHUP, which covers
the instant between spawning it and its watchdog. Under systemd the unit's default
``KillMode=control-group`` also kills the whole cgroup when the agent's main process
dies, but the agent is also run by hand (``dpanel-tunnel TOKEN``), so it does not rely on
that. Alternatives not taken: a per-session supervisor in Python (a second interpreter
per command: ~10 MB and a slow start on a Pi Zero, and a re-unpack of the onefile
bundle); a fork of the agent as supervisor (fork in a threaded process, copy-on-write of
the whole heap); a file of process groups killed at the next start (leaves the commands
running until then). To keep a job running after the session on purpose, start it in a
new session (``setsid nohup job &``), as one would under OpenSSH with a PTY.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import fcntl
import logging
import os
import pwd
import re
import signal
import struct
import termios
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import asyncssh

from dpanel_proto.ratelog import RateLimitedLog
from dpanel_proto.wire import printable

from .audit import AuditShipper, Recorder, RecordingFailed, SessionAudit, take_origin
from .pumps import copy_from_fd, feed_fd

__all__ = ["HANGUP_GRACE", "PRINCIPAL_ALL", "PRINCIPAL_PREFIX", "ROOT_PATH", "SESSION_UMASK",
           "USER_PATH", "BuiltinSSHServer"]

log = logging.getLogger("dpanel.agent.sshd")
_rl = RateLimitedLog(log)

#: The PATH OpenSSH's sshd gives root and other users on Debian.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"
#: Certificate principals: ``dpanel:<device>`` reaches that device, ``dpanel:*`` all.
PRINCIPAL_PREFIX = "dpanel:"
PRINCIPAL_ALL = "dpanel:*"
_CERT_TYPE_USER = 1  # the OpenSSH certificate type of user certificates
#: sshd's default umask for sessions.
SESSION_UMASK = 0o022
#: Seconds between SIGHUP and SIGKILL when a session's process group is ended.
HANGUP_GRACE = 5
_LOCALE_FILE = Path("/etc/default/locale")
_LOCALE_LINE = re.compile(r"^\s*(?:export\s+)?(LANG|LANGUAGE|LC_[A-Z_]+)=(.*)$")

#: The per-session watchdog (see the module docstring): $1 = process group (= session)
#: id, $2 = grace seconds. stdin is the pipe from the agent; EOF = the session is over.
#: The outer shell exits at once, so the watchdog is nobody's child (init reaps it) and
#: outlives the agent's event loop, which would otherwise kill it on shutdown.
_WATCHDOG = r"""exec 3<&0 </dev/null
(
trap '' HUP INT QUIT TERM PIPE
read _ <&3 || :
exec 3<&-
pk=; command -v pkill >/dev/null 2>&1 && pk=1
alive() { kill -0 -"$1" 2>/dev/null || { [ -n "$pk" ] && pgrep -s "$1" >/dev/null 2>&1; }; }
kill -HUP -"$1" 2>/dev/null; [ -n "$pk" ] && pkill -HUP -s "$1" 2>/dev/null
kill -CONT -"$1" 2>/dev/null; [ -n "$pk" ] && pkill -CONT -s "$1" 2>/dev/null
i=0
while alive "$1"; do
  [ "$i" -ge "$(($2 * 5))" ] && break
  sleep 0.2 2>/dev/null || sleep 1
  i=$((i + 1))
done
kill -KILL -"$1" 2>/dev/null; [ -n "$pk" ] && pkill -KILL -s "$1" 2>/dev/null
) &
"""
_PR_SET_PDEATHSIG = 1
try:  # resolved here, not in the forked child
    _prctl: Optional[Callable[..., int]] = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _prctl = None
#: Client-sent environment accepted, as OpenSSH's default AcceptEnv does.
_ACCEPT_ENV_PREFIXES = ("LC_",)
_ACCEPT_ENV = frozenset({"LANG", "LANGUAGE"})
#: After a PTY session's shell exits, how long to wait for output still in the pty.
_PTY_DRAIN = 2.0
#: What the manager tells the device about a session it opens for someone else (honoured
#: only from the pinned manager key: a certificate's holder is its key id, full stop).
ENV_OPERATOR = "DPANEL_OPERATOR"
ENV_SOURCE = "DPANEL_SOURCE"
ENV_AUDIT_ID = "DPANEL_AUDIT_ID"
_HEX_ID = re.compile(r"^[0-9a-f]{16,64}\Z")


_SESSION_SIGNALS = tuple(getattr(signal, n) for n in (
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGPIPE", "SIGTSTP", "SIGTTIN", "SIGTTOU",
    "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD", "SIGXFSZ", "SIGWINCH") if hasattr(signal, n))


def _child_setup(pty: bool, parent: int) -> Callable[[], None]:
    """What runs in the child between fork and exec (one ioctl, one prctl)."""

    def setup() -> None:
        # a session starts with every signal at its default and none blocked, as under
        # sshd: an agent started from a script in the background inherits SIGINT and
        # SIGQUIT ignored, and exec keeps an ignored signal, so ^C did nothing
        for sig in _SESSION_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if _prctl is not None:
            # the leader is hung up the moment the agent dies, whatever else happens
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGHUP), 0, 0, 0)
            if os.getppid() != parent:  # the agent died before the prctl took effect
                os._exit(129)
        if pty:
            # start_new_session made the child a session leader; make the pty (its
            # stdin) the controlling terminal so job control, ^C and SIGWINCH work.
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    return setup


def _locale_env(path: Path = _LOCALE_FILE) -> Dict[str, str]:
    """LANG / LANGUAGE / LC_* from /etc/default/locale, as pam_env gives sshd sessions."""
    env: Dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return env
    for line in text.splitlines():
        m = _LOCALE_LINE.match(line)
        if m:
            value = m.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            if value and all(c.isprintable() for c in value):
                env[m.group(1)] = value
    return env


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
        self._origin_checked = False
        self._conn: Optional[asyncssh.SSHServerConnection] = None
        #: the key id of the OpenSSH certificate the client authenticated with; set by
        #: the certificate check. None = the pinned manager key.
        self.cert_key_id: Optional[str] = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self._origin_checked = False
        self._conn = conn
        self._owner._conns.add(conn)
        self._owner._servers[conn] = self
        original = getattr(conn, "validate_public_key", None)
        if original is None:  # another asyncssh: it alone decides (no reason logged)
            return

        async def validate(username: str, key_data: bytes, msg: bytes,
                           signature: bytes) -> bool:
            # ours first, for a refusal reason in the log; asyncssh decides after it
            why, key_id = self._owner.cert_refusal(key_data)
            if why is not None:
                _rl.warning("refused certificates", "refused certificate %r for %r from "
                            "%s: %s", printable(key_id[:64]), printable(username[:64]),
                            self._peer, why)
                return False
            ok = bool(await original(username, key_data, msg, signature))
            if key_id and not ok:
                _rl.warning("refused certificates", "refused certificate %r for %r from "
                            "%s: %s", printable(key_id[:64]), printable(username[:64]),
                            self._peer, "bad signature" if msg else "not accepted")
            if ok and key_id and msg:
                self.cert_key_id = key_id
            return ok

        conn.validate_public_key = validate  # type: ignore[method-assign]

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._owner._conns.discard(self._conn)
        self._owner._servers.pop(self._conn, None)

    def audit(self, chan: object, kind: str, command: str) -> SessionAudit:
        """A session's audit record: who, from where (see the module docstring)."""
        get_env = getattr(chan, "get_environment", None)  # a TCP channel has none
        raw = get_env() if get_env is not None else {}
        env = {str(k): str(v) for k, v in (raw or {}).items()}
        if not self._origin_checked:
            # looked up here, not at connect: the link notes the origin once its own
            # connect returned, which may come after this side's accept
            self._origin_checked = True
            origin = take_origin(self._peer)
            if origin is not None:
                self._peer = f"tunnel {origin}"  # the tunnel's side of this connection
        source, correlation = self._peer, ""
        if self.cert_key_id is not None:
            operator, via = self.cert_key_id, "cert"
        else:
            operator, via = env.get(ENV_OPERATOR, "")[:64] or "manager", "manager"
            if env.get(ENV_SOURCE):
                source = f"{self._peer} for {env[ENV_SOURCE][:200]}"
            if _HEX_ID.match(env.get(ENV_AUDIT_ID, "")):
                correlation = env[ENV_AUDIT_ID]
        return SessionAudit(self._owner.audit, self._owner.device, kind, operator=operator,
                            via=via, source=source, command=command,
                            correlation=correlation)

    def begin_auth(self, username: str) -> bool:
        authorized = self._owner._authorized
        if authorized is not None and self._conn is not None:
            # asyncssh's own check of certificates, after ours: CA + principals (the
            # principals= option makes it match those instead of the login name) +
            # validity. Set here: asyncssh reloads its options before auth begins.
            self._conn.set_authorized_keys(authorized)
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
            _rl.warning("refused keys", "refused key %s for %r from %s: not the pinned "
                        "manager key", key.get_fingerprint(), username[:64], self._peer)
        return ok

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False  # only via the authorized-keys entry, which carries the principals

    def auth_completed(self) -> None:
        if self.cert_key_id is not None:
            log.info("certificate session opened for %r from %s", printable(self.cert_key_id),
                     self._peer)
        else:
            log.info("manager session opened from %s", self._peer)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        if dest_host.lower() not in self._owner.allow_forward_hosts:
            _rl.warning("refused forwards", "refused direct-tcpip to %r:%d (not in "
                        "allow_forward_hosts)", dest_host[:255], dest_port)
            return False
        log.info("forwarding to %s:%d", dest_host, dest_port)
        # our own forwarder rather than asyncssh's, to count the bytes and see the end
        server = self

        async def forward(reader: asyncssh.SSHReader[bytes],
                          writer: asyncssh.SSHWriter[bytes]) -> None:
            audit = server.audit(writer.channel, "forward", f"forward {dest_host}:{dest_port}")
            await _forward(reader, writer, dest_host, dest_port, audit)

        return forward


class BuiltinSSHServer:
    """Start with :meth:`start`; ``port`` is where the reverse forward must point."""

    def __init__(self, host_key: asyncssh.SSHKey, client_key: asyncssh.SSHKey, *,
                 allow_forward_hosts: Sequence[str], shell: Optional[str] = None,
                 window: int = 8 * 1024 * 1024, keepalive: float = 30,
                 audit: Optional[AuditShipper] = None, device: str = "",
                 record_failure: str = "refuse", user_ca: str = "") -> None:
        self.host_key = host_key
        self.client_key = client_key
        self.device = device
        self.user_ca: Optional[asyncssh.SSHKey] = None
        self._authorized: Optional[asyncssh.SSHAuthorizedKeys] = None
        if user_ca:
            try:
                self.set_user_ca(user_ca)
            except (asyncssh.KeyImportError, ValueError) as exc:
                # the manager key still gets in; operators' certificates are refused
                log.error("user CA %r is unusable (%s); certificates are refused",
                          user_ca[:60], exc)
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
        self._sessions: Set[_ProcessGroup] = set()
        self._locale = _locale_env()
        self._path = ROOT_PATH if os.geteuid() == 0 else USER_PATH
        self._conns: Set[Optional[asyncssh.SSHServerConnection]] = set()
        self._servers: Dict[object, _Server] = {}
        self.audit = audit
        self.record_failure = record_failure

    def _server_of(self, chan: asyncssh.SSHServerChannel[bytes]) -> Optional[_Server]:
        return self._servers.get(chan.get_connection())

    def set_user_ca(self, line: str) -> None:
        """Trust certificates signed by ``line`` from the next connection on (a CA
        rotation ends trust in the old CA for new connections at once)."""
        key = asyncssh.import_public_key(line)
        # asyncssh matches these as wildcard patterns (no way to say a literal "*"), so
        # its check only ensures some dpanel: principal; cert_refusal, which runs first
        # on every attempt, is the exact one
        principals = f"{PRINCIPAL_PREFIX}{self.device},{PRINCIPAL_ALL}"
        self._authorized = asyncssh.import_authorized_keys(
            f'cert-authority,principals="{principals}" {line}\n')
        self.user_ca = key

    def cert_refusal(self, key_data: bytes) -> Tuple[Optional[str], str]:
        """(why a certificate must be refused or None, its key id); (None, "") for a
        plain key, which the manager-key check handles."""
        try:
            (n,) = struct.unpack_from(">I", key_data, 0)
            alg = key_data[4:4 + n]
        except struct.error:
            return None, ""
        if not alg.endswith(b"-cert-v01@openssh.com"):
            return None, ""
        try:
            cert = asyncssh.import_certificate(alg + b" " + base64.b64encode(key_data))
        except (asyncssh.KeyImportError, ValueError) as exc:
            return f"malformed certificate ({exc})", ""
        validate = getattr(cert, "validate", None)
        if validate is None:  # an X.509 chain, which dPanel never issues
            return "not an OpenSSH certificate", ""
        key_id = str(getattr(cert, "_key_id", "") or "?")
        if self.user_ca is None:
            return "no user CA is configured on this device", key_id
        signer = getattr(cert, "signing_key", None)
        if signer is None or signer.public_data != self.user_ca.public_data:
            fp = signer.get_fingerprint() if signer is not None else "?"
            return f"signed by another CA ({fp}), not the pinned user CA", key_id
        try:
            validate(_CERT_TYPE_USER, None)  # type, not-yet-valid, expired
        except ValueError as exc:
            reason = str(exc).lower().replace("certificate ", "")
            after = getattr(cert, "_valid_before", None)
            if isinstance(after, int) and after < time.time():
                reason = f"expired {int(time.time() - after)} s ago"
            return reason, key_id
        principals = list(getattr(cert, "principals", []) or [])
        wanted = {f"{PRINCIPAL_PREFIX}{self.device}", PRINCIPAL_ALL}
        if not wanted.intersection(principals):
            shown = ",".join(printable(p[:64]) for p in principals[:8]) or "none"
            return (f"principal mismatch (certificate is for {shown}; this device is "
                    f"{PRINCIPAL_PREFIX}{self.device})"), key_id
        return None, key_id

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
            process_factory=self._handle, sftp_factory=lambda chan: _SFTPServer(chan, self),
            allow_scp=True,
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
        for session in list(self._sessions):
            session.end()
        conns = [c for c in self._conns if c is not None]
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns],
                               timeout=5)

    # ------------------------------------------------------------------ sessions

    def _env(self, process: asyncssh.SSHServerProcess[bytes],
             tty: Optional[str] = None) -> Dict[str, str]:
        env = {
            "HOME": self._home, "USER": self._user, "LOGNAME": self._user,
            "SHELL": self.shell, "PATH": self._path, "MAIL": f"/var/mail/{self._user}",
        }
        if "TZ" in os.environ:  # sshd passes its own TZ on
            env["TZ"] = os.environ["TZ"]
        env.update(self._locale)
        for name, value in process.env.items():
            if name in _ACCEPT_ENV or name.startswith(_ACCEPT_ENV_PREFIXES):
                env[name] = value
        peer, local = _addr(process, "peername"), _addr(process, "sockname")
        if peer is not None and local is not None:
            env["SSH_CONNECTION"] = f"{peer[0]} {peer[1]} {local[0]} {local[1]}"
            env["SSH_CLIENT"] = f"{peer[0]} {peer[1]} {local[1]}"
        if process.term_type:
            env["TERM"] = process.term_type
        if tty:
            env["SSH_TTY"] = tty
        return env

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        if process.subsystem:  # sftp is served before we get here; nothing else exists
            process.stderr.write(f"subsystem {process.subsystem!r} not supported\n".encode())
            process.exit(1)
            return
        argv = [self.shell, "-l"] if process.command is None else [
            self.shell, "-c", process.command]
        server = self._server_of(process.channel)
        kind = "exec" if process.command is not None else "shell"
        audit = (server.audit(process.channel, kind, process.command or "shell")
                 if server is not None else SessionAudit(
                     self.audit, self.device, kind, operator="?", via="manager", source="?",
                     command=process.command or "shell"))
        recorder: Optional[Recorder] = None
        if process.term_type and self.audit is not None:
            # a PTY session is recorded, exec with -t included (it is interactive)
            width, height = [*process.term_size, 0, 0][:2]
            recorder = Recorder(self.audit, audit.id, width, height, process.term_type)
            try:
                recorder.start()
                audit.recording = "ok"
            except RecordingFailed as exc:
                recorder = None
                if self.record_failure != "allow":
                    audit.recording, audit.exit = "refused", 1
                    audit.note = f"recording cannot be written: {exc}"[:256]
                    log.error("refused a shell: its recording cannot be written (%s)", exc)
                    process.stderr.write(b"dpanel agent: this session must be recorded and "
                                         b"the recording cannot be written; refused "
                                         b"(record_failure = \"refuse\")\r\n")
                    process.exit(1)
                    audit.finish()
                    return
                audit.recording = "failed"
                log.warning("recording cannot be written (%s); shell allowed unrecorded", exc)
        _count_bytes(process, audit, recorder, self.record_failure)
        try:
            if process.term_type:
                await self._run_pty(process, argv, audit)
            else:
                await self._run_pipes(process, argv, audit)
        except Exception as exc:  # keep the server up whatever one session does
            log.exception("session failed")
            if not process.is_closing():
                process.stderr.write(f"dpanel agent: {exc}\n".encode())
                process.exit(255)
                audit.exit = 255
        finally:
            if recorder is not None:
                try:
                    recorder.close()
                    audit.recording_sha256 = recorder.sha256
                except RecordingFailed as exc:
                    audit.recording = "failed"
                    log.error("the end of a recording was lost: %s", exc)
            audit.finish()
        # Lets asyncssh finish its pipe cleanup tasks (they are awaited only here).
        try:
            await asyncio.wait_for(process.wait_closed(), 30)
        except (asyncio.TimeoutError, OSError, asyncssh.Error):
            pass

    async def _spawn(self, process: asyncssh.SSHServerProcess[bytes], argv: List[str],
                     stdin: int, stdout: int, stderr: int,
                     tty: Optional[str]) -> Optional[asyncio.subprocess.Process]:
        try:
            # preexec_fn is needed for TIOCSCTTY and PR_SET_PDEATHSIG (no portable
            # alternative on 3.9); it makes one ioctl and one prctl, safe even though
            # paho runs a thread.
            return await asyncio.create_subprocess_exec(
                *argv, stdin=stdin, stdout=stdout, stderr=stderr,
                env=self._env(process, tty), cwd=self._cwd, umask=SESSION_UMASK,
                start_new_session=True, preexec_fn=_child_setup(tty is not None, os.getpid()),
            )
        except OSError as exc:
            log.warning("cannot start %s: %s", argv[0], exc)
            process.stderr.write(f"dpanel agent: cannot start {argv[0]}: {exc.strerror}\n"
                                 .encode())
            process.exit(127)
            return None

    async def _run_pipes(self, process: asyncssh.SSHServerProcess[bytes],
                         argv: List[str], audit: SessionAudit) -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            child = await self._spawn(process, argv, in_r, out_w, err_w, tty=None)
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        if child is None:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            audit.exit = 127
            return
        # our own pumps, not process.redirect(): see pumps.py. No EOF is sent on the
        # channel here: an SSH EOF ends stderr too, so exit() sends it once both drained.
        stdin = asyncio.ensure_future(feed_fd(process.stdin, in_w))
        outputs = [asyncio.ensure_future(copy_from_fd(out_r, process.stdout)),
                   asyncio.ensure_future(copy_from_fd(err_r, process.stderr))]
        pid = child.pid
        _deliver_signals(process, lambda: pid)  # its own process group (new session)
        await self._supervise(process, child, stdin, outputs, audit, drain_timeout=None)

    async def _run_pty(self, process: asyncssh.SSHServerProcess[bytes],
                       argv: List[str], audit: SessionAudit) -> None:
        master, slave = os.openpty()
        try:
            _set_winsize(slave, process.term_size)
            child = await self._spawn(process, argv, slave, slave, slave,
                                      tty=os.ttyname(slave))
        finally:
            os.close(slave)  # else reading the master never sees EIO when the shell ends
        if child is None:
            os.close(master)
            audit.exit = 127
            return
        # Each pump owns (and closes) its own fd; ``ctl`` stays open for the whole
        # session, so that resizes and signals never hit a closed (or reused) fd number.
        ctl = os.dup(master)
        try:
            # a window change resizes the pty from its master; the kernel sends SIGWINCH
            # to the terminal's foreground job itself
            stdin = asyncio.ensure_future(feed_fd(
                process.stdin, os.dup(master), on_resize=lambda size: _set_winsize(ctl, size)))
            outputs = [asyncio.ensure_future(copy_from_fd(master, process.stdout))]
            pid = child.pid
            # the terminal's foreground job, like ^C would; the shell's group if that fails
            _deliver_signals(process, lambda: _foreground_pgrp(ctl, pid))
            await self._supervise(process, child, stdin, outputs, audit,
                                  drain_timeout=_PTY_DRAIN)
        finally:
            os.close(ctl)

    async def _supervise(self, process: asyncssh.SSHServerProcess[bytes],
                         child: asyncio.subprocess.Process, stdin: asyncio.Future[int],
                         outputs: Sequence[asyncio.Future[int]], audit: SessionAudit,
                         drain_timeout: Optional[float]) -> None:
        """Wait for the child or the channel, whichever ends first; report exit status
        only after all output reached the channel (or ``drain_timeout`` passed: a pty
        that a background job keeps open)."""
        group = await _ProcessGroup.start(child)
        self._sessions.add(group)
        exited = asyncio.ensure_future(child.wait())
        closed = asyncio.ensure_future(process.channel.wait_closed())
        try:
            await asyncio.wait({exited, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                # The client went away (or the tunnel dropped): hang up like sshd does.
                log.info("session closed by the client; hanging up process group %d",
                         child.pid)
                audit.signal = "HUP"
                audit.note = audit.note or "closed by the client"
                return
            rc = exited.result()
            if rc >= 0:
                audit.exit = rc
            else:
                audit.signal = _signal_name(rc)
            drained = asyncio.ensure_future(asyncio.wait(outputs))
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
            # The session is over, however it ended: its process group ends with it
            # (what the command left running in the background is hung up too).
            group.end()
            self._sessions.discard(group)
            futures: List[asyncio.Future[Any]] = [exited, closed, stdin, *outputs]
            for fut in futures:
                fut.cancel()  # a pump closes its fd as it goes



class _SFTPServer(asyncssh.SFTPServer):
    """asyncssh's SFTP server, plus the exit status that OpenSSH's sftp-server sends:
    without it, OpenSSH's scp (which speaks SFTP since 9.0) reports failure. Files and
    directories are created with the session umask (022), not the agent's (the unit's
    0077 would make every uploaded file 0600). The server runs on the event loop thread
    and no other thread of the agent creates files, so switching the process umask
    around the call is safe. Each SFTP (or scp) session is one audit record."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes],
                 owner: Optional[BuiltinSSHServer] = None) -> None:
        super().__init__(chan)
        self._audit: Optional[SessionAudit] = None
        server = owner._server_of(chan) if owner is not None else None
        if server is not None:
            command = chan.get_command()
            self._audit = server.audit(chan, "sftp", f"sftp {command}"[:200] if command
                                       and not command.startswith("internal-sftp")
                                       else "sftp")
            _count_channel(chan, self._audit)

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        old = os.umask(SESSION_UMASK)
        try:
            return super().open(path, pflags, attrs)
        finally:
            os.umask(old)

    def open56(self, path: bytes, desired_access: int, flags: int,
               attrs: asyncssh.SFTPAttrs) -> object:
        old = os.umask(SESSION_UMASK)
        try:
            return super().open56(path, desired_access, flags, attrs)
        finally:
            os.umask(old)

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        old = os.umask(SESSION_UMASK)
        try:
            super().mkdir(path, attrs)
        finally:
            os.umask(old)

    def exit(self) -> None:
        super().exit()
        if self._audit is not None:
            self._audit.exit = 0
            self._audit.finish()
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


def _addr(process: asyncssh.SSHServerProcess[bytes], what: str) -> Optional[Tuple[str, int]]:
    value = process.channel.get_extra_info(what)
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None


class _ProcessGroup:
    """A session's process group and its watchdog (see the module docstring).
    :meth:`end` is idempotent; it only closes the pipe, the watchdog does the rest."""

    def __init__(self, pgid: int, pipe_w: Optional[int]) -> None:
        self.pgid = pgid
        self._w = pipe_w
        self._ended = False

    @classmethod
    async def start(cls, child: asyncio.subprocess.Process) -> _ProcessGroup:
        r, w = os.pipe()  # both ends close-on-exec: no command ever inherits the writer
        try:
            launcher = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", _WATCHDOG, "dpanel-session-watchdog", str(child.pid),
                str(HANGUP_GRACE), stdin=r, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
                env={"PATH": ROOT_PATH}, cwd="/")
            rc = await launcher.wait()
            if rc != 0:
                raise OSError(f"/bin/sh exited with status {rc}")
        except OSError as exc:
            os.close(w)
            log.warning("cannot start the session watchdog (%s); the session's processes "
                        "are only ended while the agent runs", exc)
            return cls(child.pid, None)
        finally:
            os.close(r)
        return cls(child.pid, w)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._w is not None:
            os.close(self._w)
            self._w = None
        else:  # no watchdog: do its job from here
            task = asyncio.ensure_future(_hang_up(self.pgid))
            _HANGUPS.add(task)
            task.add_done_callback(_HANGUPS.discard)


_HANGUPS: Set[asyncio.Task[None]] = set()


async def _hang_up(pgid: int) -> None:
    _killpg(pgid, signal.SIGHUP)
    _killpg(pgid, signal.SIGCONT)
    for _ in range(HANGUP_GRACE * 5):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        await asyncio.sleep(0.2)
    _killpg(pgid, signal.SIGKILL)


def _count_channel(chan: asyncssh.SSHServerChannel[bytes], audit: SessionAudit,
                   on_output: Optional[Callable[[bytes], bool]] = None) -> None:
    """Count the bytes a channel carries each way, on this channel instance only:
    everything sent goes through ``write`` (redirected pipes, the pty, SFTP), everything
    received through ``_deliver_data`` (also what was buffered before the session
    started reading). ``on_output`` may veto a write (returns False)."""
    write = chan.write
    accept = chan._deliver_data  # the one place all received data passes

    def counted_write(data: bytes, datatype: Optional[int] = None) -> None:
        if on_output is not None and datatype is None and not on_output(data):
            return
        audit.bytes_out += len(data)
        write(data, datatype)

    def counted_accept(data: bytes, datatype: Optional[int] = None) -> None:
        audit.bytes_in += len(data)
        accept(data, datatype)

    chan.write = counted_write  # type: ignore[method-assign]
    chan._deliver_data = counted_accept  # type: ignore[method-assign]
    # what the client sent before we got here (its input right after the shell request)
    # is already in the session's buffer
    buffered = getattr(getattr(chan, "_session", None), "_recv_buf_len", 0)
    if isinstance(buffered, int):
        audit.bytes_in += buffered


def _count_bytes(process: asyncssh.SSHServerProcess[bytes], audit: SessionAudit,
                 recorder: Optional[Recorder], policy: str) -> None:
    """Count a process's bytes; feed a PTY's output to its recorder. A recording that
    fails mid-session ends the session (``refuse``) or goes on unrecorded (``allow``)."""
    if recorder is None:
        _count_channel(process.channel, audit)
        return
    chan = process.channel

    def on_output(data: bytes) -> bool:
        if recorder.failed:
            return policy == "allow"
        try:
            recorder.output(data)
            return True
        except RecordingFailed as exc:
            if policy == "allow":
                audit.recording = "failed"
                log.warning("recording failed mid-session (%s); going on unrecorded", exc)
                return True
            audit.recording = "refused"
            audit.note = f"recording failed mid-session: {exc}"[:256]
            log.error("ending a shell: its recording cannot be written (%s)", exc)
            asyncio.get_event_loop().call_soon(_end_unrecorded, process)
            return False

    _count_channel(chan, audit, on_output)


def _end_unrecorded(process: asyncssh.SSHServerProcess[bytes]) -> None:
    if process.is_closing():
        return
    try:
        process.channel.write(b"\r\ndpanel agent: the recording of this session cannot be "
                              b"written; session ended (record_failure = \"refuse\")\r\n",
                              1)  # EXTENDED_DATA_STDERR: not recorded, not vetoed
        process.exit(255)
    except (OSError, asyncssh.Error):
        pass


async def _forward(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes],
                   host: str, port: int, audit: SessionAudit) -> None:
    """One direct-tcpip forward, both ways with back-pressure, counted and audited."""
    try:
        try:
            treader, twriter = await asyncio.open_connection(host, port)
        except OSError as exc:
            audit.note = f"connect failed: {exc.strerror or exc}"[:256]
            audit.exit = 1
            writer.close()
            return

        async def copy(src: Any, dst: Any, count: Callable[[int], None]) -> None:
            # one direction with back-pressure; EOF is passed on where the end can half-close
            try:
                while data := await src.read(65536):
                    count(len(data))
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, asyncssh.Error):
                pass

        def counted_in(n: int) -> None:
            audit.bytes_in += n

        def counted_out(n: int) -> None:
            audit.bytes_out += n

        tasks = [asyncio.ensure_future(copy(reader, twriter, counted_in)),  # to the service
                 asyncio.ensure_future(copy(treader, writer, counted_out))]  # to the client
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            twriter.close()
            writer.close()
        audit.exit = 0
    finally:
        audit.finish()

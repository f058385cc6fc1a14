"""The tunnel's local control channel, so a manager in another process can kick and ask it.

On the appliance the tunnel and the manager are separate services sharing only the state
directory. Without a channel, a revocation reached the tunnel only through a 1 s registry
poll that missed devices with no forward yet, and the manager had to believe the port a
device reported. Now the tunnel listens on a unix socket, ``STATE_DIR/tunnel.sock`` (mode
0600, and only peers with the tunnel's own uid or root are served, checked with
SO_PEERCRED), speaking JSON lines, one request and one answer per line::

    {"op": "kick", "device": "kiosk-17"}  ->  {"ok": true, "kicked": true}
    {"op": "sessions"}                     ->  {"ok": true, "sessions": {"kiosk-17": 20431}}
    {"op": "stats"}                        ->  {"ok": true, "stats": {"connections": 3, ...}}
    anything else                          ->  {"ok": false, "error": "..."}

:class:`TunnelControl` is the manager's side: plain synchronous callables with a short
timeout, the shape ``Manager(kick=, tunnel_sessions=, tunnel_stats=)`` takes, so the
manager is the same whether the tunnel is in its process (the stack) or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

from dpanel_proto.codes import ErrorCode
from dpanel_proto.wire import DecodeError, validate_device_id

from .errors import DPanelError

if TYPE_CHECKING:
    from .tunnel import TunnelServer

__all__ = ["SOCKET_NAME", "TunnelControl", "TunnelControlError", "control_path",
           "serve_control"]

log = logging.getLogger("dpanel.tunnelctl")

SOCKET_NAME = "tunnel.sock"
#: A request line longer than this is an error (the longest real one is ~100 bytes).
MAX_LINE = 4096
#: sun_path holds 108 bytes; longer paths are reached through /proc/self/fd/N/NAME.
_SUN_PATH_MAX = 100


class TunnelControlError(DPanelError):
    """The manager could not ask the tunnel server (not running, or not answering)."""

    code = ErrorCode.TUNNEL_UNREACHABLE


def control_path(state_dir: Union[str, Path]) -> Path:
    return Path(state_dir) / SOCKET_NAME


@contextlib.contextmanager
def _sun_path(path: Path) -> Iterator[str]:
    """A path for bind/connect that fits sun_path, however deep the state directory."""
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        yield str(path)
        return
    dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dfd}/{path.name}"
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------- tunnel side


def _peer_uid(sock: socket.socket) -> Optional[int]:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _answer(tunnel: TunnelServer, line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
        if not isinstance(req, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        return {"ok": False, "error": f"request: not JSON ({exc})"}
    op = req.get("op")
    if op == "kick":
        device = req.get("device")
        try:
            validate_device_id(device if isinstance(device, str) else "")
        except DecodeError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "kicked": tunnel.kick(str(device))}
    if op == "sessions":
        return {"ok": True, "sessions": tunnel.sessions()}
    if op == "stats":
        return {"ok": True, "stats": tunnel.stats()}
    if op == "port":  # one device's port (the fleet's check at every open: O(1), not O(n))
        device = req.get("device")
        try:
            validate_device_id(device if isinstance(device, str) else "")
        except DecodeError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "port": tunnel.sessions().get(str(device))}
    if op == "devices":  # every authenticated device (the manager's revoke reconcile)
        return {"ok": True, "devices": sorted(tunnel.devices())}
    return {"ok": False, "error": f"op: unknown operation {str(op)[:40]!r} "
                                  "(kick, sessions, port, devices, stats)"}


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by a tunnel that was SIGKILLed
    os.makedirs(path.parent, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # born 0600: no window in which others may connect
        try:
            with _sun_path(path) as where:
                sock.bind(where)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_control(tunnel: TunnelServer, path: Path) -> asyncio.AbstractServer:
    """Listen on ``path`` (replacing a stale socket) for the manager's requests."""
    uid = os.getuid()
    sock = _listen(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer_uid(writer.get_extra_info("socket"))
        try:
            if peer not in (uid, 0):
                log.warning("control socket: refused a client with uid %s", peer)
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), 30)
                except (asyncio.TimeoutError, ValueError, ConnectionError):
                    return  # idle, over-long line (limit), or gone
                if not line:
                    return
                writer.write(json.dumps(_answer(tunnel, line)).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, sock=sock, limit=MAX_LINE)
    log.info("control socket on %s", path)
    return server


# ---------------------------------------------------------------------------- manager side


class TunnelControl:
    """Synchronous client of :func:`serve_control`, one short connection per call.

    The calls run on the manager's event loop (as the in-process ones do), so each is
    bounded by ``timeout``; a unix socket round trip is well under a millisecond.
    """

    def __init__(self, path: Union[str, Path], timeout: float = 1.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                with _sun_path(self.path) as where:
                    s.connect(where)
                s.sendall(json.dumps(request).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("the tunnel closed the connection")
                    buf += chunk
        except OSError as exc:
            raise TunnelControlError(f"cannot reach the tunnel server at {self.path}: "
                                     f"{exc.strerror or exc}") from None
        try:
            answer = json.loads(buf)
        except ValueError:
            raise TunnelControlError(f"tunnel control {self.path}: answer is not JSON") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            err = answer.get("error") if isinstance(answer, dict) else answer
            raise TunnelControlError(f"tunnel control {self.path}: {err}")
        return answer

    def kick(self, device: str) -> bool:
        """Drop ``device`` from the tunnel. A tunnel that cannot be reached is logged, not
        raised: it re-checks the registry at every forward and polls it too."""
        try:
            return bool(self._call({"op": "kick", "device": device})["kicked"])
        except TunnelControlError as exc:
            log.warning("kick %s: %s (the tunnel's registry check will catch it)", device, exc)
            return False

    def sessions(self) -> dict[str, int]:
        """device -> port, as allocated by the tunnel. Raises :class:`TunnelControlError`:
        without the tunnel's word no port may be believed."""
        raw = self._call({"op": "sessions"}).get("sessions")
        if not isinstance(raw, dict):
            raise TunnelControlError(f"tunnel control {self.path}: sessions is not an object")
        return {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}

    def stats(self) -> dict[str, int]:
        """The tunnel's counters; ``{"reachable": 0}`` when it cannot be asked (health must
        still answer)."""
        try:
            raw = self._call({"op": "stats"}).get("stats")
        except TunnelControlError as exc:
            log.debug("tunnel stats: %s", exc)
            return {"reachable": 0}
        if not isinstance(raw, dict):
            return {"reachable": 0}
        return {"reachable": 1, **{str(k): int(v) for k, v in raw.items() if isinstance(v, int)}}

"""Pooled SSH to devices: one connection per open tunnel, shared by every command."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Optional, Union

import asyncssh

from dpanel_proto import wire
from dpanel_proto.util import skip_none_auth

from .config import ServerConfig
from .errors import DeviceError, DeviceNotAnswering, HostKeyMismatch, RequestTimeout
from .hostkeys import fingerprint

__all__ = ["ExecEvent", "Pooled", "RemoteCommand", "SshPool"]


def _said(what: object, limit: int = 300) -> str:
    """An error text that may come from the device (an SSH disconnect reason, a signal
    name): it reaches terminals, the API and logs, so no control characters, bounded."""
    return wire.printable(str(what)[:limit])

#: device -> (host of its tunnel port, the SSH connection it is reached through or None)
Route = Callable[[str], tuple[str, Optional[asyncssh.SSHClientConnection]]]

#: (kind, data): ("stdout"|"stderr", bytes) while running, then ("exit", int).
ExecEvent = tuple[str, Union[bytes, int]]


class _KeyFirst(asyncssh.SSHClient):
    """Open the login with publickey, not asyncssh's ``none`` probe: one round trip less
    through the tunnel (every one crosses the device's link)."""

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        skip_none_auth(conn, b"publickey")


@dataclass
class Pooled:
    """One live SSH connection to a device through its tunnel port."""

    device: str
    conn: asyncssh.SSHClientConnection
    port: int
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0


class SshPool:
    """``connection(device)`` opens the device's tunnel (through ``open_tunnel``) and an
    SSH connection that must present the pinned host key (from ``pinned_key``)."""

    def __init__(self, cfg: ServerConfig, key: asyncssh.SSHKey, *,
                 open_tunnel: Callable[[str], Awaitable[int]],
                 pinned_key: Callable[[str], Awaitable[Optional[str]]],
                 on_silent: Callable[[str], None] = lambda _d: None,
                 route: Optional[Route] = None) -> None:
        self._cfg = cfg
        #: where a device's tunnel port is: (host, None) here, or (host, the manager's SSH
        #: connection to the remote tunnel server holding it: asyncssh tunnel=)
        self._route = route or (lambda _d: ("127.0.0.1", None))
        self._on_silent = on_silent
        self._key = key
        self._open_tunnel = open_tunnel
        self._pinned_key = pinned_key
        self._pool: dict[str, Pooled] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._reaper: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle())

    def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for dev in list(self._pool):
            self.drop(dev)

    def drop(self, device: str) -> None:
        pooled = self._pool.pop(device, None)
        if pooled:
            pooled.conn.close()

    def live(self, device: str) -> bool:
        """Whether a pooled connection to ``device`` is open (its tunnel has a user)."""
        return self._live(device) is not None

    def _live(self, device: str) -> Optional[Pooled]:
        pooled = self._pool.get(device)
        if pooled and not pooled.conn.is_closed():
            return pooled
        return None

    async def connection(self, device: str) -> Pooled:
        """The pooled connection to ``device``, opening its tunnel if needed."""
        pooled = self._live(device)
        if pooled:
            pooled.last_used = time.monotonic()
            return pooled
        lock = self._connecting.setdefault(device, asyncio.Lock())
        async with lock:
            pooled = self._live(device)
            if pooled:
                return pooled
            port = await self._open_tunnel(device)
            pinned = await self._pinned_key(device)
            if not pinned:
                raise HostKeyMismatch(f"device {device} has not announced a host key yet")
            host, via = self._route(device)
            try:
                conn = await asyncssh.connect(
                    host, port, username=self._cfg.manager.ssh_user,
                    **({"tunnel": via} if via is not None else {}),
                    client_keys=[self._key],
                    known_hosts=([asyncssh.import_public_key(pinned)], [], []),
                    agent_path=None, config=None, connect_timeout=10,
                    keepalive_interval=15, keepalive_count_max=3,
                    client_factory=_KeyFirst,
                )
            except asyncssh.HostKeyNotVerifiable:
                raise HostKeyMismatch(
                    f"device {device}: the SSH server on port {port} does not hold the "
                    f"pinned host key {fingerprint(pinned)}; refused") from None
            except (OSError, asyncssh.Error) as exc:
                raise DeviceError(f"device {device}: SSH through the tunnel failed: "
                                  f"{_said(exc)}") from None
            pooled = Pooled(device, conn, port)
            self._pool[device] = pooled
            return pooled

    async def start_command(self, device: str, command: str, stdin: Optional[bytes] = None, *,
                            stream_stdin: bool = False,
                            timeout: Optional[float] = None,
                            env: Optional[dict[str, str]] = None) -> RemoteCommand:
        """Start ``command`` on the device and return it running.

        The remote stdin gets ``stdin`` then EOF, or EOF at once when there is none (as
        ``ssh -n``: a command that reads stdin must never wait for input nobody sends),
        unless ``stream_stdin``: then the caller feeds it with :meth:`RemoteCommand.feed`.
        Connection, tunnel and start-up failures raise here, before any output.
        """
        pooled = await self.connection(device)
        # A live agent opens a session channel in milliseconds; a frozen one never does,
        # and the SSH keepalive would take a minute to say so.
        wait = self._cfg.manager.request_timeout
        try:
            proc = await asyncio.wait_for(pooled.conn.create_process(
                command, encoding=None, env=env or ()), wait)
        except asyncio.TimeoutError:
            self.drop(device)
            self._on_silent(device)
            raise DeviceNotAnswering(f"device {device} is connected but not answering (no "
                                     f"session within {wait:g} s)") from None
        except (OSError, asyncssh.Error) as exc:
            self.drop(device)
            raise DeviceError(f"device {device}: could not start the command: "
                              f"{_said(exc)}") from None
        cmd = RemoteCommand(self, device, pooled, proc, timeout)
        if not stream_stdin:
            if stdin:
                proc.stdin.write(stdin)
            proc.stdin.write_eof()
        return cmd

    async def exec(self, device: str, command: str, stdin: Optional[bytes] = None,
                   timeout: Optional[float] = None) -> AsyncIterator[ExecEvent]:
        """Run ``command`` on the device; yields output chunks, then the exit code."""
        cmd = await self.start_command(device, command, stdin, timeout=timeout)
        try:
            async for event in cmd.events():
                yield event
        finally:
            cmd.close()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(5)
            limit = time.monotonic() - self._cfg.manager.connection_idle
            for dev, pooled in list(self._pool.items()):
                if pooled.conn.is_closed() or (pooled.busy == 0 and pooled.last_used < limit):
                    self.drop(dev)


class RemoteCommand:
    """One command running on a device over the pooled connection.

    :meth:`events` yields its output as it comes (64 KiB chunks through a bounded queue:
    a slow reader holds the SSH window shut, so the device waits rather than the manager
    buffering), then the exit status. :meth:`close` hangs the command up (the agent
    then ends its process group, as sshd does); it is safe to call at any time, twice.
    """

    def __init__(self, pool: SshPool, device: str, pooled: Pooled,
                 proc: asyncssh.SSHClientProcess[bytes], timeout: Optional[float]) -> None:
        self._pool, self.device, self._pooled, self._proc = pool, device, pooled, proc
        self.timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._finished = False
        self._closed = False
        pooled.busy += 1

    async def feed(self, chunks: AsyncIterator[bytes]) -> None:
        """Copy ``chunks`` to the remote stdin with back-pressure, then send EOF."""
        try:
            async for chunk in chunks:
                self._proc.stdin.write(chunk)
                await self._proc.stdin.drain()
            self._proc.stdin.write_eof()
        except (OSError, asyncssh.Error, BrokenPipeError):
            pass  # the command ended or the channel closed: its exit status tells why

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._finished:
            # the caller went away (Ctrl-C, HTTP client gone, timeout): hang up
            self._proc.close()
        self._pooled.busy -= 1
        self._pooled.last_used = time.monotonic()

    async def events(self) -> AsyncIterator[ExecEvent]:
        device, proc, conn = self.device, self._proc, self._pooled.conn
        queue: asyncio.Queue[Union[ExecEvent, BaseException, None]] = asyncio.Queue(maxsize=64)

        async def pump(name: str, reader: asyncssh.SSHReader[bytes]) -> None:
            try:
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    await queue.put((name, chunk))
            except (OSError, asyncssh.Error) as exc:
                # the connection died under us: hand it to the consumer, never hang it
                await queue.put(exc)
                return
            await queue.put(None)

        pumps = [asyncio.create_task(pump("stdout", proc.stdout)),
                 asyncio.create_task(pump("stderr", proc.stderr))]
        done = 0
        try:
            while done < 2:
                left = (None if self._deadline is None
                        else max(0.0, self._deadline - time.monotonic()))
                try:
                    item = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"device {device}: command timed out after "
                                         f"{self.timeout:g} s") from None
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
            result = await proc.wait()
            self._finished = True
        except (OSError, asyncssh.Error, asyncssh.misc.ChannelOpenError) as exc:
            self._pool.drop(device)
            raise DeviceError(f"device {device}: connection lost mid-command "
                              f"({_said(exc)})") from None
        finally:
            for t in pumps:
                t.cancel()
            if not self._finished:
                self.close()
        if conn.is_closed() and result.exit_status is None:
            self._pool.drop(device)
            raise DeviceError(f"device {device}: connection lost mid-command")
        if result.exit_status is not None and result.exit_status >= 0:
            yield ("exit", result.exit_status)
        elif result.exit_signal:
            yield ("stderr", f"killed by signal {_said(result.exit_signal[0], 32)}\n".encode())
            yield ("exit", 255)
        else:
            self._pool.drop(device)
            raise DeviceError(f"device {device}: connection lost mid-command")

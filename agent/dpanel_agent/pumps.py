"""Copy bytes between an SSH session and a command's pipes or pty, losing none.

Why not asyncssh's ``process.redirect(stdin=fd, ...)``: it wraps the fds in asyncio's
pipe transports, and on a loaded machine a 50 MB stdin reached the command up to 96 KiB
short, with "FileNotFoundError" from the selector and a pipe closed twice in the log
(the write-pipe transport registers its peer-close reader with ``call_soon``, so a
transport closed before that callback runs leaves a stale selector entry behind, and the
fd number is reused by the next session's pipe). These pumps own their fds from start to
close, register each with the loop only while they wait on it and always unregister
before closing, and give back-pressure both ways: stdin is read from the channel only
as fast as the command takes it, and output only as fast as the channel drains.
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable, Optional, Sequence

import asyncssh

__all__ = ["copy_from_fd", "feed_fd"]

_CHUNK = 65536


async def _ready(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def feed_fd(reader: asyncssh.SSHReader[bytes], fd: int,
                  on_resize: Optional[Callable[[Sequence[int]], None]] = None) -> int:
    """The session's stdin into ``fd`` until the client's EOF, then close ``fd`` (the
    command reads EOF). Returns the bytes the command took.

    A command that closes its stdin early (``head -c1``) ends the copy, but the rest of
    the client's stdin is still read and dropped, as sshd does, so a client still
    sending never stalls on a full window. Window changes resize the pty (``on_resize``);
    signals and breaks are delivered elsewhere and skipped here.
    """
    os.set_blocking(fd, False)
    taken = 0
    broken = False
    try:
        while True:
            try:
                data = await reader.read(_CHUNK)
            except asyncssh.TerminalSizeChanged as exc:
                if on_resize is not None and not broken:
                    on_resize((exc.width, exc.height, exc.pixwidth, exc.pixheight))
                continue
            except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                continue
            if not data:
                return taken
            if broken:
                continue
            view = memoryview(data)
            try:
                while view:
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        await _ready(fd, writable=True)
            except OSError:  # EPIPE (or EIO on a pty): the command stopped reading
                broken = True
            taken += len(data) - len(view)
    except (asyncssh.Error, BrokenPipeError, ConnectionError):
        return taken  # the channel went away
    finally:
        os.close(fd)


async def copy_from_fd(fd: int, writer: asyncssh.SSHWriter[bytes]) -> int:
    """``fd`` (a pipe, or a pty master) into the session until EOF, then close ``fd``.
    EIO from a pty master means its last slave fd closed: EOF too. Returns the bytes
    sent. The channel's EOF is not sent here: the exit status goes first (``exit``)."""
    os.set_blocking(fd, False)
    sent = 0
    try:
        while True:
            try:
                data = os.read(fd, _CHUNK)
            except BlockingIOError:
                await _ready(fd, writable=False)
                continue
            except OSError:
                return sent
            if not data:
                return sent
            writer.write(data)
            sent += len(data)
            await writer.drain()
    except (asyncssh.Error, BrokenPipeError, ConnectionError):
        return sent  # the client went away
    finally:
        os.close(fd)

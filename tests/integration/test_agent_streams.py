"""The agent's SSH server moves every byte of a big stdin and output, under any reader.

A real asyncssh client against the real built-in server (no stack): these are the cases
where asyncio's pipe transports lost the tail of a 50 MB stdin on a loaded machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import AsyncIterator

import asyncssh
import pytest

from dpanel_agent.sshd import BuiltinSSHServer

pytestmark = pytest.mark.asyncio

_DATA = os.urandom(24 << 20)
_SHA = hashlib.sha256(_DATA).hexdigest()


@pytest.fixture
async def conn() -> AsyncIterator[asyncssh.SSHClientConnection]:
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    server = BuiltinSSHServer(asyncssh.generate_private_key("ssh-ed25519"), client_key,
                              allow_forward_hosts=[])
    port = await server.start()
    try:
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None,
                                    client_keys=[client_key], username="op") as c:
            yield c
    finally:
        await server.close()


async def test_big_stdin_reaches_every_kind_of_reader(
        conn: asyncssh.SSHClientConnection, tmp_path: Path) -> None:
    out = tmp_path / "got"
    slow = tmp_path / "slow"
    for _ in range(2):  # the old defect showed on some runs only: try it more than once
        slow.unlink(missing_ok=True)
        for cmd in ("sha256sum", f"cat > {out}; sha256sum < {out}",
                    # a slow reader: 1 MiB reads with pauses, the pipe full meanwhile
                    f"while n=$(dd bs=4096 count=256 iflag=fullblock 2>/dev/null | tee -a {slow}"
                    f" | wc -c); [ $n -gt 0 ]; do sleep 0.01; done; sha256sum < {slow}"):
            r = await asyncio.wait_for(conn.run(cmd, input=_DATA, encoding=None), 300)
            assert r.exit_status == 0, r.stderr
            assert isinstance(r.stdout, bytes)
            assert r.stdout.split()[0].decode() == _SHA, cmd


async def test_big_output_and_stderr_arrive_whole(conn: asyncssh.SSHClientConnection) -> None:
    r = await asyncio.wait_for(conn.run(
        "head -c 20000000 /dev/zero; head -c 3000000 /dev/zero >&2; exit 3",
        encoding=None), 300)
    assert r.exit_status == 3
    assert isinstance(r.stdout, bytes) and isinstance(r.stderr, bytes)
    assert (len(r.stdout), len(r.stderr)) == (20_000_000, 3_000_000)


async def test_a_command_that_stops_reading_does_not_stall_the_client(
        conn: asyncssh.SSHClientConnection) -> None:
    """`head -c1` closes its stdin at once: the rest is dropped, as sshd does, and the
    client's 24 MB write still completes (no window left waiting forever)."""
    r = await asyncio.wait_for(conn.run("head -c1 >/dev/null; sleep 1; echo done",
                                        input=_DATA, encoding=None), 300)
    assert r.exit_status == 0 and r.stdout == b"done\n"


async def test_pty_resize_and_input(conn: asyncssh.SSHClientConnection) -> None:
    proc = await conn.create_process("stty size; read line; echo got:$line; stty size",
                                     term_type="xterm", term_size=(80, 24), encoding=None)
    first = await asyncio.wait_for(proc.stdout.readuntil(b"\n"), 30)
    assert first.split() == [b"24", b"80"]
    proc.change_terminal_size(132, 50)  # in the channel's order: before the line
    proc.stdin.write(b"hello\n")
    rest = await asyncio.wait_for(proc.stdout.read(), 30)
    assert b"got:hello" in rest and b"50 132" in rest, rest
    await proc.wait_closed()

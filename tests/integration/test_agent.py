"""The agent in process against a real Mosquitto, the real public tunnel and real SSH
clients (asyncssh and OpenSSH): open → port → exec/PTY/SFTP/forward, close paths, faults."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import asyncssh
import pytest

from agentfix import World
from dpanel_proto import wire
from dpanel_proto.signing import sign_request
from support import free_port

OK = wire.ErrorCode.OK


async def _open_tunnel(world: World, name: str = "dev-1", **agent_kw: object
                       ) -> tuple[int, wire.Status]:
    dev = world.device(name)
    await dev.start(**agent_kw)
    await world.bus.wait_status(name, lambda s: s.state == "online", "online")
    resp = await world.bus.open(name)
    assert resp.code == OK, resp
    assert resp.port is not None
    status = await world.bus.wait_status(name, lambda s: s.port == resp.port, "port announced")
    return resp.port, status


async def test_open_reports_port_and_exec_keeps_streams_and_exit_code(world: World) -> None:
    port, status = await _open_tunnel(world)
    assert status.host_key.startswith("ssh-ed25519 ")
    assert status.agent_version
    # the port is the tunnel server's, bound on its loopback side
    assert world.tunnel.sessions() == {"dev-1": port}
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        r = await conn.run("echo hi; echo oops >&2; exit 3", check=False)
        assert (r.stdout, r.stderr, r.exit_status) == ("hi\n", "oops\n", 3)
        r = await conn.run("cat; echo done", input="from stdin\n", check=False)
        assert (r.stdout, r.exit_status) == ("from stdin\ndone\n", 0)
        r = await conn.run("kill -TERM $$", check=False)
        assert r.exit_signal is not None and r.exit_signal[0] == "TERM"
        # a signal sent by the client reaches the command
        proc = await conn.create_process("echo started; sleep 30; echo not reached")
        assert await asyncio.wait_for(proc.stdout.readline(), 15) == "started\n"
        proc.send_signal("USR1")
        r = await asyncio.wait_for(proc.wait(check=False), 15)
        assert r.exit_signal is not None and r.exit_signal[0] == "USR1", r


async def test_pty_shell_is_interactive_and_resizes(world: World) -> None:
    port, _ = await _open_tunnel(world)
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
        proc.stdin.write("tty; echo TERM=$TERM; stty size\n")
        out = ""
        while "24 80" not in out:
            out += await asyncio.wait_for(proc.stdout.read(4096), 15)
        assert "/dev/pts/" in out and "TERM=xterm" in out
        proc.change_terminal_size(132, 50)
        proc.stdin.write("stty size; exit 5\n")
        while "50 132" not in out:
            out += await asyncio.wait_for(proc.stdout.read(4096), 15)
        result = await asyncio.wait_for(proc.wait(check=False), 15)
        assert result.exit_status == 5


async def test_pty_ctrl_c_interrupts_foreground_command(world: World) -> None:
    port, _ = await _open_tunnel(world)
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        proc = await conn.create_process(term_type="xterm")
        out = ""

        async def started(n: int) -> None:
            # the shell is in the list when "goN" is printed (the terminal's echo of the
            # typed line shows go""N): a ^C from then on ends it, before or during the sleep,
            # so a loaded machine cannot make the ^C arrive before the command
            nonlocal out
            proc.stdin.write(f'echo go""{n}; sleep 60\n')
            while f"go{n}\r\n" not in out:
                out += await asyncio.wait_for(proc.stdout.read(4096), 30)

        await started(1)
        proc.stdin.write("\x03")  # ^C through the line discipline of a real pty
        proc.stdin.write("echo after=$?\n")
        while "after=130" not in out:
            out += await asyncio.wait_for(proc.stdout.read(4096), 15)
        # an SSH break request does the same (ssh's ~B escape)
        await started(2)
        proc.send_break(100)
        proc.stdin.write("echo again=$?\n")
        while "again=130" not in out:
            out += await asyncio.wait_for(proc.stdout.read(4096), 15)
        proc.stdin.write("exit\n")
        assert (await asyncio.wait_for(proc.wait(check=False), 15)).exit_status == 0


async def test_sftp_put_and_get(world: World, tmp_path: Path) -> None:
    port, _ = await _open_tunnel(world)
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(300_000))
    dest = tmp_path / "on-device" / "payload.bin"
    dest.parent.mkdir()
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        async with conn.start_sftp_client() as sftp:
            await sftp.put(str(src), str(dest))
            assert dest.read_bytes() == src.read_bytes()
            back = tmp_path / "back.bin"
            await sftp.get(str(dest), str(back))
            assert back.read_bytes() == src.read_bytes()


async def test_direct_tcpip_only_to_allowed_hosts(world: World, echo_server: int) -> None:
    port, _ = await _open_tunnel(world)
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        reader, writer = await conn.open_connection("127.0.0.1", echo_server)
        writer.write(b"x" * 100_000)
        writer.write_eof()
        got = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 15):
            got += chunk
        assert got == b"x" * 100_000
        writer.close()
        # a LAN address (here: the device's non-loopback name) is not in allow_forward_hosts
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("192.0.2.1", 80)
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection(socket.gethostname() + ".invalid", echo_server)


async def test_builtin_sshd_refuses_unpinned_client_key(world: World) -> None:
    port, _ = await _open_tunnel(world)
    intruder = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await world.connect_ssh(port, world.devices[0], key=intruder)
    # and no password auth either, even with the device secret
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect("127.0.0.1", port, username="dpanel",
                               password=world.devices[0].secret, client_keys=None,
                               known_hosts=None, agent_path=None, config=None)


async def test_builtin_sshd_listens_on_loopback_only(world: World) -> None:
    await _open_tunnel(world)
    sshd = world.devices[0].agents[0].sshd
    assert sshd is not None
    addrs = [s.getsockname()[0] for s in sshd._acceptor.sockets]  # type: ignore[union-attr]
    assert addrs == ["127.0.0.1"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_openssh_client_exec_through_the_tunnel(world: World, tmp_path: Path) -> None:
    port, status = await _open_tunnel(world)
    key = tmp_path / "manager_key"
    key.write_bytes(world.manager_key.export_private_key())
    key.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {status.host_key}\n")
    argv = ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(port),
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "dpanel@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(
        *argv, "echo out; echo err >&2; exit 4", stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out, err.endswith(b"err\n")) == (4, b"out\n", True), err


# --------------------------------------------------------------------------- lifetime


async def test_second_open_reuses_the_tunnel_and_close_answers(world: World) -> None:
    port, _ = await _open_tunnel(world)
    again = await world.bus.open("dev-1")
    assert (again.code, again.port) == (OK, port)
    assert world.devices[0].agents[0].link.dials == 1  # type: ignore[union-attr]
    closed = await world.bus.close("dev-1")
    assert closed.code == OK
    await world.bus.wait_status("dev-1", lambda s: s.port is None and s.state == "online",
                                "port withdrawn")
    assert world.devices[0].agents[0].tunnel_port is None
    assert world.tunnel.sessions() == {}
    assert (await world.bus.close("dev-1")).code == wire.ErrorCode.NOT_OPEN
    reopened = await world.bus.open("dev-1")
    assert reopened.code == OK and reopened.port is not None


async def test_ttl_closes_the_tunnel_even_when_in_use(world: World) -> None:
    dev = world.device()
    await dev.start()
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    resp = await world.bus.open("dev-1", ttl=10, idle_timeout=3600)
    assert resp.code == OK and resp.port
    async with await world.connect_ssh(resp.port, dev) as conn:
        await world.bus.wait_status("dev-1", lambda s: s.port is None, "closed at TTL", 40)
        await asyncio.wait_for(conn.wait_closed(), 15)
    assert world.tunnel.sessions() == {}


async def test_idle_timeout_waits_for_connections_to_end(world: World) -> None:
    dev = world.device()
    agent = await dev.start()
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    resp = await world.bus.open("dev-1", ttl=3600, idle_timeout=5)
    assert resp.code == OK and resp.port
    conn = await world.connect_ssh(resp.port, dev)
    # While the SSH connection is up the tunnel is not idle, however long that is: the
    # check is on state, polled until well past the idle timeout.
    link = agent.link
    assert link is not None and link.active == 1
    for _ in range(60):
        await asyncio.sleep(0.1)
        assert agent.tunnel_port == resp.port
    assert (await conn.run("echo still", check=False)).stdout == "still\n"
    conn.close()
    await conn.wait_closed()
    await world.bus.wait_status("dev-1", lambda s: s.port is None, "closed when idle", 40)
    assert agent.tunnel_port is None


async def test_clients_that_hang_up_at_once_leave_no_channel_open(world: World) -> None:
    """A client that resets its connection while the tunnel is still opening the channel
    (a ^C at the wrong moment): asyncssh left that channel open for good (its issue
    #823), 55 of 60 here, so the tunnel never went idle. Half the clients wait a little,
    to land at different points of the open."""
    dev = world.device()
    agent = await dev.start()
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    resp = await world.bus.open("dev-1", ttl=3600, idle_timeout=3600)
    assert resp.code == OK and resp.port
    link = agent.link
    assert link is not None
    for i in range(40):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        s.connect(("127.0.0.1", resp.port))
        if i % 2:
            await asyncio.sleep(0.001 * (i % 7))
        s.close()
    await world.bus.wait(lambda: link.active == 0, "every channel closed", 20)
    # and the tunnel still serves
    async with await world.connect_ssh(resp.port, dev) as conn:
        assert (await conn.run("echo ok", check=False)).stdout == "ok\n"


async def test_open_extends_ttl_and_idle_to_the_max(world: World) -> None:
    dev = world.device()
    agent = await dev.start()
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    assert (await world.bus.open("dev-1", ttl=3600, idle_timeout=600)).code == OK
    link = agent.link
    assert link is not None
    deadline, idle = link.deadline, link.idle_timeout
    assert (await world.bus.open("dev-1", ttl=10, idle_timeout=5)).code == OK
    assert (link.deadline, link.idle_timeout) == (deadline, idle)  # shorter asks never shorten
    assert (await world.bus.open("dev-1", ttl=7200, idle_timeout=900)).code == OK
    assert link.deadline > deadline and link.idle_timeout == 900


async def test_ttl_and_idle_are_capped_by_config(world: World) -> None:
    dev = world.device()
    agent = await dev.start(ttl_max=60, idle_timeout_max=30)
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    assert (await world.bus.open("dev-1", ttl=86400, idle_timeout=86400)).code == OK
    link = agent.link
    assert link is not None and link.idle_timeout == 30
    assert link.deadline - asyncio.get_running_loop().time() <= 61


# --------------------------------------------------------------------------- refusals


async def test_refusals_are_answered_with_their_code(world: World) -> None:
    dev = world.device()
    agent = await dev.start()
    bus = world.bus
    await bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    forger = asyncssh.generate_private_key("ssh-ed25519")
    # signed by another key
    forged = sign_request(bus.make_open("dev-1"), forger)
    assert (await bus.send(forged, sign=False)).code == wire.ErrorCode.BAD_SIGNATURE
    # unsigned
    assert (await bus.send(bus.make_open("dev-1"), sign=False)).code == \
        wire.ErrorCode.BAD_SIGNATURE
    # expired (well past the 5 s tolerance of this agent)
    old = bus.make_open("dev-1", issued_at=1_000_000.0, expires_at=1_000_060.0)
    resp = await bus.send(old)
    assert resp.code == wire.ErrorCode.EXPIRED and "clock" in resp.message
    # validly signed, but for another device (delivered on dev-1's topic)
    other = await bus.send(bus.make_open("dev-2"), to="dev-1")
    assert other.code == wire.ErrorCode.WRONG_DEVICE
    # a lifetime longer than the protocol allows
    long = bus.make_open("dev-1", expires_at=bus.make_open("dev-1").issued_at + 3600)
    assert (await bus.send(long)).code == wire.ErrorCode.BAD_REQUEST
    # replay: the same signed request twice
    req = sign_request(bus.make_close("dev-1"), bus.key)
    assert (await bus.send(req, sign=False)).code == wire.ErrorCode.NOT_OPEN
    bus.responses.pop(req.id)
    assert (await bus.send(req, sign=False)).code == wire.ErrorCode.REPLAYED
    # none of that opened a tunnel
    assert agent.tunnel_port is None and agent.link is None


async def test_garbage_payloads_are_ignored_and_the_agent_keeps_serving(world: World) -> None:
    dev = world.device()
    agent = await dev.start()
    bus = world.bus
    await bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    junk = [b"", b"\x00\xff" * 100, b"not json", b"[]", b'{"v":1}', b'{"v":99,"type":"open"}',
            b'{"v":1,"type":"open","device":"dev-1"}', b"{" * 5000,
            b'{"v":1,"type":"status","device":"dev-1","state":"online"}',
            b'{"v":1,"type":"open","device":"dev-1","id":"zz","issued_at":1,"expires_at":2}',
            b"x" * (wire.MAX_PAYLOAD + 1), os.urandom(40_000)]
    for payload in junk:
        bus.publish_raw("dev-1", payload)
    resp = await bus.open("dev-1")
    assert resp.code == OK and resp.port
    assert agent.connected
    assert set(bus.responses) == {resp.id}  # garbage got no answers


# --------------------------------------------------------------------------- faults


async def test_broker_restart_agent_reconnects_by_itself(world: World) -> None:
    dev = world.device()
    agent = await dev.start()
    bus = world.bus
    await bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, world.broker.restart)  # retained state is gone too
    bus.status.clear()
    await bus.wait_status("dev-1", lambda s: s.state == "online", "online again", 60)
    assert agent.connected
    resp = await bus.open("dev-1")
    assert resp.code == OK and resp.port


async def test_tunnel_server_restart_redials_and_reports_the_new_port(world: World) -> None:
    port, _ = await _open_tunnel(world)
    agent = world.devices[0].agents[0]
    link = agent.link
    assert link is not None
    world.tunnel.run(world.tunnel.server.close())
    await world.bus.wait_status("dev-1", lambda s: s.port is None, "port withdrawn", 30)
    world.tunnel.run(world.tunnel.server.start())
    status = await world.bus.wait_status("dev-1", lambda s: s.port is not None,
                                         "redialled", 60)
    assert link.dials >= 2
    assert world.tunnel.sessions() == {"dev-1": status.port}
    async with await world.connect_ssh(status.port or 0, world.devices[0]) as conn:
        assert (await conn.run("echo back", check=False)).stdout == "back\n"
    del port


async def test_unreachable_and_refusing_tunnels_are_reported(world: World) -> None:
    closed_port = free_port()
    dev = world.device("dev-1", tunnel=f"127.0.0.1:{closed_port}")
    await dev.start()
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    resp = await world.bus.open("dev-1")
    assert resp.code == wire.ErrorCode.TUNNEL_UNREACHABLE, resp
    # right address, wrong pinned host key: refused, and no credentials sent
    wrong_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    dev2 = world.device("dev-2", tunnel_host_key=wrong_key.strip())
    await dev2.start()
    await world.bus.wait_status("dev-2", lambda s: s.state == "online", "online")
    resp = await world.bus.open("dev-2")
    assert resp.code == wire.ErrorCode.TUNNEL_REFUSED and "host key" in resp.message, resp
    # revoked on the tunnel (wrong secret there)
    dev3 = world.device("dev-3")
    world.secrets["dev-3"] = "revoked"
    await dev3.start()
    await world.bus.wait_status("dev-3", lambda s: s.state == "online", "online")
    resp = await world.bus.open("dev-3")
    assert resp.code == wire.ErrorCode.TUNNEL_REFUSED, resp


async def test_graceful_stop_publishes_offline_and_frees_the_port(world: World) -> None:
    await _open_tunnel(world)
    await world.devices[0].stop()
    status = await world.bus.wait_status("dev-1", lambda s: s.state == "offline", "offline")
    assert status.port is None
    assert world.tunnel.sessions() == {}


async def test_sshd_target_forwards_to_the_device_sshd_and_announces_its_key(
        world: World, tmp_path: Path, echo_server: int) -> None:
    pub = tmp_path / "ssh_host_ed25519_key.pub"
    key = asyncssh.generate_private_key("ssh-ed25519")
    pub.write_text(key.export_public_key().decode().strip() + " root@device\n")
    dev = world.device()
    agent = await dev.start(ssh_target="sshd", sshd_port=echo_server, sshd_host_key=pub)
    status = await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    assert status.host_key == " ".join(key.export_public_key().decode().split()[:2])
    resp = await world.bus.open("dev-1")
    assert resp.code == OK and resp.port
    assert agent.sshd is None  # no built-in server in this mode
    # whatever listens on sshd_port is what the tunnel reaches (here: an echo service)
    reader, writer = await asyncio.open_connection("127.0.0.1", resp.port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 15) == b"ping"
    writer.close()


async def test_agent_started_before_the_broker_connects_when_it_comes_up(world: World) -> None:
    loop = asyncio.get_running_loop()
    device = world.device()  # enrolled while the broker is up
    await loop.run_in_executor(None, world.broker.stop)
    agent = await device.start()
    await asyncio.sleep(1.5)  # a few failed attempts
    assert not agent.connected
    await loop.run_in_executor(None, world.broker.start)
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online", 60)
    assert agent.connected


async def test_mqtt_v5_works_too(world: World) -> None:
    dev = world.device()
    await dev.start(mqtt_protocol="5")
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    resp = await world.bus.open("dev-1")
    assert resp.code == OK and resp.port

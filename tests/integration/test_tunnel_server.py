"""The public tunnel against real clients: asyncssh and the OpenSSH ``ssh`` binary.

The server runs in its own thread and event loop (as in production, it never shares a
loop with its clients); tests drive asyncssh clients in their own loop and OpenSSH
clients as subprocesses. Everything listens on free loopback ports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import asyncssh
import pytest

import tunnelfix
from dpanel_server.tunnel import MAX_AUTH_FAILURES, TunnelSettings
from support import wait_for

T = TypeVar("T")

SECRETS = {name: f"{name}-secret-" + "s" * 40 for name in ("dev-a", "dev-b", "dev-c")}
LOGGER = "dpanel.tunnel"


# --------------------------------------------------------------------------- harness


def pool_range(width: int) -> tuple[int, int]:
    """A random slice of 20000-32000: below the kernel's ephemeral range, so collisions with
    other tests' sockets are rare (and the server retries on the ones that happen)."""
    lo = random.randrange(20000, 32000 - width)
    return lo, lo + width - 1


class ServerThread(tunnelfix.ServerThread):
    """The shared server thread, remembering which devices ``verify`` was asked about."""

    def __init__(self, settings: TunnelSettings) -> None:
        self.verify_calls: list[str] = []
        super().__init__(settings, self._verify)

    def _verify(self, device: str, secret: str) -> bool:
        self.verify_calls.append(device)
        return SECRETS.get(device) == secret


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def make(**kw: Any) -> ServerThread:
        lo, hi = pool_range(kw.pop("width", 16))
        values: dict[str, Any] = {
            "host_key_path": tmp_path / "keys" / "tunnel_host_key", "listen_host": "127.0.0.1",
            "listen_port": 0, "port_min": lo, "port_max": hi, "keepalive_interval": 5,
        }
        values.update(kw)
        srv = ServerThread(TunnelSettings(**values))
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def tunnel(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


class EchoServer:
    """A plain TCP echo service standing in for the device's own SSH server."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    srv = EchoServer()
    yield srv
    srv.sock.close()


def roundtrip(port: int, payload: bytes = b"") -> bytes:
    payload = payload or os.urandom(200_000)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got == payload
    return got


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def listen_addresses(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on ``port``, read from /proc/net/tcp{,6}."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                if len(addr) == 8:
                    found.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.append(f"v6:{addr}")
    return found


def non_loopback_ipv4() -> list[str]:
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [a for a in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", out) if not a.startswith("127.")]


async def connect(srv: ServerThread, device: str = "dev-a", secret: Optional[str] = None,
                  **kw: Any) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1", srv.port, username=device,
        password=SECRETS.get(device, "x" * 40) if secret is None else secret,
        known_hosts=None, client_keys=None, agent_path=None, preferred_auth="password", **kw)


async def forward(conn: asyncssh.SSHClientConnection, echo: EchoServer, port: int = 0,
                  host: str = "") -> asyncssh.SSHListener:
    return await conn.forward_remote_port(host, port, "127.0.0.1", echo.port)


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """Blocking checks (sockets, polling) from a test coroutine without stalling its loop."""
    return await asyncio.to_thread(fn, *args)


# --------------------------------------------------------------------------- OpenSSH client


class OpenSSH:
    """Runs the real ``ssh`` binary against the tunnel with password auth via SSH_ASKPASS."""

    def __init__(self, srv: ServerThread, tmp: Path) -> None:
        if shutil.which("ssh") is None:
            pytest.fail("the OpenSSH client is not installed (apt-get install openssh-client)")
        self.srv = srv
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.known_hosts = tmp / "known_hosts"
        self.known_hosts.write_text(
            f"[127.0.0.1]:{srv.port} {srv.call(srv.server.host_key_line)}\n")

    def argv(self, device: str, *args: str, secret: Optional[str] = None, prompts: int = 1
             ) -> tuple[list[str], dict[str, str]]:
        askpass = self.tmp / f"askpass-{device}-{len(self.procs)}.sh"
        askpass.write_text(f"#!/bin/sh\necho '{secret or SECRETS[device]}'\n")
        askpass.chmod(0o700)
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
        argv = [
            "ssh", "-F", "/dev/null", "-p", str(self.srv.port),
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no",
            "-o", f"NumberOfPasswordPrompts={prompts}", "-o", "ConnectTimeout=15",
            "-o", "ServerAliveInterval=0", *args, f"{device}@127.0.0.1",
        ]
        return argv, env

    def reverse(self, device: str, dest_port: int, spec: str = "0:localhost"
                ) -> tuple[subprocess.Popen[bytes], int]:
        """Start ``ssh -N -R 0:localhost:DEST``; return it and the port OpenSSH printed."""
        argv, env = self.argv(device, "-N", "-o", "ExitOnForwardFailure=yes",
                              "-R", f"{spec}:{dest_port}")
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        m = re.search(r"Allocated port (\d+) for remote forward to localhost:(\d+)", line)
        assert m, f"ssh did not report an allocated port: {line!r}"
        assert int(m.group(2)) == dest_port
        return proc, int(m.group(1))

    def run(self, device: str, *args: str, secret: Optional[str] = None, prompts: int = 1
            ) -> subprocess.CompletedProcess[str]:
        argv, env = self.argv(device, *args, secret=secret, prompts=prompts)
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # in case a test stopped it
                proc.kill()
            proc.wait()


@pytest.fixture
def openssh(tunnel: ServerThread, tmp_path: Path) -> Iterator[OpenSSH]:
    client = OpenSSH(tunnel, tmp_path)
    yield client
    client.close()


# --------------------------------------------------------------------------- allocation


def test_asyncssh_client_gets_a_random_pool_port_on_loopback_only(
        tunnel: ServerThread, echo: EchoServer) -> None:
    s = tunnel.server.settings

    async def scenario() -> None:
        async with await connect(tunnel) as conn:
            listener = await forward(conn, echo)
            port = listener.get_port()
            assert s.port_min <= port <= s.port_max
            assert tunnel.sessions() == {"dev-a": port}
            # Bound on 127.0.0.1 and nowhere else (no wildcard, no IPv6).
            assert listen_addresses(port) == ["127.0.0.1"]
            for addr in non_loopback_ipv4():
                assert not await to_thread(is_listening, port, addr), addr
            await to_thread(roundtrip, port)
            st = tunnel.stats()
            assert st["connections"] == 1 and st["ports_in_use"] == 1
            assert st["pool_free"] == s.port_max - s.port_min

    asyncio.run(scenario())


def test_openssh_client_reverse_forward_carries_data(
        tunnel: ServerThread, openssh: OpenSSH, echo: EchoServer) -> None:
    s = tunnel.server.settings
    _, port = openssh.reverse("dev-a", echo.port)
    assert s.port_min <= port <= s.port_max
    assert listen_addresses(port) == ["127.0.0.1"]
    # Data through the port proves the forwarded channels carry the (host, port) OpenSSH
    # matches literally; on a mismatch it refuses them ("unknown listen_port").
    roundtrip(port)
    roundtrip(port, b"second connection on the same forward")
    assert tunnel.sessions() == {"dev-a": port}


def test_two_devices_get_different_ports(tunnel: ServerThread, echo: EchoServer) -> None:
    async def scenario() -> None:
        async with await connect(tunnel, "dev-a") as a, await connect(tunnel, "dev-b") as b:
            pa = (await forward(a, echo)).get_port()
            pb = (await forward(b, echo)).get_port()
            assert pa != pb
            assert tunnel.sessions() == {"dev-a": pa, "dev-b": pb}

    asyncio.run(scenario())


def test_ports_held_by_other_processes_are_skipped(
        make_server: Callable[..., ServerThread], echo: EchoServer) -> None:
    srv = make_server(width=4)
    s = srv.server.settings
    squatters = []
    for port in range(s.port_min, s.port_max):  # all but the last one
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            sock.close()
            continue
        squatters.append(sock)

    async def scenario() -> None:
        async with await connect(srv) as conn:
            port = (await forward(conn, echo)).get_port()
            assert port == s.port_max
            await to_thread(roundtrip, port)
        wait_for(lambda: srv.stats()["ports_in_use"] == 0, "port freed")

    try:
        asyncio.run(scenario())
    finally:
        for sock in squatters:
            sock.close()


# --------------------------------------------------------------------------- attacks


def test_device_cannot_bind_a_second_port_or_another_devices_port(
        tunnel: ServerThread, echo: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    s = tunnel.server.settings

    async def scenario() -> None:
        async with await connect(tunnel, "dev-a") as a, await connect(tunnel, "dev-b") as b:
            pa = (await forward(a, echo)).get_port()
            with pytest.raises(asyncssh.ChannelListenError):
                await forward(a, echo)  # a second port
            free = next(p for p in range(s.port_min, s.port_max + 1) if p != pa)
            with pytest.raises(asyncssh.ChannelListenError):
                await forward(a, echo, port=free)  # a specific port that is not its own
            with pytest.raises(asyncssh.ChannelListenError):
                await forward(b, echo, port=pa)  # A's port
            with pytest.raises(asyncssh.ChannelListenError):
                await forward(b, echo, host="0.0.0.0")  # a public bind address
            with pytest.raises(asyncssh.ChannelListenError):
                await b.forward_remote_path("/tmp/dpanel-evil.sock", "/tmp/x")
            assert tunnel.sessions() == {"dev-a": pa}
            # B can still get a port of its own after all that.
            pb = (await forward(b, echo)).get_port()
            assert pb != pa
            # A's forward is untouched and still A's.
            await to_thread(roundtrip, pa)

    asyncio.run(scenario())
    assert "refused a second port forward" in caplog.text
    assert "not this device's port" in caplog.text
    assert "only loopback" in caplog.text
    assert "unix socket forward" in caplog.text


def test_openssh_client_cannot_bind_another_devices_port(
        tunnel: ServerThread, openssh: OpenSSH, echo: EchoServer) -> None:
    _, pa = openssh.reverse("dev-a", echo.port)
    argv, env = openssh.argv("dev-b", "-N", "-o", "ExitOnForwardFailure=yes",
                             "-R", f"{pa}:localhost:{echo.port}")
    res = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0
    assert "remote port forwarding failed" in res.stderr
    assert tunnel.sessions() == {"dev-a": pa}
    roundtrip(pa)


def test_device_cannot_open_session_exec_shell_sftp_or_direct_tcpip(
        tunnel: ServerThread, echo: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def scenario() -> None:
        async with await connect(tunnel) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("id", check=False)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process(term_type="xterm")  # shell with a pty
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.start_sftp_client()
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", echo.port)  # direct-tcpip
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_unix_connection("/run/sshd.pid")
            # The connection survives the refusals and can still do its one job.
            port = (await forward(conn, echo)).get_port()
            await to_thread(roundtrip, port)

    asyncio.run(scenario())
    assert "refused a session" in caplog.text
    assert "refused direct-tcpip" in caplog.text


def test_openssh_client_cannot_exec_or_direct_tcpip(
        tunnel: ServerThread, openssh: OpenSSH, echo: EchoServer) -> None:
    res = openssh.run("dev-a", "echo", "pwned")
    assert res.returncode != 0 and "pwned" not in res.stdout
    res = openssh.run("dev-a", "-W", f"127.0.0.1:{echo.port}")  # stdio over direct-tcpip
    assert res.returncode != 0
    assert "open failed" in res.stderr or "administratively prohibited" in res.stderr \
        or "refused" in res.stderr.lower()
    assert tunnel.stats()["ports_in_use"] == 0


@pytest.mark.parametrize(("device", "secret"), [
    ("dev-a", "wrong-secret-" + "w" * 40),   # right device, wrong secret
    ("nobody", "nobody-secret-" + "n" * 40),  # unknown device
    ("Bad_ID", "x" * 40),                    # not even a device id
    ("../dev-a", SECRETS["dev-a"]),          # path tricks in the user name
])
def test_bad_credentials_are_rejected_without_logging_the_secret(
        tunnel: ServerThread, caplog: pytest.LogCaptureFixture, device: str,
        secret: str) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(tunnel, device, secret)

    asyncio.run(scenario())
    assert "auth failed" in caplog.text or "auth refused" in caplog.text
    assert secret not in caplog.text
    wait_for(lambda: tunnel.stats()["connections"] == 0, "rejected connection dropped")
    assert tunnel.sessions() == {}
    if not device.islower() or "/" in device:
        assert device not in tunnel.verify_calls  # invalid ids never reach the registry


def test_openssh_client_with_wrong_secret_is_rejected(
        tunnel: ServerThread, openssh: OpenSSH) -> None:
    res = openssh.run("dev-a", "-N", secret="wrong-" + "w" * 40)
    assert res.returncode == 255
    assert "Permission denied" in res.stderr
    assert tunnel.stats()["ports_in_use"] == 0


def test_repeated_wrong_secrets_drop_the_connection(
        tunnel: ServerThread, openssh: OpenSSH) -> None:
    res = openssh.run("dev-a", "-N", secret="wrong-" + "w" * 40, prompts=10)
    assert res.returncode == 255
    assert "too many authentication failures" in res.stderr
    assert tunnel.verify_calls.count("dev-a") == MAX_AUTH_FAILURES


def test_only_password_auth_is_offered(tunnel: ServerThread) -> None:
    async def scenario() -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect("127.0.0.1", tunnel.port, username="dev-a",
                                   client_keys=[key], known_hosts=None, agent_path=None,
                                   preferred_auth="publickey")
        # The right secret, but through keyboard-interactive (which asyncssh would emulate
        # on top of password auth unless turned off): refused, only "password" is offered.
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect("127.0.0.1", tunnel.port, username="dev-a",
                                   password=SECRETS["dev-a"], known_hosts=None,
                                   client_keys=None, agent_path=None,
                                   preferred_auth="keyboard-interactive")

    asyncio.run(scenario())


# --------------------------------------------------------------------------- lifecycle


def test_reconnect_evicts_the_stale_session_and_gets_the_same_port(
        tunnel: ServerThread, echo: EchoServer) -> None:
    async def scenario() -> None:
        old = await connect(tunnel)
        port = (await forward(old, echo)).get_port()
        # The device comes back (e.g. after a NAT rebinding) while the old session lingers.
        new = await connect(tunnel)
        await asyncio.wait_for(old.wait_closed(), 15)
        assert (await forward(new, echo)).get_port() == port
        assert tunnel.sessions() == {"dev-a": port}
        await to_thread(roundtrip, port)
        # A third session may even ask for that port by number: it is this device's.
        newest = await connect(tunnel)
        await asyncio.wait_for(new.wait_closed(), 15)
        assert (await forward(newest, echo, port=port)).get_port() == port
        newest.close()
        await newest.wait_closed()
        wait_for(lambda: tunnel.stats()["connections"] == 0, "all sessions gone")
        st = tunnel.stats()
        assert st["ports_in_use"] == 0 and st["ports_reserved"] == 1

    asyncio.run(scenario())


def test_openssh_reconnect_gets_the_same_port(
        tunnel: ServerThread, openssh: OpenSSH, echo: EchoServer) -> None:
    first, port = openssh.reverse("dev-a", echo.port)
    _second, again = openssh.reverse("dev-a", echo.port)
    assert again == port
    first.wait(15)  # the stale one was evicted
    roundtrip(port)


def test_restarted_server_gives_devices_their_ports_back(
        make_server: Callable[..., ServerThread], tmp_path: Path, echo: EchoServer) -> None:
    sticky = tmp_path / "state" / "tunnel-ports.json"
    first = make_server(sticky_path=sticky)
    s = first.server.settings

    async def take_port(srv: ServerThread) -> int:
        async with await connect(srv) as conn:
            port = (await forward(conn, echo)).get_port()
            await to_thread(roundtrip, port)
        return port

    port = asyncio.run(take_port(first))
    first.stop()
    assert sticky.stat().st_mode & 0o777 == 0o600
    second = make_server(sticky_path=sticky, port_min=s.port_min, port_max=s.port_max,
                         listen_port=0)
    assert asyncio.run(take_port(second)) == port


def test_corrupt_sticky_map_is_ignored(
        make_server: Callable[..., ServerThread], tmp_path: Path, echo: EchoServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    sticky = tmp_path / "ports.json"
    sticky.write_text("{not json")
    srv = make_server(sticky_path=sticky)
    assert "ignoring sticky port map" in caplog.text

    async def scenario() -> None:
        async with await connect(srv) as conn:
            await forward(conn, echo)

    asyncio.run(scenario())


def test_cancelled_forward_frees_the_port_and_may_be_requested_again(
        tunnel: ServerThread, echo: EchoServer) -> None:
    async def scenario() -> None:
        async with await connect(tunnel) as conn:
            listener = await forward(conn, echo)
            port = listener.get_port()
            listener.close()  # cancel-tcpip-forward
            await listener.wait_closed()
            wait_for(lambda: tunnel.stats()["ports_in_use"] == 0, "port released on cancel")
            assert not await to_thread(is_listening, port)
            assert (await forward(conn, echo)).get_port() == port

    asyncio.run(scenario())


def test_kick_closes_the_session_and_frees_the_port(
        tunnel: ServerThread, echo: EchoServer) -> None:
    async def scenario() -> None:
        conn = await connect(tunnel)
        port = (await forward(conn, echo)).get_port()
        assert tunnel.call(lambda: tunnel.server.kick("dev-a")) is True
        # Freed by kick itself, not by the client going away.
        assert tunnel.sessions() == {}
        assert tunnel.stats()["ports_in_use"] == 0
        assert not await to_thread(is_listening, port)
        await asyncio.wait_for(conn.wait_closed(), 15)
        assert tunnel.call(lambda: tunnel.server.kick("dev-a")) is False
        assert tunnel.call(lambda: tunnel.server.kick("nobody")) is False

    asyncio.run(scenario())


def test_pool_exhaustion_is_refused_clearly_and_server_keeps_running(
        make_server: Callable[..., ServerThread], echo: EchoServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    srv = make_server(width=2)

    async def scenario() -> None:
        a, b, c = [await connect(srv, d) for d in ("dev-a", "dev-b", "dev-c")]
        pa = (await forward(a, echo)).get_port()
        await forward(b, echo)
        with pytest.raises(asyncssh.ChannelListenError):
            await forward(c, echo)
        assert "port pool exhausted: 2 of 2 ports" in caplog.text
        # c keeps its connection and gets a port once one is free.
        a.close()
        await a.wait_closed()
        wait_for(lambda: srv.stats()["ports_in_use"] == 1, "a's port released")
        assert (await forward(c, echo)).get_port() == pa
        await to_thread(roundtrip, pa)
        for conn in (b, c):
            conn.close()
            await conn.wait_closed()

    asyncio.run(scenario())


def test_server_close_drops_everyone_and_frees_all_ports(
        tunnel: ServerThread, echo: EchoServer) -> None:
    async def scenario() -> None:
        conns = [await connect(tunnel, d) for d in ("dev-a", "dev-b")]
        ports = [(await forward(c, echo)).get_port() for c in conns]
        tunnel.run(tunnel.server.close())
        for conn in conns:
            await asyncio.wait_for(conn.wait_closed(), 15)
        for port in ports:
            assert not await to_thread(is_listening, port)
        st = tunnel.stats()
        assert st["connections"] == 0 and st["ports_in_use"] == 0

    asyncio.run(scenario())


def test_killed_client_frees_its_port(
        tunnel: ServerThread, openssh: OpenSSH, echo: EchoServer) -> None:
    proc, port = openssh.reverse("dev-a", echo.port)
    proc.kill()  # SIGKILL: the kernel closes the socket, the server sees EOF
    proc.wait()
    wait_for(lambda: tunnel.sessions() == {}, "port of the killed client released")
    assert tunnel.stats()["ports_in_use"] == 0
    assert not is_listening(port)


def test_keepalive_frees_the_port_of_a_silent_peer(
        make_server: Callable[..., ServerThread], tmp_path: Path, echo: EchoServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    srv = make_server(keepalive_interval=0.5, keepalive_count_max=2)
    client = OpenSSH(srv, tmp_path)
    try:
        proc, port = client.reverse("dev-a", echo.port)
        # A frozen peer keeps its TCP connection open (the kernel still ACKs) but never
        # answers keepalives, like a device whose uplink silently died.
        proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: srv.sessions() == {}, "keepalive timeout released the port", 60)
        assert srv.stats()["connections"] == 0
        assert not is_listening(port)
        assert "not responding to keepalive" in caplog.text
    finally:
        client.close()


# --------------------------------------------------------------------------- hostile bytes


def test_garbage_on_the_ssh_port_does_not_hurt_the_server(
        make_server: Callable[..., ServerThread], echo: EchoServer) -> None:
    # Some garbage looks like the start of a long packet: login_timeout ends those.
    tunnel = make_server(login_timeout=3)
    rng = random.Random(4)
    payloads = [
        bytes(rng.randrange(256) for _ in range(4096)),
        b"SSH-2.0-evil\r\n" + bytes(rng.randrange(256) for _ in range(8192)),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"SSH-2.0-evil\r\n" + b"\x00\x00\xff\xff" + b"A" * 100,  # absurd packet length
        b"\r\n" * 5000,
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", tunnel.port), timeout=60) as s:
            try:
                s.sendall(payload)
                while s.recv(65536):
                    pass  # the server answers with its banner/disconnect, then closes
            except (ConnectionResetError, BrokenPipeError):
                pass
    wait_for(lambda: tunnel.stats()["connections"] == 0, "garbage connections dropped")
    assert tunnel.stats()["unauthenticated"] == 0

    async def still_works() -> None:
        async with await connect(tunnel) as conn:
            await to_thread(roundtrip, (await forward(conn, echo)).get_port())

    asyncio.run(still_works())


def test_unauthenticated_connections_are_capped(
        make_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    srv = make_server(max_unauthenticated=3, login_timeout=120)
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=15) for _ in range(3)]
    try:
        for s in idle:
            assert s.recv(64).startswith(b"SSH-2.0-")  # accepted, waiting for us
        wait_for(lambda: srv.stats()["unauthenticated"] == 3, "3 pending connections")
        extra = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
        with extra:
            data = b"x"
            try:
                while data:
                    data = extra.recv(65536)  # ends with EOF/reset: the cap dropped it
            except ConnectionResetError:
                pass
        assert "too many unauthenticated connections" in caplog.text
        assert srv.stats()["unauthenticated"] == 3  # the first three are still there
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: srv.stats()["unauthenticated"] == 0, "pending connections gone")

    async def still_works() -> None:
        async with await connect(srv):
            pass

    asyncio.run(still_works())


def test_login_timeout_drops_idle_connections(
        make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(login_timeout=1)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        data = b"x"
        try:
            while data:
                data = s.recv(65536)
        except ConnectionResetError:
            pass
    wait_for(lambda: srv.stats()["connections"] == 0, "idle connection dropped")

"""The SSH path through the one-port TLS edge: the agent's TLS resumes its session on a
redial, and the tunnel logs the device's own address (not the edge's loopback relay),
which nothing a device sends can change.

One device netns with a veth to the host, where a real stack serves the edge; a real
agent dials it. Module scope: the stack and agent are shared by the tests.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from stackfix import Stack
from support import device_link, free_port, stop_proc, wait_for

pytestmark = [pytest.mark.root]

DEVICE = "edge-ssh-1"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class _Site:
    def __init__(self, stack: Stack, ns: str, host_ip: str, dev_ip: str, edge: str,
                 agent_log: Path) -> None:
        self.stack, self.ns, self.host_ip, self.dev_ip = stack, ns, host_ip, dev_ip
        self.edge, self.agent_log = edge, agent_log


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Site]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    ns, veth = f"dpes{tag}", f"dpes{tag}h"
    a, b = 120 + os.getpid() % 30, random.randrange(256)
    host_ip, dev_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
    tmp = tmp_path_factory.mktemp("edge-ssh")
    stack = None
    try:
        _run("ip", "netns", "add", ns)
        device_link(ns, veth, host_ip, dev_ip)
        edge = f"{host_ip}:{free_port()}"
        stack = Stack(dir=tmp / "stack", broker_port=free_port(), tunnel_port=free_port(),
                      api_port=free_port(), public_host=host_ip,
                      extra=("--edge-listen", edge))
        stack.start()
        state = tmp / "agent"
        conf = tmp / "agent.toml"
        conf.write_text('proxy = "none"\n')
        stack.start_agent(stack.enrol(DEVICE), state, netns=ns,
                          extra=("--config", str(conf), "--log-level", "info"))
        stack.wait_online(DEVICE, 60)
        yield _Site(stack, ns, host_ip, dev_ip, edge, state / "agent.log")
    finally:
        if stack is not None:
            stack.close()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _tunnel_ups(site: _Site) -> list[str]:
    text = site.agent_log.read_text(errors="replace")
    return [line for line in text.splitlines() if "tunnel up:" in line]


def test_the_tunnels_tls_to_the_edge_resumes_on_redial(site: _Site) -> None:
    st = site.stack
    for _ in range(2):
        st.cli_ok("tunnel", "open", DEVICE)
        st.cli_ok("tunnel", "close", DEVICE)
        wait_for(lambda: not st.device(DEVICE).get("port"), "tunnel closed", 30)
    ups = _tunnel_ups(site)
    assert len(ups) >= 2, ups
    assert "(TLS)" in ups[0], ups  # the first dial: a full handshake
    assert all("(TLS, resumed)" in line for line in ups[1:]), ups
    # and the SSH inside the resumed TLS works end to end
    out = st.cli("exec", DEVICE, "--", "echo", "resumed", timeout=90)
    assert out.returncode == 0 and out.stdout == b"resumed\n", out


def test_the_tunnel_logs_the_devices_own_address(site: _Site) -> None:
    st = site.stack
    st.cli_ok("tunnel", "open", DEVICE)
    log = st.log()
    m = re.findall(rf"device {DEVICE} authenticated from (\S+)", log)
    assert m, log[-3000:]
    assert all(addr.startswith(f"{site.dev_ip}:") for addr in m), m
    assert re.search(rf"edge: {re.escape(site.dev_ip)}:\d+ dpanel-ssh -> ", log), log[-3000:]
    st.cli_ok("tunnel", "close", DEVICE)


def _in_site(site: _Site, *argv: str) -> None:
    """Python in the device's netns; it must exit 0."""
    out = subprocess.run(["ip", "netns", "exec", site.ns, sys.executable, *argv],
                         capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]


_FORGER = textwrap.dedent("""
    import socket, ssl, sys
    host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["dpanel-ssh"])
    s = ctx.wrap_socket(socket.create_connection((host, port), 10))
    # a PROXY-protocol header and a spoofed X-Forwarded-For: both mere bytes to the tunnel
    s.sendall(b"PROXY TCP4 6.6.6.6 10.0.0.1 4444 443\\r\\nX-Forwarded-For: 6.6.6.7\\r\\n")
    s.sendall(b"SSH-2.0-forger\\r\\n" + bytes(range(256)) * 8)
    s.settimeout(10)
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
""")


def test_a_device_cannot_forge_its_address(site: _Site, tmp_path: Path) -> None:
    """A client through the edge that sends address headers, then a wrong password:
    the tunnel's lines name its real address only."""
    st = site.stack
    ca = st.dir / "tls" / "ca.crt"  # the stack's broker CA, which the edge's certificate chains to
    host, port = site.edge.rsplit(":", 1)
    script = tmp_path / "forger.py"
    script.write_text(_FORGER)
    _in_site(site, str(script), host, port, str(ca))
    bad = tmp_path / "badpw.py"
    bad.write_text(textwrap.dedent(f"""
        import asyncio, ssl, asyncssh
        class T:
            async def create_connection(self, factory, _h, _p):
                ctx = ssl.create_default_context(cafile={str(ca)!r})
                ctx.check_hostname = False
                ctx.set_alpn_protocols(["dpanel-ssh"])
                loop = asyncio.get_running_loop()
                return await loop.create_connection(factory, {host!r}, {port}, ssl=ctx)
        async def main():
            try:
                await asyncssh.connect("x", tunnel=T(), username={DEVICE!r}, password="wrong",
                                       known_hosts=None, client_keys=None, agent_path=None,
                                       preferred_auth="password", config=None)
            except asyncssh.Error:
                pass
        asyncio.run(main())
    """))
    _in_site(site, str(bad))
    pattern = rf"auth failed for device {DEVICE} from {re.escape(site.dev_ip)}:\d+ \(via edge"
    wait_for(lambda: re.search(pattern, st.log()), "the failed login logged", 30)
    assert "6.6.6.6" not in st.log() and "6.6.6.7" not in st.log()


def _tinyproxy(site: _Site, port: int, conf_dir: Path) -> subprocess.Popen[bytes]:
    """A real tinyproxy in the device's netns (the site's proxy), as nobody."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(conf_dir, 0o755)
    conf = conf_dir / "tinyproxy.conf"
    conf.write_text("\n".join([f"Port {port}", "Listen 127.0.0.1", "Timeout 600",
                               "Allow 127.0.0.1", "LogLevel Info", "DisableViaHeader Yes", ""]))
    conf.chmod(0o644)
    exe = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    with (conf_dir / "tinyproxy.log").open("ab") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", site.ns, "setpriv", "--reuid=nobody", "--regid=nogroup",
             "--clear-groups", exe, "-d", "-c", str(conf)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError((conf_dir / "tinyproxy.log").read_text())
        return bool(subprocess.run(["ip", "netns", "exec", site.ns, "ss", "-Htln", "sport",
                                    f"= :{port}"], capture_output=True, text=True).stdout.strip())

    wait_for(listening, "tinyproxy listening", 15)
    return proc


def test_a_proxy_that_dies_mid_connection(site: _Site, tmp_path: Path) -> None:
    """The site's proxy is killed under a live MQTT session and tunnel: the device shows
    offline and an exec fails with a clear error, at once; when the proxy is back, the
    agent redials through it by itself and exec works again."""
    if shutil.which("tinyproxy") is None and not Path("/usr/bin/tinyproxy").exists():
        pytest.skip("tinyproxy is not installed (tasks.py APT_PACKAGES)")
    st, name, port = site.stack, "edge-ssh-px", free_port()
    px = Path(tempfile.mkdtemp(prefix="dpes-tinyproxy-"))  # nobody must read its config
    proxy = _tinyproxy(site, port, px)
    try:
        conf = tmp_path / "agent.toml"
        conf.write_text(f'proxy = "http://127.0.0.1:{port}"\nreconnect_max = 5\n')
        st.start_agent(st.enrol(name), tmp_path / "agent", netns=site.ns,
                       extra=("--config", str(conf), "--log-level", "info"))
        st.wait_online(name, 60)
        out = st.cli("exec", name, "--", "echo", "before", timeout=90)
        assert out.returncode == 0 and out.stdout == b"before\n", out
        stop_proc(proxy, signal.SIGKILL)
        st.wait_offline(name, 60)  # the edge saw both relayed connections end
        out = st.cli("exec", name, "--", "echo", "during", timeout=90)
        assert out.returncode != 0 and b"offline" in out.stderr, out
        proxy = _tinyproxy(site, port, px)
        st.wait_online(name, 90)
        out = st.cli("exec", name, "--", "echo", "after", timeout=90)
        assert out.returncode == 0 and out.stdout == b"after\n", out
    finally:
        stop_proc(proxy, signal.SIGKILL)
        shutil.rmtree(px, ignore_errors=True)


_FLOOD = textwrap.dedent("""
    # many addresses each holding connections that never send a ClientHello, redialling
    # whatever the edge drops, until stdin closes
    import selectors, socket, sys, threading
    host, port, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sources = sys.argv[4:]
    sel = selectors.DefaultSelector()
    def dial(src):
        s = socket.socket()
        s.setblocking(False)
        s.bind((src, 0))
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        sel.register(s, selectors.EVENT_READ, src)
    for src in sources:
        for _ in range(per):
            dial(src)
    print("flooding", flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    while not stop.is_set():
        for key, _ in sel.select(0.5):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:  # refused, evicted or timed out: come straight back
                sel.unregister(key.fileobj)
                key.fileobj.close()
                dial(key.data)
""")


def test_a_flood_from_many_addresses_does_not_lock_a_device_out(site: _Site,
                                                                tmp_path: Path) -> None:
    """30 addresses of the site each hold 20 connections to the edge that never start TLS
    (600, over the edge's cap of 256 pending) and redial at once when dropped: the device
    still opens a tunnel through the edge, an exec works, and the log stays bounded."""
    st = site.stack
    a, b, _, _ = site.host_ip.split(".")
    net = f"10.{int(a) + 1}.{b}"
    sources = [f"{net}.{i}" for i in range(10, 40)]
    for src in sources:
        _run("ip", "-n", site.ns, "addr", "add", f"{src}/32", "dev", "eth0")
    _run("ip", "route", "add", f"{net}.0/24", "via", site.dev_ip)
    script = tmp_path / "flood.py"
    script.write_text(_FLOOD)
    host, port = site.edge.rsplit(":", 1)
    flood = subprocess.Popen(["ip", "netns", "exec", site.ns, sys.executable, str(script),
                              host, port, "20", *sources], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert flood.stdout is not None and flood.stdout.readline() == b"flooding\n"
        st.cli_ok("tunnel", "close", DEVICE)
        wait_for(lambda: not st.device(DEVICE).get("port"), "tunnel closed", 30)
        wait_for(lambda: "edge: refused" in st.log() or "evict" in st.log(),
                 "the edge's gate at work", 30)
        out = st.cli("exec", DEVICE, "--", "echo", "through-the-flood", timeout=90)
        assert out.returncode == 0 and out.stdout == b"through-the-flood\n", out
        # evictions mid-handshake once cost a traceback each: a flood made a log flood
        assert "Traceback" not in st.log()
    finally:
        assert flood.stdin is not None
        flood.stdin.close()
        stop_proc(flood, signal.SIGKILL)
        subprocess.run(["ip", "route", "del", f"{net}.0/24"], capture_output=True)

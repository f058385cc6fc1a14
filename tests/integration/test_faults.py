"""Faults: broker, tunnel/manager and agent die; the network is cut mid-command.

Each time the device must come back by itself, no port may leak, and the manager must
answer with a clear error meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from stackfix import BIN, Stack
from support import free_port, wait_for

CLEAR_ERRORS = (b"offline", b"not connected to the broker", b"timed out after",
                b"connection lost", b"unreachable", b"tunnel refused")


def _health(stack: Stack) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.api_port}/v1/health",
                                    timeout=5) as r:
            return dict(json.loads(r.read()))
    except OSError:
        return {}


def _ports_in_use(stack: Stack) -> int:
    return int(_health(stack).get("tunnel", {}).get("ports_in_use", -1))  # type: ignore[union-attr]


def _exec_ok(stack: Stack, device: str) -> bool:
    return stack.cli("exec", device, "--", "true", timeout=60).returncode == 0


@pytest.fixture
def online(stack: Stack, tmp_path: Path) -> tuple[Stack, Path]:
    state = tmp_path / "dev-f"
    stack.start_agent(stack.enrol("dev-f"), state)
    stack.wait_online("dev-f")
    assert _exec_ok(stack, "dev-f")
    return stack, state


def test_broker_killed_and_restarted(online: tuple[Stack, Path]) -> None:
    stack, _ = online
    pid = int((stack.dir / "mosquitto" / "mosquitto.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    out = stack.cli("exec", "dev-f", "--", "true", timeout=60)
    # either the pooled SSH path still works (the tunnel does not need the broker) or the
    # error is a clear one; never a hang or a traceback
    assert out.returncode == 0 or any(e in out.stderr for e in CLEAR_ERRORS), out.stderr
    wait_for(lambda: _health(stack).get("broker") is True, "manager back on the broker", 60)
    # a fresh open request must cross the restarted broker and reach the agent
    wait_for(lambda: stack.cli("tunnel", "close", "dev-f").returncode == 0,
             "agent answers on the restarted broker", 90, interval=1)
    wait_for(lambda: _exec_ok(stack, "dev-f"), "exec after broker restart", 90, interval=1)
    assert _ports_in_use(stack) == 1


def test_tunnel_and_manager_restarted(online: tuple[Stack, Path]) -> None:
    stack, _ = online
    stack.restart()  # tunnel + manager + broker all go away and come back
    wait_for(lambda: stack.device("dev-f")["online"], "device back online", 90, interval=1)
    wait_for(lambda: _exec_ok(stack, "dev-f"), "exec after restart", 90, interval=1)
    assert _ports_in_use(stack) == 1
    assert [d["id"] for d in json.loads(stack.cli_ok("device", "list", "--json"))] == ["dev-f"]


def test_agent_killed_and_restarted(online: tuple[Stack, Path]) -> None:
    stack, state = online
    agent = stack.agents[-1]
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    stack.wait_offline("dev-f", timeout=30)  # last will
    out = stack.cli("exec", "dev-f", "--", "true")
    assert out.returncode == 255 and b"offline" in out.stderr
    stack.start_agent(stack.tokens["dev-f"], state)
    stack.wait_online("dev-f")
    wait_for(lambda: _exec_ok(stack, "dev-f"), "exec after agent restart", 60, interval=1)
    # the dead agent's session was evicted (or timed out): one port in use, not two
    wait_for(lambda: _ports_in_use(stack) == 1, "stale port freed", 60)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    ns, veth = f"dpt-{os.getpid() % 10000}-{free_port() % 1000}", f"dpv{free_port() % 100000}"
    host_ip, dev_ip = "10.232.0.1", "10.232.0.2"
    cmds = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "addr", "add", f"{host_ip}/30", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "-n", ns, "addr", "add", f"{dev_ip}/30", "dev", "eth0"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "route", "add", "default", "via", host_ip],
    ]
    for c in cmds:
        subprocess.run(c, check=True)
    try:
        yield ns, veth, host_ip
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.root
def test_network_cut_mid_command(netns: tuple[str, str, str], tmp_path: Path) -> None:
    ns, veth, host_ip = netns
    stack = Stack(dir=tmp_path / "stack", broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), public_host=host_ip, keepalive=1.0)
    stack.start()
    try:
        stack.start_agent(stack.enrol("dev-n"), tmp_path / "dev-n", netns=ns)
        stack.wait_online("dev-n")
        assert _exec_ok(stack, "dev-n")
        long = subprocess.Popen([str(BIN / "dpanel"), "exec", "dev-n", "--", "sleep", "120"],
                                env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2)
        subprocess.run(["ip", "link", "set", veth, "down"], check=True)
        _, err = long.communicate(timeout=90)  # keepalive notices within a few seconds
        assert long.returncode == 255 and b"connection lost" in err, err
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
        wait_for(lambda: _exec_ok(stack, "dev-n"), "exec after the link is back", 150,
                 interval=2)
        wait_for(lambda: _ports_in_use(stack) == 1, "no leaked port", 60)
    finally:
        stack.close()


def test_full_port_pool_gives_a_clear_error(tmp_path: Path) -> None:
    stack = Stack(dir=tmp_path / "stack", broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), port_range=f"{(p := free_port())}-{p}")
    stack.start()
    try:
        for name in ("dev-p1", "dev-p2"):
            stack.start_agent(stack.enrol(name), tmp_path / name)
            stack.wait_online(name)
        assert _exec_ok(stack, "dev-p1")
        out = stack.cli("exec", "dev-p2", "--", "true")
        assert out.returncode == 255 and b"refused" in out.stderr, out.stderr
        assert stack.proc is not None and stack.proc.poll() is None  # still serving
        assert _exec_ok(stack, "dev-p1")
        stack.cli_ok("tunnel", "close", "dev-p1")
        wait_for(lambda: _exec_ok(stack, "dev-p2"), "pool port reused", 30, interval=1)
    finally:
        stack.close()

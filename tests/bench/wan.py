"""dPanel against OpenSSH on emulated WANs (``tc netem`` on the device's veth), side by side.

One device network namespace, one veth to the host (where the stack runs), and per profile
the same netem qdisc on both ends of the veth (so half the RTT each way, the rate and the
loss in both directions). In that namespace: three agents of one stack (``plain``: the
SSH port 2220-style tunnel and ``mqtt://``; ``edge``: TLS to the one-port edge;
``proxy``: the edge through a real tinyproxy at the site), an OpenSSH ``sshd`` (the
device's, for the baselines) and the ``ssh -R`` client that OpenSSH would use instead.

Per profile, measured in one run:

* throughput of an SSH session through the tunnel (``ssh ... cat``, push and pull) for the
  three agents, against OpenSSH ``ssh`` through an ``ssh -R`` on the same link, and
  against the link rate (at the receiver, from its first quarter of the bytes to the last:
  log-in, slow start and what piled up before the command read are not counted);
* time to first output of a cold ``dpanel exec DEV -- echo`` (no tunnel open), in seconds
  and in RTTs; against ``ssh`` over an open ``ssh -R`` and a fresh ``ssh -R`` bring-up;
* ``scp`` of ``--scp-mb`` MB (50) up through the tunnel against scp straight to the
  device's sshd over the same link;
* the 443-through-a-proxy path against the direct edge (throughput and cold exec).

    python -m tests.bench.wan --out out/bench-wan [--profiles lte] [--reps 1]

Root only (network namespaces, tc). Writes ``wan.json`` and prints ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpanel_proto.token import parse_token
from stackfix import Stack
from support import free_port, wait_for
from tests.bench._util import BIN, median
from tests.bench.endpoints import CHUNK

__all__ = ["PROFILES", "main", "run_wan"]


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    mbit: float
    rtt_ms: float
    loss_pct: float = 0.0  # each direction
    jitter_ms: float = 0.0  # each direction (netem with a rate keeps packets in order)

    def netem(self) -> list[str]:
        half = self.rtt_ms / 2
        argv = ["delay", f"{half:g}ms"]
        if self.jitter_ms:
            argv += [f"{self.jitter_ms:g}ms", "distribution", "normal"]
        if self.loss_pct:
            argv += ["loss", f"{self.loss_pct:g}%"]
        return [*argv, "rate", f"{self.mbit:g}mbit", "limit", str(self.limit)]

    @property
    def limit(self) -> int:
        """A queue of ~2 bandwidth-delay products (a modem's buffer, not 1000 packets)."""
        bdp_packets = self.mbit * 1e6 / 8 * self.rtt_ms / 1000 / 1500
        return max(64, int(2 * bdp_packets))

    @property
    def link_MBps(self) -> float:
        return self.mbit / 8


PROFILES = {
    "wan20": Profile("wan20", 20, 40),
    "wan10": Profile("wan10", 10, 100, loss_pct=0.5),
    "lte": Profile("lte", 5, 300, jitter_ms=20),
}
AGENTS = ("plain", "edge", "proxy")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


class _Net:
    """A device netns with one veth to the host; nothing is left behind on close."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(10)}"
        self.ns, self.veth = f"dpwan{tag}", f"dpwan{tag}h"
        a, b = 180 + os.getpid() % 20, random.randrange(256)
        self.host_ip, self.dev_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dirs: list[str] = []
        self.mode = ""  # "netem" (tc on a veth) or "tun" (tests.bench.wanemu)
        self.emu: Optional[subprocess.Popen[str]] = None

    def up(self) -> None:
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
             "netns", self.ns)
        if _run("tc", "qdisc", "add", "dev", self.veth, "root", "netem", "delay", "1ms",
                check=False).returncode == 0:
            self.mode = "netem"
            _run("tc", "qdisc", "del", "dev", self.veth, "root")
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth)
            _run("ip", "link", "set", self.veth, "up")
            _run("ip", "-n", self.ns, "addr", "add", f"{self.dev_ip}/30", "dev", "eth0")
            _run("ip", "-n", self.ns, "link", "set", "eth0", "up")
            _run("ip", "-n", self.ns, "link", "set", "lo", "up")
            _run("ip", "-n", self.ns, "route", "add", "default", "via", self.host_ip)
            # offloads would hand netem 64 KiB super-packets: its loss acts per packet
            if shutil.which("ethtool"):
                for argv in (["ethtool", "-K", self.veth],
                             _ns(self.ns, "ethtool", "-K", "eth0")):
                    _run(*argv, "tso", "off", "gso", "off", "gro", "off", check=False)
            return
        # no sch_netem in this kernel: the same treatment in user space, on a TUN pair
        _run("ip", "link", "del", self.veth)
        self.mode = "tun"
        self.emu = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.wanemu", self.veth, f"{self.veth}d", self.ns,
             self.host_ip, self.dev_ip], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None, text=True, cwd=str(Path(__file__).resolve().parents[2]))
        self.procs.append(self.emu)  # type: ignore[arg-type]
        assert self.emu.stdout is not None
        line = self.emu.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"wanemu did not start ({line!r}, exit {self.emu.poll()})")

    def shape(self, p: Profile) -> None:
        if self.mode == "netem":
            _run("tc", "qdisc", "replace", "dev", self.veth, "root", "netem", *p.netem())
            _run(*_ns(self.ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
                      *p.netem()))
            return
        assert self.emu is not None and self.emu.stdin and self.emu.stdout
        self.emu.stdin.write(f"{p.mbit} {p.rtt_ms / 2} {p.jitter_ms} {p.loss_pct} "
                             f"{p.limit}\n")
        self.emu.stdin.flush()
        if self.emu.stdout.readline().strip() != "ok":
            raise RuntimeError("wanemu did not take the profile")

    def rtt_ms(self, port: int) -> float:
        """Median TCP connect time from the device to ``host_ip:port`` (one round trip)."""
        code = ("import socket,statistics,sys,time\nts=[]\nfor _ in range(7):\n"
                " t=time.perf_counter();s=socket.create_connection((sys.argv[1],"
                "int(sys.argv[2])),10);ts.append(time.perf_counter()-t);s.close();"
                "time.sleep(0.1)\nprint(statistics.median(ts)*1000)")
        out = _run(*_ns(self.ns, sys.executable, "-c", code, self.host_ip, str(port)),
                   check=False)
        try:
            return round(float(out.stdout.strip()), 1)
        except ValueError:
            return 0.0

    def close(self) -> None:
        if self.emu is not None and self.emu.stdin is not None:
            self.emu.stdin.close()  # EOF stops it; its TUN interfaces go with it
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        _run("ip", "link", "del", self.veth, check=False)
        _run("ip", "netns", "del", self.ns, check=False)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


class _Sshd:
    """An OpenSSH sshd (root, key only) listening on ``listen`` in netns ``ns`` (or the
    host), with its own client key."""

    def __init__(self, net: _Net, listen: str, ns: Optional[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dpwan-sshd-"))
        net.dirs.append(str(self.dir))
        self.port, self.listen, self.ns = free_port(), listen, ns
        d = self.dir
        for key in ("host_key", "client_key"):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key))
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(f"""\
ListenAddress {listen}
HostKey {d / 'host_key'}
PidFile none
UsePAM no
StrictModes no
AuthorizedKeysFile {d / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
GatewayPorts clientspecified
Subsystem sftp internal-sftp
PrintMotd no
SetEnv SHLVL=1
LogLevel ERROR
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        argv = ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config"), "-p", str(self.port)]
        log = (d / "sshd.log").open("ab")
        proc = subprocess.Popen(_ns(ns, *argv) if ns else argv, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
        net.procs.append(proc)
        ss = ["ss", "-Htln", "sport", f"= :{self.port}"]
        wait_for(lambda: bool(_run(*(_ns(ns, *ss) if ns else ss)).stdout.strip()),
                 "sshd listening", 20)

    def ssh(self, host: str, port: Optional[int] = None, *extra: str) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-i", str(self.dir / "client_key"),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-p", str(port or self.port), *extra, f"root@{host}"]


class _ReverseForward:
    """``ssh -N -R`` from the device netns to the server's sshd, as OpenSSH would do it."""

    ALLOCATED = re.compile(rb"Allocated port (\d+) for remote forward")

    def __init__(self, net: _Net, server: _Sshd, target: int) -> None:
        self.err = server.dir / f"ssh-R-{time.monotonic_ns()}.log"
        argv = server.ssh(net.host_ip, None, "-v", "-N", "-o", "ExitOnForwardFailure=yes",
                          "-o", "ServerAliveInterval=30",
                          "-R", f"127.0.0.1:0:127.0.0.1:{target}")
        with self.err.open("wb") as err:
            self.proc = subprocess.Popen(_ns(net.ns, *argv), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.ALLOCATED.search(self.err.read_bytes())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.close()
        raise RuntimeError("ssh -R gave no port: " + self.err.read_text(errors="replace")[-600:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _tinyproxy(net: _Net, port: int) -> None:
    d = tempfile.mkdtemp(prefix="dpwan-tinyproxy-")
    net.dirs.append(d)
    os.chmod(d, 0o755)
    conf = Path(d) / "tinyproxy.conf"
    conf.write_text("\n".join([f"Port {port}", "Listen 127.0.0.1", "Timeout 600",
                               "MaxClients 50", "Allow 127.0.0.1", "LogLevel Warning",
                               "DisableViaHeader Yes", ""]))
    conf.chmod(0o644)
    exe = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    log = open(Path(d) / "tinyproxy.log", "ab")
    net.procs.append(subprocess.Popen(
        _ns(net.ns, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", exe,
            "-d", "-c", str(conf)), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL))
    log.close()
    wait_for(lambda: bool(_run(*_ns(net.ns, "ss", "-Htln", "sport", f"= :{port}")).stdout
                          .strip()), "tinyproxy listening", 15)


def _first_output(argv: list[str], env: Optional[dict[str, str]] = None) -> float:
    """Seconds from start until the command's first stdout byte (it must then exit 0)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    t = time.perf_counter() - t0
    _, err = proc.communicate(timeout=120)
    if not first or proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... exit {proc.returncode}: {err[-300:]!r}")
    return t


def _push_rate(argv: list[str], nbytes: int) -> float:
    """MB/s at the receiver from its first quarter of the bytes to the last byte: log-in,
    exit, slow start and whatever piled up before the command started reading (up to a
    window's worth) are not counted. The device stamps the times (same clock as ours)."""
    skip = nbytes // 4
    recv = f"head -c {skip} >/dev/null; date +%s.%N; cat >/dev/null; date +%s.%N"
    proc = subprocess.Popen([*argv, recv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    zeros = bytes(CHUNK)
    left = nbytes
    while left > 0:
        n = min(left, CHUNK)
        proc.stdin.write(zeros[:n])
        left -= n
    proc.stdin.close()
    out = proc.stdout.read()
    err = proc.stderr.read() if proc.stderr else b""
    proc.wait(60)
    stamps = out.split()
    if proc.returncode != 0 or len(stamps) != 2:
        raise RuntimeError(f"push: exit {proc.returncode}, {out[-200:]!r} {err[-300:]!r}")
    return round((nbytes - skip) / max(float(stamps[1]) - float(stamps[0]), 1e-3) / 1e6, 3)


def _pull_rate(argv: list[str], nbytes: int) -> float:
    proc = subprocess.Popen([*argv, f"head -c {nbytes} /dev/zero"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    got, first, mark = 0, 0.0, 0
    while True:
        chunk = proc.stdout.read1(CHUNK)  # type: ignore[attr-defined]
        if not chunk:
            break
        got += len(chunk)
        if not first and got >= nbytes // 4:  # as push: slow start not counted
            first, mark = time.perf_counter(), got
    last = time.perf_counter()
    proc.wait(60)
    if got != nbytes:
        raise RuntimeError(f"pull: got {got} of {nbytes} bytes (exit {proc.returncode})")
    return round((nbytes - mark) / max(last - first, 1e-3) / 1e6, 3)


def _scp(argv: list[str], src: str, dst: str) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(["scp", "-q", *argv, src, dst], capture_output=True, timeout=1800,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"scp {dst} failed: {out.stderr[-300:]!r}")
    return time.perf_counter() - t0


def _ssh_opts(argv: list[str]) -> tuple[list[str], str]:
    """An ssh argv (…, -p PORT, [extra], user@host) as scp options and its user@host."""
    i = argv.index("-p")
    opts = [a for a in argv[1:i] if a != "-F" and a != "/dev/null"]
    return ["-F", "/dev/null", *opts, "-P", argv[i + 1]], argv[-1]


def run_wan(work: Path, profiles: list[Profile], *, reps: int, seconds: float,
            scp_mb: int, exec_reps: int) -> dict[str, Any]:
    net = _Net()
    stack: Optional[Stack] = None
    result: dict[str, Any] = {"profiles": {}, "settings": {
        "reps": reps, "transfer_s": seconds, "scp_MB": scp_mb, "exec_reps": exec_reps}}
    try:
        net.up()
        eport = free_port()
        stack = Stack(dir=work / "stack", broker_port=free_port(), tunnel_port=free_port(),
                      api_port=free_port(), port_range="31000-31099", public_host=net.host_ip,
                      extra=("--edge-listen", f"{net.host_ip}:{eport}"))
        stack.start()
        pport = free_port()
        _tinyproxy(net, pport)
        for name in AGENTS:
            tok = stack.enrol(f"wan-{name}")
            if name == "plain":  # the plain ports: drop the edge from the token
                tok = dataclasses.replace(parse_token(tok), edge=None).encode()
            conf = work / f"wan-{name}.toml"
            conf.write_text(f'proxy = "http://127.0.0.1:{pport}"\n' if name == "proxy"
                            else 'proxy = "none"\n')
            stack.start_agent(tok, work / f"agent-{name}", netns=net.ns,
                              extra=("--config", str(conf), "--log-level", "info"))
        for name in AGENTS:
            stack.wait_online(f"wan-{name}", 60)
        server = _Sshd(net, net.host_ip, None)
        device = _Sshd(net, "0.0.0.0", net.ns)
        blob = work / "scp.bin"
        with blob.open("wb") as f:
            f.write(os.urandom(scp_mb * 1_000_000))
        for p in profiles:
            net.shape(p)
            print(f"wan: profile {p.name} ({p.mbit:g} Mbit/s, {p.rtt_ms:g} ms, "
                  f"loss {p.loss_pct:g}%, jitter {p.jitter_ms:g} ms)", file=sys.stderr)
            res = result["profiles"][p.name] = {"profile": dataclasses.asdict(p),
                                                "emulation": net.mode,
                                                "rtt_ms": net.rtt_ms(server.port),
                                                "errors": {}}
            try:
                _profile(net, stack, server, device, p, res, blob, reps=reps,
                         seconds=seconds, exec_reps=exec_reps)
            except Exception as exc:  # the other profiles still run
                res["errors"]["profile"] = f"{type(exc).__name__}: {exc}"
            _ratios(res, p)
            print(json.dumps(res.get("ratios", {})), file=sys.stderr)
    finally:
        if stack is not None:
            stack.close()
        net.close()
    return result


def _profile(net: _Net, stack: Stack, server: _Sshd, device: _Sshd, p: Profile,
             res: dict[str, Any], blob: Path, *, reps: int, seconds: float,
             exec_reps: int) -> None:
    from dpanel_server.client import ApiClient
    from dpanel_server.config import load_config

    api = ApiClient(load_config(stack.config))
    env = stack.env
    key = str(stack.dir / "keys" / "manager_key")

    def tunnel_argv(name: str) -> list[str]:
        port = api.call("POST", f"/v1/devices/wan-{name}/tunnel", {})["port"]
        return ["ssh", "-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-p", str(port), "dpanel@127.0.0.1"]

    nbytes = int(p.link_MBps * 1e6 * seconds)
    rf = _ReverseForward(net, server, device.port)
    try:
        rport = rf.wait()
        paths: dict[str, list[str]] = {"openssh": device.ssh("127.0.0.1", rport)}
        for name in AGENTS:
            paths[name] = tunnel_argv(name)
        tput: dict[str, dict[str, list[float]]] = {k: {"push": [], "pull": []} for k in paths}
        for _ in range(reps):  # interleaved, so that load hits every path alike
            for k, argv in paths.items():
                try:
                    tput[k]["push"].append(_push_rate(argv, nbytes))
                    tput[k]["pull"].append(_pull_rate(argv, nbytes))
                except Exception as exc:
                    res["errors"][f"throughput {k}"] = f"{type(exc).__name__}: {exc}"
        res["throughput_MBps"] = {k: {d: median(v) for d, v in t.items()}
                                  for k, t in tput.items()}
        res["bytes"] = nbytes

        # time to first output
        echo = ["echo", "x"]
        ttfo: dict[str, list[float]] = {"openssh_open": [], "openssh_fresh": []}
        for _ in range(exec_reps):
            ttfo["openssh_open"].append(_first_output([*paths["openssh"], *echo]))
        rf.close()
        for _ in range(exec_reps):
            t0 = time.perf_counter()
            fresh = _ReverseForward(net, server, device.port)
            try:
                port = fresh.wait()
                up = time.perf_counter() - t0
                ttfo["openssh_fresh"].append(up + _first_output(
                    [*device.ssh("127.0.0.1", port), *echo]))
            finally:
                fresh.close()
        for name in AGENTS:
            dev = f"wan-{name}"
            cold, warm = [], []
            for _ in range(exec_reps):
                api.call("DELETE", f"/v1/devices/{dev}/tunnel")
                # the agent's teardown is one message away: let it land
                time.sleep(1.0 + 2 * p.rtt_ms / 1000)
                cold.append(_first_output([str(BIN / "dpanel"), "exec", dev, "--", *echo], env))
                warm.append(_first_output([str(BIN / "dpanel"), "exec", dev, "--", *echo], env))
            ttfo[f"{name}_cold"], ttfo[f"{name}_warm"] = cold, warm
        floor = [_first_output([str(BIN / "dpanel"), "--version"]) for _ in range(2)]
        res["cli_startup_s"] = round(float(median(floor) or 0), 3)
        rtt = (res["rtt_ms"] or p.rtt_ms) / 1000
        res["first_output_s"] = {k: round(float(median(v) or 0), 3) for k, v in ttfo.items()}
        res["first_output_rtts"] = {k: round(v / rtt, 1)
                                    for k, v in res["first_output_s"].items()}

        # scp up: through the tunnel vs straight to the device's sshd over the same link
        t_opts, t_host = _ssh_opts(tunnel_argv("plain"))
        d_opts, d_host = _ssh_opts(device.ssh(net.dev_ip))
        remote = f"/tmp/dpwan-scp-{os.getpid()}"
        size = blob.stat().st_size
        tunnel_s = _scp(t_opts, str(blob), f"{t_host}:{remote}.t")
        direct_s = _scp(d_opts, str(blob), f"{d_host}:{remote}.d")
        for suffix in (".t", ".d"):
            Path(remote + suffix).unlink(missing_ok=True)  # the netns shares our /tmp
        res["scp_up_MBps"] = {"tunnel": round(size / tunnel_s / 1e6, 3),
                              "direct": round(size / direct_s / 1e6, 3)}
    finally:
        rf.close()


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 2) if a and b else None


def _ratios(res: dict[str, Any], p: Profile) -> None:
    t = res.get("throughput_MBps", {})
    f = res.get("first_output_s", {})
    s = res.get("scp_up_MBps", {})
    r: dict[str, Any] = {}
    for d in ("push", "pull"):
        ours, theirs = t.get("plain", {}).get(d), t.get("openssh", {}).get(d)
        r[f"{d}_vs_openssh"] = _ratio(ours, theirs)
        r[f"{d}_vs_link"] = _ratio(ours, p.link_MBps)
        r[f"{d}_proxy_vs_edge"] = _ratio(t.get("proxy", {}).get(d), t.get("edge", {}).get(d))
        r[f"{d}_edge_vs_plain"] = _ratio(t.get("edge", {}).get(d), ours)
    r["cold_exec_vs_open_ssh_R"] = _ratio(f.get("plain_cold"), f.get("openssh_open"))
    r["cold_exec_vs_fresh_ssh_R"] = _ratio(f.get("plain_cold"), f.get("openssh_fresh"))
    r["cold_exec_proxy_vs_edge"] = _ratio(f.get("proxy_cold"), f.get("edge_cold"))
    r["scp_tunnel_vs_direct"] = _ratio(s.get("tunnel"), s.get("direct"))
    res["ratios"] = r


def fit_round_trips(result: dict[str, Any]) -> dict[str, Any]:
    """Per path, time to first output = fixed + k x RTT over the profiles (least squares):
    k is the number of round trips on the critical path, the rest is local work."""
    out: dict[str, Any] = {}
    profiles = [r for r in result["profiles"].values() if r.get("first_output_s")]
    if len(profiles) < 2:
        return out
    for key in profiles[0]["first_output_s"]:
        pts = [((r["rtt_ms"] or r["profile"]["rtt_ms"]) / 1000, r["first_output_s"][key])
               for r in profiles if key in r["first_output_s"]]
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        if n < 2 or not sxx:
            continue
        k = sum((x - mx) * (y - my) for x, y in pts) / sxx
        out[key] = {"round_trips": round(k, 1), "fixed_s": round(my - k * mx, 3)}
    return out


def table(result: dict[str, Any]) -> str:
    rows = ["| profile | TCP RTT | push / pull MB/s: plain, edge, proxy, OpenSSH | vs OpenSSH "
            "| vs link | cold exec s (RTTs): plain, edge, proxy | open / fresh ssh -R s (RTTs) "
            "| scp up tunnel / direct MB/s |",
            "|---|---|---|---|---|---|---|---|"]
    for name, res in result["profiles"].items():
        t = res.get("throughput_MBps", {})
        f, fr = res.get("first_output_s", {}), res.get("first_output_rtts", {})
        r, s = res.get("ratios", {}), res.get("scp_up_MBps", {})

        def pp(k: str, t: dict[str, Any] = t) -> str:
            return f"{t.get(k, {}).get('push')} / {t.get(k, {}).get('pull')}"

        def fo(k: str, f: dict[str, Any] = f, fr: dict[str, Any] = fr) -> str:
            return f"{f.get(k)} ({fr.get(k)})"

        rows.append(
            f"| {name} | {res.get('rtt_ms')} ms | {pp('plain')}; {pp('edge')}; "
            f"{pp('proxy')}; {pp('openssh')} | {r.get('push_vs_openssh')} / "
            f"{r.get('pull_vs_openssh')} | {r.get('push_vs_link')} / {r.get('pull_vs_link')} | "
            f"{fo('plain_cold')}; {fo('edge_cold')}; {fo('proxy_cold')} | "
            f"{fo('openssh_open')} / {fo('openssh_fresh')} | "
            f"{s.get('tunnel')} / {s.get('direct')} |")
        if res.get("errors"):
            rows.append(f"|  errors: {res['errors']} |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.wan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/bench-wan"))
    p.add_argument("--profiles", default=",".join(PROFILES),
                   help=f"comma-separated, of {', '.join(PROFILES)}")
    p.add_argument("--reps", type=int, default=1, help="throughput repetitions (1)")
    p.add_argument("--exec-reps", type=int, default=3, help="first-output repetitions (3)")
    p.add_argument("--seconds", type=float, default=8.0,
                   help="each transfer is this many seconds at the link rate (8)")
    p.add_argument("--scp-mb", type=int, default=50)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench wan: needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    try:
        chosen = [PROFILES[n] for n in args.profiles.split(",") if n]
    except KeyError as exc:
        print(f"bench wan: --profiles: unknown profile {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dpwan-"))
    try:
        res = run_wan(work, chosen, reps=args.reps, seconds=args.seconds, scp_mb=args.scp_mb,
                      exec_reps=args.exec_reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["round_trips_fit"] = fit_round_trips(res)
    tmp = args.out / "wan.json.tmp"
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    os.replace(tmp, args.out / "wan.json")
    print(table(res))
    for key, f in res["round_trips_fit"].items():
        print(f"first output {key}: {f['round_trips']} round trips + {f['fixed_s']} s")
    print(f"\nwrote {args.out / 'wan.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

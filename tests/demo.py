"""The README demo: stack up, enrol ``demo``, run its agent behind "NAT", exec through it.

As root, the device runs in its own network namespace joined to the host by a veth
pair: it can dial out to the broker and tunnel, and nothing can dial in (its SSH server
listens only on the namespace's own loopback). Without root it runs on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from support import device_link, free_port, stop_proc, wait_for

__all__ = ["main"]

NS_HOST_IP, NS_DEV_IP = "10.231.0.1", "10.231.0.2"


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


class Steps:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []
        self._t = time.monotonic()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        print(f"==> {what}", flush=True)
        start = time.monotonic()
        yield
        self.rows.append((what, time.monotonic() - start))

    def table(self) -> str:
        width = max(len(w) for w, _ in self.rows)
        lines = [f"  {w:<{width}}  {t * 1000:8.0f} ms" for w, t in self.rows]
        return "\n".join(["step timings:", *lines])


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def _namespace() -> Iterator[Optional[str]]:
    """A network namespace for the device, or None when we cannot make one."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("    (not root: the device runs on the host, not in a namespace)")
        yield None
        return
    ns, veth = f"dpanel-demo-{os.getpid()}", f"dpd{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", ns)
        device_link(ns, veth, NS_HOST_IP, NS_DEV_IP)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"    (no network namespace: {exc}; the device runs on the host)")
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        yield None
        return
    try:
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def demo(state: Path) -> int:
    steps = Steps()
    dpanel = _bin("dpanel")
    env = dict(os.environ, DPANEL_CONFIG=str(state / "server.toml"))

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([dpanel, *args], env=env, capture_output=True, text=True,
                              check=check, stdin=subprocess.DEVNULL)

    with _namespace() as ns:
        public = NS_HOST_IP if ns else None
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with steps.step("start Mosquitto, public tunnel and manager"):
                argv = [dpanel, "stack", "up", "--dir", str(state), "--log-level", "warning",
                        "--broker-port", str(free_port()), "--tunnel-port", str(free_port()),
                        "--api-port", str(free_port())]
                if public:
                    argv += ["--public-host", public]
                procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
                wait_for(lambda: (state / "server.toml").exists() and cli(
                    "device", "list", check=False).returncode == 0, "stack start", 30)
            with steps.step("enrol device 'demo'"):
                token = cli("device", "add", "demo", "--print-token").stdout.strip()
            with steps.step("start dpanel-tunnel <TOKEN> on the device"):
                agent = [_bin("dpanel-tunnel"), token, "--state-dir", str(state / "device")]
                if ns:
                    agent = ["ip", "netns", "exec", ns, *agent]
                procs.append(subprocess.Popen(agent, stdin=subprocess.DEVNULL))

                def online() -> bool:
                    out = cli("device", "show", "demo", check=False)
                    return out.returncode == 0 and bool(json.loads(out.stdout)["online"])

                wait_for(online, "device online", 60)
            for label in ("dpanel exec demo -- uname -a   (cold: opens the tunnel)",
                          "dpanel exec demo -- uname -a   (warm: tunnel open)"):
                with steps.step(label):
                    out = cli("exec", "demo", "--", "uname", "-a", check=False)
                print(out.stdout + out.stderr, end="", flush=True)
                if out.returncode != 0:
                    print(f"demo: exec failed with exit code {out.returncode}")
                    return 1
        finally:
            for p in reversed(procs):
                stop_proc(p)
    print(steps.table())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dpanel-demo", description=__doc__)
    p.add_argument("--dir", help="state directory (default: a fresh temp dir, removed after)")
    args = p.parse_args(argv)
    try:
        if args.dir:
            return demo(Path(args.dir))
        with tempfile.TemporaryDirectory(prefix="dpanel-demo-") as d:
            return demo(Path(d))
    except TimeoutError as exc:  # a step that never happened: one line, not a traceback
        raise SystemExit(f"demo: {exc}") from None


if __name__ == "__main__":
    raise SystemExit(main())

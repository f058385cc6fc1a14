"""Image pipeline benchmarks: freeze, build, provision, size, start-up.

``python -m tests.bench.run --with-image`` runs them as its "image" section;
``invoke image.bench`` (``python -m tests.bench.image``) alone prints the JSON.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from dpanel_image.arches import Arch, host_arch
from dpanel_image.board import load_board
from dpanel_image.build import build_image
from dpanel_image.debroot import locked
from dpanel_image.disk import make_disk
from dpanel_image.freeze import FreezeMode, agent_key, build_agent, run_frozen
from dpanel_image.provision import provision
from dpanel_image.synthetic import root_tree, synthetic_base
from dpanel_image.util import cache_root, log
from dpanel_proto.token import DeviceToken

__all__ = ["run_bench"]

def _key() -> str:
    import asyncssh  # host-side only: a real key, so the agent accepts the token

    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def _token(name: str, host: str = "10.0.2.2") -> str:
    key = _key()
    return DeviceToken(name, secrets.token_urlsafe(32), f"mqtt://{host}:1883",
                       f"{host}:2220", key, key).encode()


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    r = fn(*args, **kw)
    return r, time.monotonic() - t0


def _big_base(arch: Arch, size_gib: int = 4, data_gib: float = 1.0) -> Path:
    """A 4 GiB rpi-layout image with 1 GiB of real (incompressible) data, cached."""
    dest = cache_root() / f"bench-rpi-{arch}-{size_gib}g-{data_gib}.img"
    with locked(dest):
        if not dest.exists():
            with tempfile.TemporaryDirectory(dir=dest.parent) as td:
                root, boot = Path(td) / "root", Path(td) / "boot"
                boot.mkdir()
                (boot / "config.txt").write_text("arm_64bit=1\n")
                root_tree(root, arch, load_board("rpi"))
                with open(root / "usr" / "filler", "wb") as f:
                    for _ in range(int(data_gib * 1024)):
                        f.write(os.urandom(1 << 20))
                tmp = Path(td) / "img"
                make_disk(tmp, [("vfat", 512, "bootfs", boot),
                                ("ext4", size_gib * 1024 - 513, "rootfs", root)])
                os.replace(tmp, dest)
    return dest


def _start_times(path: Path, arch: Arch, root: Path, runs: int = 3) -> dict[str, float]:
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        run_frozen(path, arch, root, ["--version"])
        times.append(time.monotonic() - t0)
    return {"first_s": round(times[0], 3), "median_s": round(statistics.median(times), 3)}


def _idle_rss_kb(path: Path, seconds: float = 8.0) -> int:
    """RSS of a host-arch frozen agent idling (its broker is unreachable), bootloader included."""
    with tempfile.TemporaryDirectory() as td:
        # Broker and tunnel on a closed loopback port: the agent idles in its retry loop.
        proc = subprocess.Popen([str(path), "--state-dir", td, _token("bench-rss",
                                                                      "127.0.0.1")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(seconds)
            pids = [proc.pid] + [int(p) for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]
            total = 0
            for pid in pids:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            return total
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(10)


def run_bench(arch: Arch = "arm64", cold: bool = True,
              cold_root: bool = False) -> dict[str, Any]:
    """Timings of the image pipeline.

    ``cold`` refreezes the agent with its build root cached (the common CI case after the
    first run); ``cold_root`` also times building that root from nothing, in a throwaway
    cache (minutes under emulation: ~2.5 min for arm64, ~6.5 min for armhf).
    """
    res: dict[str, Any] = {"arch": arch}
    if cold_root:
        old = os.environ.get("DPANEL_CACHE")
        with tempfile.TemporaryDirectory(prefix="dpanel-cold-") as td:
            os.environ["DPANEL_CACHE"] = td
            try:
                with tempfile.TemporaryDirectory() as dist:
                    _, secs = _timed(build_agent, arch, "onefile", Path(dist))
                res["build_agent_cold_root_s"] = round(secs, 1)
            finally:
                if old is None:
                    os.environ.pop("DPANEL_CACHE", None)
                else:
                    os.environ["DPANEL_CACHE"] = old
    modes: tuple[FreezeMode, ...] = ("onefile", "onedir")
    for mode in modes:
        entry = cache_root() / f"agent-{arch}-{mode}-{agent_key(arch, mode)}"
        if cold:
            shutil.rmtree(entry, ignore_errors=True)
        r, secs = _timed(build_agent, arch, mode)
        res[f"build_agent_{mode}_s"] = round(secs, 1)
        res[f"build_agent_{mode}_was_cached"] = r.cached
        _, secs = _timed(build_agent, arch, mode)
        res[f"build_agent_{mode}_cached_s"] = round(secs, 2)
        if mode == "onefile":
            res["binary_size_mb"] = round(r.path.stat().st_size / 1e6, 2)
            onefile = r
        else:
            res["onedir_size_mb"] = round(sum(p.stat().st_size for p in r.path.parent.rglob("*")
                                              if p.is_file()) / 1e6, 2)
        res[f"start_{mode}"] = _start_times(r.path, arch, r.root)
    if host_arch() == arch:
        res["idle_rss_kb"] = _idle_rss_kb(onefile.path)
    with tempfile.TemporaryDirectory(prefix="dpanel-bench-") as td:
        out = Path(td)
        small = synthetic_base(load_board("rpi"), arch)
        _, res["build_image_small_s"] = _timed(build_image, "rpi", out / "small", base=small,
                                               agent=onefile.path, arch=arch)
        log("bench: making a 4 GiB base with 1 GiB of data (cached)")
        big = _big_base(arch)
        b, res["build_image_4g_s"] = _timed(build_image, "rpi", out / "big", base=big,
                                            agent=onefile.path, arch=arch, compression="none")
        n = 5
        tokens = {f"bench-{i:02d}": _token(f"bench-{i:02d}") for i in range(1, n + 1)}
        devs, secs = _timed(provision, b.image, out=out / "devices", count=n, prefix="bench-",
                            enrol=tokens.__getitem__)
        res["provision_4g_per_device_s"] = round(secs / n, 3)
        res["provision_4g_max_s"] = round(max(d.seconds for d in devs), 3)
    for k, v in list(res.items()):
        if isinstance(v, float):
            res[k] = round(v, 2)
    return res


if __name__ == "__main__":
    import json

    print(json.dumps(run_bench(), indent=2))

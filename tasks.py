#!/usr/bin/env python3
"""Project tasks for dPanel Edge (invoke), plus a stdlib-only bootstrap.

From a fresh Debian 12 machine, ``python3 tasks.py <task>`` installs what the project
needs (Debian packages, the venv) idempotently, then runs ``invoke <task>`` inside the
venv. So the README's two commands are ``python3 tasks.py demo`` and
``python3 tasks.py test``. Once bootstrapped, ``.venv/bin/invoke --list`` shows the rest.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"

#: Debian packages the demo and the test suite use. --no-install-recommends keeps
#: qemu-system-arm from pulling a GUI stack (1.27 GB otherwise).
APT_PACKAGES = [
    "python3-venv", "python3-dev", "mosquitto", "mosquitto-clients", "openssh-client", "rsync",
    "openssh-server", "iproute2", "sqlite3", "file", "xz-utils", "zstd",
    "qemu-user-static", "binfmt-support", "mmdebstrap", "qemu-system-arm", "qemu-system-x86",
    "qemu-utils", "e2fsprogs", "mtools", "dosfstools", "fdisk", "bmap-tools",
    "systemd-container", "arch-test", "ca-certificates", "debian-archive-keyring",
    "tinyproxy", "nftables",  # field-network tests (only-443 netns, HTTP CONNECT proxy)
    "ethtool",  # invoke bench --wan: offloads off on the netem veth
    "postgresql-15",
    "rabbitmq-server",  # tests/integration/test_broker_rabbitmq.py: a real 2-node cluster
    "chromium",  # tests/integration/test_web_panel.py: the web panel in a real browser
]

#: The web panel's terminal (xterm.js + its fit addon) from the npm registry: pinned
#: version and the registry's sha512 integrity; (tarball member, file in the package dir).
WEB_VENDOR = ROOT / "server" / "dpanel_server" / "web" / "vendor"
NPM_PACKAGES = [
    ("@xterm/xterm", "5.5.0", "sha512-hqJHYaQb5OptNunnyAnkHyM8aCjZ1MEIDTQu1iIbbTD/xops91NB5yq1"
     "ZK/dC2JDbVWtF23zUtl9JE2NqwT87A==",
     [("package/lib/xterm.js", "xterm.js"), ("package/css/xterm.css", "xterm.css"),
      ("package/LICENSE", "xterm.LICENSE")]),
    ("@xterm/addon-fit", "0.10.0", "sha512-UFYkDm4HUahf2lnEyHvio51TNGiLK66mqP2JoATy7hRZeXaGMR"
     "Dr00JiSF7m63vR5WKATF605yEggJKsw0JpMQ==",
     [("package/lib/addon-fit.js", "addon-fit.js"), ("package/LICENSE", "addon-fit.LICENSE")]),
]


def fetch_web_vendor() -> None:
    """xterm.js into the package dir, from the npm registry once per version (cached in
    ~/.cache/dpanel/npm, checked against the pinned sha512); idempotent and stdlib only.
    Fetched, not committed: minified third-party code in git is unreviewable diffs."""
    import base64
    import io
    import tarfile
    import urllib.request

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpanel" / "npm"
    stamp = WEB_VENDOR / ".versions"
    want = " ".join(f"{n}@{v}" for n, v, _i, _f in NPM_PACKAGES)
    if stamp.exists() and stamp.read_text() == want and all(
            (WEB_VENDOR / dst).exists() for *_x, files in NPM_PACKAGES for _s, dst in files):
        return
    WEB_VENDOR.mkdir(parents=True, exist_ok=True)
    for name, version, integrity, files in NPM_PACKAGES:
        tgz = cache / f"{name.replace('/', '__')}-{version}.tgz"
        algo, _, digest = integrity.partition("-")
        def ok(data: bytes, algo: str = algo, digest: str = digest) -> bool:
            return base64.b64encode(hashlib.new(algo, data).digest()).decode() == digest
        data = tgz.read_bytes() if tgz.exists() else b""
        if not ok(data):
            url = f"https://registry.npmjs.org/{name}/-/{name.split('/')[-1]}-{version}.tgz"
            print(f"bootstrap: fetching {url}", flush=True)
            with urllib.request.urlopen(url, timeout=60) as r:  # a fixed https URL
                data = r.read()
            if not ok(data):
                raise SystemExit(f"bootstrap: {name}@{version}: the tarball does not match "
                                 f"its pinned integrity {integrity}")
            cache.mkdir(parents=True, exist_ok=True)
            tmp = tgz.with_suffix(f".{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(tgz)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member, dst in files:
                f = tar.extractfile(member)
                if f is None:
                    raise SystemExit(f"bootstrap: {name}@{version} has no {member}")
                tmp = WEB_VENDOR / f".{dst}.{os.getpid()}"
                tmp.write_bytes(f.read())
                tmp.replace(WEB_VENDOR / dst)
    stamp.write_text(want)


def _bootstrap() -> None:
    """Install Debian packages, the venv and the web panel's xterm.js if missing; cheap
    when nothing changed."""
    fetch_web_vendor()
    missing = [p for p in APT_PACKAGES if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True,
    ).stdout.strip() != "install ok installed"]
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print(f"bootstrap: apt-get install {' '.join(missing)}", flush=True)
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        *missing], check=True, env=env, stdin=subprocess.DEVNULL)
    stamp = VENV / ".dpanel-stamp"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != want:
        if not (VENV / "bin" / "python").exists():
            print("bootstrap: creating .venv", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q",
               "--disable-pip-version-check"]
        subprocess.run([*pip, "-e", f"{ROOT}[server,dev]"], check=True)
        stamp.write_text(want)


if __name__ == "__main__":
    _bootstrap()
    invoke = shutil.which("invoke", path=str(VENV / "bin"))
    assert invoke is not None
    os.chdir(ROOT)
    os.execv(invoke, [invoke, *sys.argv[1:]])

# ----------------------------------------------------------------------------- invoke

from invoke import Collection, Context, task  # noqa: E402

# The task modules live outside the product packages (the .deb ships dpanel_deploy and
# dpanel_image, and invoke is a dev-only dependency): top-level modules beside them.
sys.path.insert(0, str(ROOT / "server"))
sys.path.insert(0, str(ROOT / "image"))
from deploy_tasks import server_ns  # noqa: E402
from image_tasks import agent_ns, image_ns  # noqa: E402

PY = str(VENV / "bin" / "python")


@task
def lint(c: Context) -> None:
    """Run ruff and mypy --strict over the code."""
    c.run(f"{PY} -m ruff check agent server image tests tasks.py")
    c.run(f"{PY} -m mypy")


@task(help={"k": "only tests matching this pytest -k expression",
            "fast": "skip tests marked slow (ARM builds, booted images)"})
def test(c: Context, k: str = "", fast: bool = False) -> None:
    """Run the whole suite: lint, unit, integration and system tests."""
    lint(c)
    args = ["-m", "not slow"] if fast else []
    if k:
        args += ["-k", k]
    c.run(f"{PY} -m pytest -p no:cacheprovider --durations=40 {shlex.join(args)}", pty=False)


@task(help={"dir": "state directory for the demo stack (default: a temp dir)"})
def demo(c: Context, dir: str = "") -> None:
    """Start broker, tunnel and manager on loopback, enrol 'demo', exec through it."""
    extra = f" --dir {dir}" if dir else ""
    c.run(f"{PY} -m tests.demo{extra}", pty=False)


@task(help={"out": "directory for bench.json and bench.png"})
def bench(c: Context, out: str = "out/bench", wan: bool = False, wan_section: str = "all",
          scale: bool = False) -> None:
    """Benchmark against OpenSSH on this machine; writes JSON + PNG and prints ratios.
    ``--wan``: instead, network namespaces (root): ``emulated`` = dPanel against OpenSSH
    on three emulated WANs (tests/bench/wan.py, ~15 min), ``idle`` = idle bytes on the wire
    and presence per link profile (tests/bench/wire.py, ~30 min); ``--wan-section`` picks
    one (default ``all``: both).
    ``--scale``: instead, fleet size: devices per broker, a reconnect storm after a broker
    restart, a manager with 10,000 devices, enrolment rates (tests/bench/scale_out.py)."""
    if scale:
        c.run(f"{PY} -m tests.bench.scale_out --out {out}-scale", pty=False)
        return
    if wan:
        if wan_section not in ("all", "emulated", "idle"):
            raise SystemExit(f"--wan-section: {wan_section!r} is not all, emulated or idle")
        if wan_section in ("all", "emulated"):
            c.run(f"{PY} -m tests.bench.wan --out {out}-wan", pty=False)
        if wan_section in ("all", "idle"):
            c.run(f"{PY} -m tests.bench.wire --out {out}-wire", pty=False)
        return
    c.run(f"{PY} -m tests.bench.run --out {out}", pty=False)


ns = Collection(lint, test, demo, bench)
ns.add_collection(agent_ns)
ns.add_collection(image_ns)
ns.add_collection(server_ns)
# The design card's spellings stay valid: build-agent, build-image, provision, ...
for coll, name, alias in [
    (agent_ns, "build", "build-agent"),
    (image_ns, "build", "build-image"),
    (image_ns, "provision", "provision"),
    (image_ns, "boot-qemu", "boot-qemu"),
    (server_ns, "deploy", "deploy-server"),
    (server_ns, "build-deb", "build-deb"),
]:
    if name in coll.tasks:
        ns.add_task(coll.tasks[name], name=alias)

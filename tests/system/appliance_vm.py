"""A throwaway Debian 12 x86_64 host for the appliance tests: built once, booted per run.

The base disk (mmdebstrap bookworm + kernel + systemd + openssh-server + python3, like a
Debian cloud image) is cached under ``~/.cache/dpanel/appliance-<hash of its inputs>``;
each test session boots it with a qcow2 overlay, so the cache stays pristine. KVM is used
when it really works: on nested hosts /dev/kvm may exist but hang x86 guests in early
boot, so a short probe decides (its answer is cached too) and TCG is the fallback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from support import free_port

__all__ = ["EDGE_GUEST_PORT", "HTTPS_GUEST_PORT", "BaseImage", "Guest", "build_base_image",
           "kvm_works"]

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = [
    "systemd-sysv", "udev", "kmod", "linux-image-amd64", "openssh-server", "python3",
    "iproute2", "procps", "netbase", "ca-certificates",
]
#: The initramfs only needs to find a virtio disk: MODULES=list keeps mkinitramfs fast.
INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "ext4"]
DISK_SIZE = "3G"
#: What the test guest is configured with: operators' HTTPS on the privileged 443 (the
#: capability drop-in), the device edge on 8443 (a public port that needs none).
HTTPS_GUEST_PORT = 443
EDGE_GUEST_PORT = 8443
#: Bump when the customisation below changes.
RECIPE = "2"

ESSENTIAL_HOOK = """set -e
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
echo MODULES=list > "$1/etc/initramfs-tools/conf.d/dpanel-modules"
printf '%s\\n' {modules} > "$1/usr/share/initramfs-tools/modules.d/dpanel.conf"
"""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpanel"


@dataclass(frozen=True)
class BaseImage:
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "root.ext4"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"


def _inputs_hash() -> str:
    h = hashlib.sha256()
    h.update(json.dumps([MIRROR, SUITE, PACKAGES, INITRAMFS_MODULES, DISK_SIZE, RECIPE,
                         ESSENTIAL_HOOK]).encode())
    return h.hexdigest()[:16]


def _customise(root: Path, pubkey: str) -> None:
    """What a cloud image's first boot would do: network by DHCP, root's key, fstab."""
    net = root / "etc/systemd/network/20-wired.network"
    net.parent.mkdir(parents=True, exist_ok=True)
    net.write_text("[Match]\nName=en*\n[Network]\nDHCP=yes\n")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "systemd-networkd.service").symlink_to("/lib/systemd/system/systemd-networkd.service")
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("nameserver 10.0.2.3\n")  # QEMU user networking's DNS
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("dpanel-appliance\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 dpanel-appliance\n")
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh / "authorized_keys").write_text(pubkey)
    (ssh / "authorized_keys").chmod(0o600)
    # the serial console is our boot log; no getty on it
    (root / "etc/systemd/system/serial-getty@ttyS0.service").symlink_to("/dev/null")


def build_base_image(log: bool = True) -> BaseImage:
    """Build (once) the cached base image; safe against concurrent builders."""
    image = BaseImage(cache_root() / f"appliance-{_inputs_hash()}")
    if image.disk.exists():
        return image
    for tool in ("mmdebstrap", "mke2fs", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (python3 tasks.py test installs it)")
    image.dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="appliance-", dir=image.dir.parent) as tmp:
        work = Path(tmp)
        root = work / "root"
        hook = work / "hook.sh"
        hook.write_text(ESSENTIAL_HOOK.format(modules=" ".join(INITRAMFS_MODULES)))
        if log:
            print(f"appliance: building the Debian 12 base image in {image.dir}", flush=True)
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                        f"--essential-hook=sh {hook} \"$1\"",
                        f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
                       check=True, stdin=subprocess.DEVNULL)
        out = work / "out"
        out.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dpanel-test",
                        "-f", str(out / "id_ed25519")], check=True)
        _customise(root, (out / "id_ed25519.pub").read_text())
        shutil.copy2(next((root / "boot").glob("vmlinuz-*")), out / "vmlinuz")
        shutil.copy2(next((root / "boot").glob("initrd.img-*")), out / "initrd.img")
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), "-L", "root",
                        "-E", "root_owner=0:0", str(out / "root.ext4"), DISK_SIZE], check=True)
        (out / "build.json").write_text(json.dumps(
            {"packages": PACKAGES, "seconds": round(time.monotonic() - t0, 1)}))
        try:
            out.rename(image.dir)
        except OSError:
            if not image.disk.exists():  # somebody else won the race: fine
                raise
    if log:
        print(f"appliance: base image built in {time.monotonic() - t0:.0f} s", flush=True)
    return image


def kvm_works(image: BaseImage, timeout: float = 20) -> bool:
    """Boot the kernel with KVM and no root disk: a working KVM panics ("VFS: Unable to
    mount root") in a second or two and QEMU exits (-no-reboot). Cached per host kernel,
    QEMU and guest kernel."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.split("\n")[0]
    key = hashlib.sha256(f"{os.uname().release}|{qemu}|{image.dir.name}".encode()).hexdigest()
    cached = cache_root() / f"kvm-probe-{key[:16]}.json"
    if cached.exists():
        return bool(json.loads(cached.read_text())["kvm"])
    with tempfile.TemporaryDirectory() as tmp:
        console = Path(tmp) / "console.log"
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-m", "256", "-no-reboot",
             "-kernel", str(image.kernel), "-append", "console=ttyS0 panic=1",
             "-display", "none", "-serial", f"file:{console}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        text = console.read_text(errors="replace") if console.exists() else ""
        ok = "Kernel panic" in text or "VFS:" in text
    cached.write_text(json.dumps({"kvm": ok}))
    return ok


@dataclass
class Guest:
    """One running QEMU guest with ssh, tunnel (2220), broker (8883), operators' HTTPS
    (443) and the device edge (8443) forwarded to 127.0.0.1 on free ports."""

    image: BaseImage
    workdir: Path
    kvm: bool = False
    ssh_port: int = field(default_factory=free_port)
    tunnel_port: int = field(default_factory=free_port)
    broker_port: int = field(default_factory=free_port)
    https_port: int = field(default_factory=free_port)
    edge_port: int = field(default_factory=free_port)
    alias: str = "dpanel-appliance"
    proc: Optional[subprocess.Popen[bytes]] = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def overlay(self) -> Path:
        return self.workdir / "disk.qcow2"

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        key = self.workdir / "id_ed25519"
        shutil.copy2(self.image.key, key)
        key.chmod(0o600)
        self.ssh_config.write_text(f"""\
Host {self.alias}
  HostName 127.0.0.1
  Port {self.ssh_port}
  User root
  IdentityFile {key}
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  ServerAliveInterval 10
""")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.image.disk), str(self.overlay)], check=True)
        accel = ["-enable-kvm", "-cpu", "host"] if self.kvm else [
            "-accel", "tcg,thread=multi", "-cpu", "max"]
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in (
            (self.ssh_port, 22), (self.tunnel_port, 2220), (self.broker_port, 8883),
            (self.https_port, HTTPS_GUEST_PORT), (self.edge_port, EDGE_GUEST_PORT)))
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", *accel, "-smp", "2", "-m", "1536",
             "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
             "-append", "root=/dev/vda rw console=ttyS0 quiet",
             "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe",
             "-netdev", f"user,id=n0,{fwd}", "-device", "virtio-net-pci,netdev=n0",
             "-display", "none", "-serial", f"file:{self.console}", "-nodefaults"],
            stdout=subprocess.DEVNULL, stderr=(self.workdir / "qemu.log").open("wb"),
            stdin=subprocess.DEVNULL)

    def ssh(self, command: str, *, check: bool = True, timeout: float = 120,
            ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes",
                              "-o", "ConnectTimeout=5", self.alias, command],
                             capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise RuntimeError(f"{command!r} on the guest failed ({res.returncode}): "
                               f"{res.stderr.strip()}")
        return res

    def wait_ssh(self, timeout: float = 600) -> float:
        """Seconds until `ssh` works and systemd finished booting."""
        t0 = time.monotonic()
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({self.proc.returncode}); see {self.console}")
            try:
                res = self.ssh("systemctl is-system-running --wait", check=False, timeout=120)
                if res.returncode == 0 or res.stdout.strip() in ("running", "degraded"):
                    return time.monotonic() - t0
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"guest not reachable over ssh after {timeout:.0f} s; "
                                   f"console: {self.console}")
            time.sleep(2)

    def boot_id(self) -> str:
        return self.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def reboot(self, timeout: float = 600) -> float:
        """Reboot from inside (systemctl reboot: a clean shutdown) and wait for it."""
        before = self.boot_id()
        self.ssh("systemctl reboot", check=False, timeout=30)
        t0 = time.monotonic()
        time.sleep(3)
        while True:
            self.wait_ssh(timeout)
            try:
                if self.boot_id() != before:
                    return time.monotonic() - t0
            except RuntimeError:
                pass
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("guest did not come back from the reboot")
            time.sleep(2)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

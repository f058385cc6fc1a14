"""The proof: a real arm64 image, built and provisioned here, boots and phones home,
and updates its agent in the field (update slots, real systemd, the rollback hook).

Cold cache cost (2 cores): freeze root ~2.5 min + freeze ~1 min + boot root ~3.5 min,
plus one more arm64 freeze for the newer agent the update tests roll out; cached, the
whole module takes a few minutes, mostly the two guests' boots.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra

from dpanel_image.build import build_image
from dpanel_image.disk import Ext4, read_table
from dpanel_image.elf import elf_arch_of_file
from dpanel_image.freeze import FreezeResult, build_agent, bundle_agent
from dpanel_image.provision import provision
from dpanel_image.qemu import QemuVM
from dpanel_proto import __version__
from stackfix import Stack
from support import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.root, pytest.mark.timeout(1500)]

if os.geteuid() != 0:  # chroot/mmdebstrap for the freeze; image editing itself is rootless
    pytest.skip("the ARM freeze needs root", allow_module_level=True)


@pytest.fixture(scope="module")
def update_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The update key the image pins (``--update-key``); the update tests' manager uses
    it as its STATE_DIR/update_key, as a real manager's own would be."""
    import asyncssh

    d = tmp_path_factory.mktemp("update-key")
    key = asyncssh.generate_private_key("ssh-ed25519", comment="dpanel-update")
    (d / "update_key").write_bytes(key.export_private_key())
    (d / "update_key").chmod(0o600)
    (d / "update_key.pub").write_bytes(key.export_public_key())
    return d / "update_key"


@pytest.fixture(scope="module")
def old_agent() -> FreezeResult:
    return build_agent("arm64", "onedir")  # the images' default layout


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, old_agent: FreezeResult,
          update_key: Path) -> Path:
    out = tmp_path_factory.mktemp("qemu-image")
    return build_image("qemu-arm64", out, agent=old_agent.path, compression="none",
                       update_key=Path(f"{update_key}.pub")).image


@pytest.fixture(scope="module")
def rootfs(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The built root file system, copied out with debugfs rdump (no mount)."""
    d = tmp_path_factory.mktemp("rootfs")
    root = Ext4(image, read_table(image)[1])
    root.rdump("/", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_rootfs_before_boot(rootfs: Path, update_key: Path) -> None:
    host = testinfra.get_host(str(rootfs), connection="chroot")
    # update slots (issue 13; was /opt/dpanel-tunnel): slot a holds the onedir agent,
    # current -> slots/a, the PATH name and the unit go through current
    assert os.readlink(rootfs / "usr/local/bin/dpanel-tunnel") == \
        "/opt/dpanel/current/dpanel-tunnel"
    assert os.readlink(rootfs / "opt/dpanel/current") == "slots/a"
    agent = host.file("/opt/dpanel/slots/a/dpanel-tunnel")
    assert agent.is_file and agent.mode == 0o755 and agent.user == "root"
    assert host.file("/opt/dpanel/slots/a/_internal").is_directory
    assert not host.file("/opt/dpanel/slots/b").exists
    assert elf_arch_of_file(rootfs / "opt/dpanel/slots/a/dpanel-tunnel") == "arm64"
    assert "ARM aarch64" in subprocess.run(["file", "-b", str(rootfs / "opt/dpanel/slots/a/"
                                           "dpanel-tunnel")], capture_output=True,
                                           text=True).stdout
    assert host.service("dpanel-agent").is_enabled
    assert host.service("dpanel-tunnel-rollback.timer").is_enabled
    dropin = host.file("/etc/systemd/system/dpanel-agent.service.d/slots.conf")
    assert dropin.contains("^ExecStart=/opt/dpanel/current/dpanel-tunnel ")
    assert host.file("/usr/local/lib/dpanel/dpanel-tunnel-rollback").mode == 0o755
    # the update key is pinned where the image's agent.toml says to look
    assert host.file("/etc/dpanel/pins/update_key.pub").content_string.split()[:2] == \
        update_key.with_name("update_key.pub").read_text().split()[:2]
    assert host.file("/etc/dpanel/agent.toml").contains('^pins_dir = "/etc/dpanel/pins"')
    assert host.file("/etc/dpanel/agent.toml").contains('^update_root = "/opt/dpanel"')
    assert host.service("dpanel-firstboot").is_enabled
    assert host.file("/etc/systemd/system/systemd-firstboot.service").linked_to == "/dev/null"
    conf = host.file("/etc/dpanel/agent.toml")
    assert conf.mode == 0o644 and conf.contains("import_token_from")
    assert host.file("/etc/dpanel").mode == 0o755
    # Nothing that would make two devices alike: no host keys, no token, no machine-id.
    assert not host.file("/var/lib/dpanel-tunnel").exists
    assert not host.file("/etc/dpanel/token").exists
    assert host.run("ls /etc/ssh/ssh_host_* 2>/dev/null").stdout == ""
    assert host.file("/etc/machine-id").content_string == "uninitialized\n"
    assert not list(rootfs.glob("usr/bin/qemu-*"))
    # The frozen binary runs in its target root (under qemu-user here).
    assert host.run("/usr/local/bin/dpanel-tunnel --version").stdout.startswith("dpanel-tunnel")


# ------------------------------------------------------------------ the booted guest

#: the newer agent rolled out to the guest (the sources' own version is the image's)
NEW_VERSION = "0.2.0-qemu-upd"
CRASH_VERSION = "0.3.0-qemu-crash"


class Guest:
    """One booted, enrolled qemu device and its manager, shared by every test that needs
    the guest (its boot is the slow part, 1.5-5 min on a loaded host): phoning home
    first, then the updates, then the power-off. The manager's update key is the one the
    image pins."""

    def __init__(self, stack: Stack, vm: QemuVM, tmp: Path) -> None:
        self.stack, self.vm, self.tmp = stack, vm, tmp

    def sh(self, cmd: str) -> str:
        return self.stack.cli_ok("exec", "qemu-dev", "--", "sh", "-c", cmd).strip()

    def rollout(self, version: str) -> str:
        # the guest reaches the manager's API at 10.0.2.2 (the CLI's own URL is loopback)
        out = self.stack.cli_ok("agent", "update", "--json", "--filter", "qemu-dev",
                                "--version", version, "--url",
                                f"http://10.0.2.2:{self.stack.api_port}")
        return str(json.loads(out)["id"])

    def part(self, rid: str) -> dict[str, Any]:
        show = json.loads(self.stack.cli_ok("agent", "update", "status", rid, "--json"))
        return dict(next(p for p in show["parts"] if p["device"] == "qemu-dev"))

    def wait_part(self, rid: str, state: str, timeout: float) -> dict[str, Any]:
        def done() -> Any:
            p = self.part(rid)
            assert p["state"] not in {"updated", "failed", "rolled_back", "skipped"} - {
                state}, p  # a wrong end fails at once
            return p if p["state"] == state else None
        return dict(wait_for(done, f"qemu-dev {state} in rollout {rid}", timeout))

    def wait_version(self, version: str, timeout: float) -> None:
        wait_for(lambda: (lambda d: d["online"] and d["agent_version"] == version)(
            self.stack.device("qemu-dev")), f"qemu-dev online with {version}", timeout)

    def dump(self) -> None:
        print(self.vm.console()[-4000:])
        print(self.stack.log()[-4000:])


@pytest.fixture(scope="module")
def guest(image: Path, update_key: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Guest]:
    tmp = tmp_path_factory.mktemp("qemu-guest")
    # the guest reaches the host's loopback as 10.0.2.2 (qemu user networking): tokens
    # name that, the stack still listens on 127.0.0.1
    s = Stack(tmp / "stack", free_port(), free_port(), free_port(), advertise="10.0.2.2")
    s.dir.mkdir(parents=True)
    for name in ("update_key", "update_key.pub"):
        shutil.copy2(update_key.with_name(name), s.dir / name)
    s.start()
    try:
        [dev] = provision(image, token=s.enrol("qemu-dev"), out=tmp / "dev")
        with QemuVM(dev.image, tmp / "console.log") as vm:
            g = Guest(s, vm, tmp)
            try:
                # only bounds a hang: a loaded 2-core host once took 5 min to boot it
                vm.wait_for(r"Started .*dpanel-agent", 900)
                g.wait_version(__version__, 300)
            except Exception:
                g.dump()
                raise
            yield g
    finally:
        s.close()


def test_qemu_device_phones_home(guest: Guest) -> None:
    stack = guest.stack
    assert stack.cli_ok("exec", "qemu-dev", "--", "uname", "-m").strip() == "aarch64"
    # First start moved the token off the FAT partition into the root fs, mode 0600,
    # and left only a comment on the FAT partition.
    mode = stack.cli_ok("exec", "qemu-dev", "--", "stat", "-c", "%a",
                        "/etc/dpanel/token").strip()
    assert mode == "600"
    fat_copy = stack.cli_ok("exec", "qemu-dev", "--", "cat",
                            "/boot/firmware/dpanel-token.txt")
    assert "dpt1." not in fat_copy and fat_copy.lstrip().startswith("#"), fat_copy
    # Each device made its own identity on first boot.
    ident = stack.cli_ok("exec", "qemu-dev", "--", "sh", "-c",
                         "cat /etc/machine-id; ls /var/lib/dpanel-tunnel").split()
    assert len(ident[0]) == 32 and ident[0] != "uninitialized"
    rss = stack.cli_ok("exec", "qemu-dev", "--", "sh", "-c",
                       "for p in $(pidof dpanel-tunnel); do "
                       "grep VmRSS /proc/$p/status; done")
    print(f"agent VmRSS on the arm64 guest: {rss.split()}")


# ------------------------------------------------------------------ agent updates (issue 13)

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_qemu_agent_updates_to_a_newer_onedir_bundle(guest: Guest, old_agent: FreezeResult,
                                                     update_key: Path) -> None:
    """A newer arm64 onedir agent, signed with the pinned key, rolled out with
    ``dpanel agent update``: systemd restarts into slot b, it commits once online, and
    slot a (the image's agent) is kept for a rollback."""
    new = build_agent("arm64", "onedir", Path.home() / ".cache" / "dpanel" /
                      "test-dist-qemu-upd", version=NEW_VERSION)
    guest.stack.cli_ok("agent", "import", str(bundle_agent(new, update_key, NEW_VERSION)))
    assert guest.sh("readlink /opt/dpanel/current") == "slots/a"
    rid = guest.rollout(NEW_VERSION)
    try:
        guest.wait_part(rid, "updated", 900)
        guest.wait_version(NEW_VERSION, 300)
    except Exception:
        guest.dump()
        raise
    assert guest.sh("readlink /opt/dpanel/current") == "slots/b"
    # the unit runs the new slot's binary (the kernel resolved current/ at exec)
    assert guest.sh("readlink /proc/$(systemctl show -p MainPID --value dpanel-agent)/exe"
                    ) == "/opt/dpanel/slots/b/dpanel-tunnel"
    sums = guest.sh("sha256sum /opt/dpanel/slots/a/dpanel-tunnel "
                    "/opt/dpanel/slots/b/dpanel-tunnel").split()
    assert sums[0] == _sha256(old_agent.path)  # the old slot is kept as it was
    assert sums[2] == _sha256(new.path)
    assert guest.sh("test -d /opt/dpanel/slots/b/_internal && ls /opt/dpanel/slots") == "a\nb"
    assert "state=committed" in guest.sh("cat /var/lib/dpanel-tunnel/update/last")
    assert guest.sh("test -e /var/lib/dpanel-tunnel/update/pending || echo none") == "none"
    assert guest.sh("systemctl is-active dpanel-tunnel-rollback.timer") == "active"
    assert NEW_VERSION in guest.sh("/usr/local/bin/dpanel-tunnel --version")


def test_qemu_update_whose_binary_exits_at_once_is_rolled_back(guest: Guest, rootfs: Path,
                                                               update_key: Path) -> None:
    """A signed onedir bundle whose dpanel-tunnel is the guest's own /usr/bin/false (a
    real arm64 ELF that exits at once): real systemd restarts it, the unit's ExecStartPre
    hook reverts ``current`` on the 4th start, and the previous agent reports why."""
    import asyncssh

    from dpanel_proto.update import write_bundle

    before = guest.sh("readlink /opt/dpanel/current")
    version = guest.stack.device("qemu-dev")["agent_version"]
    tree = guest.tmp / "crash" / "dpanel-tunnel.d"
    tree.mkdir(parents=True)
    shutil.copyfile(rootfs / "usr/bin/false", tree / "dpanel-tunnel")
    (tree / "dpanel-tunnel").chmod(0o755)
    write_bundle(guest.tmp / "crash" / "bundle", tree / "dpanel-tunnel", CRASH_VERSION,
                 "arm64", asyncssh.read_private_key(str(update_key)), layout="onedir")
    guest.stack.cli_ok("agent", "import", str(guest.tmp / "crash" / "bundle"))
    rid = guest.rollout(CRASH_VERSION)
    try:
        part = guest.wait_part(rid, "rolled_back", 900)
        guest.wait_version(version, 300)
    except Exception:
        guest.dump()
        raise
    assert "did not come online in 3 starts" in part["reason"], part
    assert guest.sh("readlink /opt/dpanel/current") == before  # back where it was
    crashed = "a" if before == "slots/b" else "b"
    assert guest.sh(f"cmp /usr/bin/false /opt/dpanel/slots/{crashed}/dpanel-tunnel "
                    "&& echo same") == "same"  # the failed slot stays for inspection
    journal = guest.sh("journalctl -u dpanel-agent --no-pager -o cat | "
                       "grep dpanel-tunnel-rollback: | tail -1")
    assert f"current -> {before}" in journal and "3 starts" in journal, journal
    assert "state=rolled_back" in guest.sh("cat /var/lib/dpanel-tunnel/update/last")


def test_qemu_device_goes_offline_when_powered_off(guest: Guest) -> None:
    """Last in the module: the guest is stopped; the manager sees the device go."""
    guest.vm.stop()
    wait_for(lambda: not guest.stack.device("qemu-dev")["online"], "qemu-dev offline", 120)

"""The proof: a real arm64 image, built and provisioned here, boots and phones home.

Cold cache cost (2 cores): freeze root ~2.5 min + freeze ~1 min + boot root ~3.5 min;
cached, the whole module takes about a minute plus the guest's boot (~25 s to online).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import testinfra

from dpanel_image.build import build_image
from dpanel_image.disk import Ext4, read_table
from dpanel_image.elf import elf_arch_of_file
from dpanel_image.freeze import build_agent
from dpanel_image.provision import provision
from dpanel_image.qemu import QemuVM
from stackfix import Stack
from support import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.root, pytest.mark.timeout(1500)]

if os.geteuid() != 0:  # chroot/mmdebstrap for the freeze; image editing itself is rootless
    pytest.skip("the ARM freeze needs root", allow_module_level=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qemu-image")
    agent = build_agent("arm64", "onedir")  # the images' default layout
    return build_image("qemu-arm64", out, agent=agent.path, compression="none").image


@pytest.fixture(scope="module")
def rootfs(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The built root file system, copied out with debugfs rdump (no mount)."""
    d = tmp_path_factory.mktemp("rootfs")
    root = Ext4(image, read_table(image)[1])
    root.rdump("/", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_rootfs_before_boot(rootfs: Path) -> None:
    host = testinfra.get_host(str(rootfs), connection="chroot")
    link = host.file("/usr/local/bin/dpanel-tunnel")
    assert link.is_symlink and link.linked_to == "/opt/dpanel-tunnel/dpanel-tunnel"
    agent = host.file("/opt/dpanel-tunnel/dpanel-tunnel")
    assert agent.is_file and agent.mode == 0o755 and agent.user == "root"
    assert host.file("/opt/dpanel-tunnel/_internal").is_directory
    assert elf_arch_of_file(rootfs / "opt/dpanel-tunnel/dpanel-tunnel") == "arm64"
    assert "ARM aarch64" in subprocess.run(["file", "-b", str(rootfs / "opt/dpanel-tunnel/"
                                           "dpanel-tunnel")], capture_output=True,
                                           text=True).stdout
    assert host.service("dpanel-agent").is_enabled
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


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    # the guest reaches the host's loopback as 10.0.2.2 (qemu user networking): tokens
    # name that, the stack still listens on 127.0.0.1
    s = Stack(tmp_path / "stack", free_port(), free_port(), free_port(), advertise="10.0.2.2")
    s.start()
    try:
        yield s
    finally:
        s.close()


def test_qemu_device_phones_home(image: Path, stack: Stack, tmp_path: Path) -> None:
    token = stack.enrol("qemu-dev")
    [dev] = provision(image, token=token, out=tmp_path / "dev")
    with QemuVM(dev.image, tmp_path / "console.log") as vm:
        try:
            vm.wait_for(r"Started .*dpanel-agent", 240)
            stack.wait_online("qemu-dev", timeout=240)
        except Exception:
            print(vm.console()[-4000:])
            print(stack.log()[-4000:])
            raise
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
    wait_for(lambda: not stack.device("qemu-dev")["online"], "qemu-dev offline", 120)

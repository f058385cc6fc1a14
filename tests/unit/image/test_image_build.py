"""build-image on synthetic vendor images: contents, outputs, and every bad input."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from imagefix import base_image, boot_fs, fake_agent, listing, root_fs, stat_of

from dpanel_image.build import agent_config, build_image
from dpanel_image.disk import Ext4
from dpanel_image.errors import ImageError

ROOT = Path(__file__).resolve().parents[3]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_rpi_image_from_xz_has_agent_unit_config_and_no_identity(tmp_path: Path,
                                                                  agent_arm64: Path) -> None:
    out = tmp_path / "out"
    r = build_image("rpi", out, base=base_image("rpi", xz=True), agent=agent_arm64)
    assert listing(out) == ["dpanel-rpi.bmap", "dpanel-rpi.img", "dpanel-rpi.img.sha256",
                            "dpanel-rpi.img.zst"]
    root = root_fs(r.image)
    # the update slots (issue 13): the agent in slot a, current -> slots/a, the PATH
    # name through current (changed from a plain /usr/local/bin/dpanel-tunnel)
    assert root.cat("/opt/dpanel/slots/a/dpanel-tunnel") == agent_arm64.read_bytes()
    assert stat_of(root, "/opt/dpanel/slots/a/dpanel-tunnel") == ("regular", 0o755, 0, 0)
    assert _link(root, "/opt/dpanel/current") == "slots/a"
    assert _link(root, "/usr/local/bin/dpanel-tunnel") == "/opt/dpanel/current/dpanel-tunnel"
    assert root.cat("/etc/systemd/system/dpanel-agent.service") == \
        (ROOT / "systemd" / "dpanel-agent.service").read_bytes()
    _check_slot_units(root)
    assert "Fast link dest: \"/etc/systemd/system/dpanel-agent.service\"" in subprocess.run(
        ["debugfs", "-R", "stat /etc/systemd/system/multi-user.target.wants/"
         "dpanel-agent.service", root.spec], capture_output=True, text=True).stdout
    assert root.cat("/etc/dpanel/agent.toml") == agent_config().encode()
    assert stat_of(root, "/etc/dpanel")[:2] == ("directory", 0o755)
    assert root.exists("/etc/systemd/system/multi-user.target.wants/dpanel-firstboot.service")
    assert stat_of(root, "/usr/local/lib/dpanel/firstboot")[1] == 0o755
    # No identity shared between devices: no host keys, machine-id filled on first boot.
    assert root.list_dir("/etc/ssh") == []
    assert root.cat("/etc/machine-id") == b"uninitialized\n"
    assert not root.exists("/var/lib/dbus/machine-id")
    assert not root.exists("/var/lib/dpanel-tunnel")
    assert not root.exists("/etc/dpanel/token")
    # The vendor's files are still there; FAT untouched and readable.
    assert root.cat("/etc/os-release") is not None
    assert "config.txt" in boot_fs(r.image).names()
    subprocess.run(["e2fsck", "-fn", root.spec], check=True, capture_output=True)
    sums = dict(reversed(line.split()) for line in (out / "dpanel-rpi.img.sha256")
                .read_text().splitlines())
    assert sums == {"dpanel-rpi.img": _sha(r.image), "dpanel-rpi.img.zst": _sha(r.compressed)}
    unz = subprocess.run(["zstd", "-dc", str(r.compressed)], capture_output=True, check=True)
    assert hashlib.sha256(unz.stdout).hexdigest() == sums["dpanel-rpi.img"]


def _link(root: Ext4, path: str) -> str:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", root.spec], capture_output=True,
                         text=True).stdout
    m = re.search(r'Fast link dest: "([^"]*)"', out)
    assert m, out
    return m.group(1)


def _check_slot_units(root: Ext4) -> None:
    """The unit runs current/ (drop-in), with the rollback hook before each start and its
    deadline timer enabled: the same files as systemd/ in the checkout."""
    for img, src in (("/etc/systemd/system/dpanel-agent.service.d/slots.conf",
                      "dpanel-agent.service.d/slots.conf"),
                     ("/etc/systemd/system/dpanel-tunnel-rollback.service",
                      "dpanel-tunnel-rollback.service"),
                     ("/etc/systemd/system/dpanel-tunnel-rollback.timer",
                      "dpanel-tunnel-rollback.timer"),
                     ("/usr/local/lib/dpanel/dpanel-tunnel-rollback", "dpanel-tunnel-rollback")):
        assert root.cat(img) == (ROOT / "systemd" / src).read_bytes(), img
    conf = (root.cat("/etc/systemd/system/dpanel-agent.service.d/slots.conf") or b"").decode()
    assert "ExecStart=/opt/dpanel/current/dpanel-tunnel --config" in conf
    assert "ExecStartPre=-/usr/local/lib/dpanel/dpanel-tunnel-rollback pre" in conf
    assert stat_of(root, "/usr/local/lib/dpanel/dpanel-tunnel-rollback")[1] == 0o755
    assert _link(root, "/etc/systemd/system/timers.target.wants/"
                 "dpanel-tunnel-rollback.timer") == \
        "/etc/systemd/system/dpanel-tunnel-rollback.timer"


def test_bmap_is_accepted_by_bmaptool(tmp_path: Path, agent_arm64: Path) -> None:
    r = build_image("rpi", tmp_path, base=base_image("rpi"), agent=agent_arm64,
                    compression="none")
    copy = tmp_path / "flashed.img"
    subprocess.run(["bmaptool", "copy", "--bmap", str(r.bmap), str(r.image), str(copy)],
                   check=True, capture_output=True)
    assert _sha(copy) == _sha(r.image)


def test_orangepi_single_ext4_layout_and_pins(tmp_path: Path, agent_arm64: Path) -> None:
    th, mk = tmp_path / "tunnel.pub", tmp_path / "manager.pub"
    th.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITunnel tunnel\n")
    mk.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIManager manager\n")
    r = build_image("orangepi", tmp_path / "o", base=base_image("orangepi"),
                    agent=agent_arm64, compression="xz", tunnel_host_key=th, manager_key=mk)
    assert r.compressed is not None and r.compressed.name == "dpanel-orangepi.img.xz"
    root = root_fs(r.image)
    assert root.cat("/etc/dpanel/pins/tunnel_host_key.pub") == th.read_bytes()
    assert root.cat("/etc/dpanel/pins/manager_key.pub") == mk.read_bytes()
    assert b'token_path = "/boot/dpanel-token.txt"' in (root.cat("/etc/dpanel/image.toml") or b"")
    assert root.cat("/boot/armbianEnv.txt") == b"verbosity=1\n"


def test_armhf_image(tmp_path: Path) -> None:
    agent = fake_agent(tmp_path / "dpanel-tunnel", "armhf")
    r = build_image("rpi", tmp_path / "o", base=base_image("rpi", "armhf"), arch="armhf",
                    agent=agent, compression="none")
    assert r.image.name == "dpanel-rpi-armhf.img"
    assert root_fs(r.image).cat("/opt/dpanel/slots/a/dpanel-tunnel") == agent.read_bytes()


def test_onedir_agent_installed_under_opt_with_symlink(tmp_path: Path) -> None:
    d = tmp_path / "dpanel-tunnel.d"
    (d / "_internal" / "lib").mkdir(parents=True)
    fake_agent(d / "dpanel-tunnel", "arm64")
    (d / "_internal" / "lib" / "x.so").write_bytes(b"\0" * 100)
    (d / "_internal" / "link.so").symlink_to("lib/x.so")
    r = build_image("rpi", tmp_path / "o", base=base_image("rpi"), agent=d / "dpanel-tunnel",
                    compression="none")
    root = root_fs(r.image)
    # slot a holds the folder (was /opt/dpanel-tunnel before the update slots)
    assert root.cat("/opt/dpanel/slots/a/dpanel-tunnel") == (d / "dpanel-tunnel").read_bytes()
    assert stat_of(root, "/opt/dpanel/slots/a/_internal/lib/x.so")[1] == 0o644
    assert _link(root, "/usr/local/bin/dpanel-tunnel") == "/opt/dpanel/current/dpanel-tunnel"
    assert _link(root, "/opt/dpanel/current") == "slots/a"
    assert not root.exists("/opt/dpanel-tunnel")
    _check_slot_units(root)


def test_update_key_is_baked_and_the_agent_config_points_at_it(tmp_path: Path,
                                                               agent_arm64: Path) -> None:
    from dpanel_agent.agent import _update_key
    from dpanel_agent.config import parse_config

    uk = tmp_path / "update_key.pub"
    uk.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUpdate dpanel-update\n")
    r = build_image("rpi", tmp_path / "o", base=base_image("rpi"), agent=agent_arm64,
                    compression="none", update_key=uk)
    root = root_fs(r.image)
    assert root.cat("/etc/dpanel/pins/update_key.pub") == uk.read_bytes()
    assert stat_of(root, "/etc/dpanel/pins/update_key.pub")[:2] == ("regular", 0o644)
    conf = parse_config((root.cat("/etc/dpanel/agent.toml") or b"").decode(), "agent.toml")
    assert str(conf.pins_dir) == "/etc/dpanel/pins" and conf.update_key is None
    assert str(conf.update_root) == "/opt/dpanel"
    # the agent, given that config over a copy of the pins, pins exactly that key
    pins = tmp_path / "pins"
    pins.mkdir()
    (pins / "update_key.pub").write_bytes(uk.read_bytes())
    assert _update_key(replace(conf, pins_dir=pins)) == uk.read_text().strip()
    with pytest.raises(ImageError, match=r"^--update-key: .* is not one OpenSSH public key"):
        (tmp_path / "bad.pub").write_text("not a key\n")
        build_image("rpi", tmp_path / "o2", base=base_image("rpi"), agent=agent_arm64,
                    compression="none", update_key=tmp_path / "bad.pub")


def test_rebuild_replaces_outputs_atomically(tmp_path: Path, agent_arm64: Path) -> None:
    build_image("rpi", tmp_path, base=base_image("rpi"), agent=agent_arm64, compression="none")
    before = os.stat(tmp_path / "dpanel-rpi.img").st_ino
    build_image("rpi", tmp_path, base=base_image("rpi"), agent=agent_arm64, compression="none")
    assert os.stat(tmp_path / "dpanel-rpi.img").st_ino != before  # renamed into place
    assert not [n for n in listing(tmp_path) if n.startswith(".")]


# ------------------------------------------------------------------------------ bad input

def _fails(match: str, out: Path, **kw: object) -> None:
    with pytest.raises(ImageError, match=match):
        build_image(out=out, **kw)  # type: ignore[arg-type]
    assert [n for n in listing(out)] == [], "a failed build left files behind"


def test_missing_base(tmp_path: Path, agent_arm64: Path) -> None:
    _fails("does not exist", tmp_path / "o", board_name="rpi", base=tmp_path / "nope.img.xz",
           agent=agent_arm64)


def test_truncated_xz_base(tmp_path: Path, agent_arm64: Path) -> None:
    good = base_image("rpi", xz=True).read_bytes()
    bad = tmp_path / "raspios.img.xz"
    bad.write_bytes(good[: len(good) // 2])
    _fails("corrupt or truncated", tmp_path / "o", board_name="rpi", base=bad,
           agent=agent_arm64)


def test_truncated_raw_base(tmp_path: Path, agent_arm64: Path) -> None:
    bad = tmp_path / "raspios.img"
    with open(base_image("rpi"), "rb") as f:
        bad.write_bytes(f.read(40 << 20))
    _fails("truncated image", tmp_path / "o", board_name="rpi", base=bad, agent=agent_arm64)


def test_not_a_disk_image(tmp_path: Path, agent_arm64: Path) -> None:
    bad = tmp_path / "notes.img"
    bad.write_bytes(b"hello" * 1000)
    _fails("no partition table", tmp_path / "o", board_name="rpi", base=bad,
           agent=agent_arm64)


def test_partitions_do_not_match_board(tmp_path: Path, agent_arm64: Path) -> None:
    _fails("has 1 partition.*rpi expects 2", tmp_path / "o", board_name="rpi",
           base=base_image("orangepi"), agent=agent_arm64)
    _fails("has 2 partition.*orangepi expects 1", tmp_path / "o", board_name="orangepi",
           base=base_image("rpi"), agent=agent_arm64)


def test_partition_with_wrong_file_system(tmp_path: Path, agent_arm64: Path) -> None:
    from dpanel_image.disk import make_disk
    bad = tmp_path / "swapped.img"
    make_disk(bad, [("ext4", 16, "boot", None), ("ext4", 32, "root", None)])
    _fails("partition 1 should be vfat.*found ext4", tmp_path / "o", board_name="rpi",
           base=bad, agent=agent_arm64)


def test_image_of_wrong_architecture(tmp_path: Path, agent_arm64: Path) -> None:
    _fails("is an armhf image, but the agent binary is arm64", tmp_path / "o",
           board_name="rpi", base=base_image("rpi", "armhf"), agent=agent_arm64)


def test_agent_of_wrong_architecture(tmp_path: Path) -> None:
    amd = fake_agent(tmp_path / "amd64-agent", "amd64")
    _fails("is an amd64 binary, the image is arm64", tmp_path / "o", board_name="rpi",
           base=base_image("rpi"), agent=amd)


def test_arch_not_supported_by_board(tmp_path: Path, agent_arm64: Path) -> None:
    _fails("supports arm64", tmp_path / "o", board_name="qemu-arm64", arch="armhf",
           agent=agent_arm64)


def test_unknown_board(tmp_path: Path, agent_arm64: Path) -> None:
    _fails("unknown board 'pi5'.*orangepi", tmp_path / "o", board_name="pi5",
           agent=agent_arm64)


def test_bad_pin_file(tmp_path: Path, agent_arm64: Path) -> None:
    bad = tmp_path / "k.pub"
    bad.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    _fails("--manager-key.*not one OpenSSH public key", tmp_path / "o", board_name="rpi",
           base=base_image("rpi"), agent=agent_arm64, manager_key=bad)


def test_root_fs_too_full_for_agent(tmp_path: Path) -> None:
    big = fake_agent(tmp_path / "big", "arm64", size=400 << 20)
    _fails("root file system has .* MiB free", tmp_path / "o", board_name="rpi",
           base=base_image("rpi"), agent=big)


@pytest.fixture
def tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Mount a small tmpfs (root only); yields a function (size, ro) -> mount point."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mounts: list[Path] = []

    def mount(size: str, ro: bool = False) -> Path:
        d = tmp_path / f"mnt{len(mounts)}"
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""),
                        "tmpfs", str(d)], check=True)
        mounts.append(d)
        return d
    yield mount
    for d in mounts:
        subprocess.run(["umount", str(d)], check=False)


@pytest.mark.root
def test_read_only_output_directory(tmpfs, agent_arm64: Path) -> None:  # type: ignore[no-untyped-def]
    ro = tmpfs("8m", ro=True)
    with pytest.raises(ImageError, match=f"{ro}.*(not writable|Read-only)"):
        build_image("rpi", ro, base=base_image("rpi"), agent=agent_arm64)


@pytest.mark.root
def test_full_output_directory_precheck(tmpfs, agent_arm64: Path) -> None:  # type: ignore[no-untyped-def]
    small = tmpfs("4m")
    _fails("MiB free, about .* MiB needed", small, board_name="rpi",
           base=base_image("rpi"), agent=agent_arm64)


@pytest.mark.root
def test_output_directory_fills_up_midway(tmpfs, agent_arm64: Path) -> None:  # type: ignore[no-untyped-def]
    # Enough for the sparse image, not for its compressed copy of a big random agent.
    small = tmpfs("12m")
    agent = fake_agent(small.parent / "agent", "arm64", size=1)
    with open(agent, "ab") as f:
        f.write(os.urandom(6 << 20))
    with pytest.raises(ImageError, match="No space left"):
        build_image("rpi", small, base=base_image("rpi"), agent=agent)
    assert listing(small) == []


def test_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "invoke"), "build-image", "--board",
                        "rpi", "--base", str(tmp_path / "missing.img.xz"), "--out",
                        str(tmp_path / "o"), "--agent", str(tmp_path / "none")],
                       cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    assert p.stderr.strip().startswith("error: --agent:"), p.stderr
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------ the agent's view

def test_image_agent_config_is_accepted_by_the_agent(tmp_path: Path, agent_arm64: Path) -> None:
    from dpanel_agent.config import load_config, parse_config

    r = build_image("rpi", tmp_path / "o", base=base_image("rpi"), agent=agent_arm64,
                    compression="none")
    raw = root_fs(r.image).cat("/etc/dpanel/agent.toml")
    assert raw is not None
    conf = parse_config(raw.decode(), "/etc/dpanel/agent.toml")
    assert str(conf.token_file) == "/etc/dpanel/token"
    assert [str(p) for p in conf.import_token_from] == ["/boot/firmware/dpanel-token.txt",
                                                        "/boot/dpanel-token.txt"]
    assert str(conf.state_dir) == "/var/lib/dpanel-tunnel"
    (tmp_path / "agent.toml").write_bytes(raw)
    assert load_config(tmp_path / "agent.toml").token_file == conf.token_file


# ---------------------------------------------------------------- layout on the stream

def test_wrong_layout_refused_from_the_head_of_the_stream(tmp_path: Path,
                                                          agent_arm64: Path) -> None:
    """An Armbian-layout image given for rpi is refused from its first MiB: here the
    rest of the archive is garbage, and the error is still the layout, naming --base."""
    good = base_image("orangepi", xz=False)
    bad = tmp_path / "armbian.img.xz"
    with open(good, "rb") as f:
        head = f.read(8 << 20)
    bad.write_bytes(subprocess.run(["xz", "-1", "-c"], input=head, capture_output=True,
                                   check=True).stdout + os.urandom(1 << 20))
    _fails(rf"^--base {bad}: has 1 partition\(s\), board rpi expects 2", tmp_path / "o",
           board_name="rpi", base=bad, agent=agent_arm64)


def test_wrong_file_system_refused_when_its_first_sectors_pass(tmp_path: Path,
                                                                agent_arm64: Path) -> None:
    from dpanel_image.disk import make_disk
    swapped = tmp_path / "swapped.img"
    make_disk(swapped, [("ext4", 16, "boot", None), ("ext4", 32, "root", None)])
    with open(swapped, "rb") as f:
        head = f.read(4 << 20)  # the table and the first partition's start, nothing more
    bad = tmp_path / "swapped.img.xz"
    bad.write_bytes(subprocess.run(["xz", "-1", "-c"], input=head + os.urandom(1 << 20),
                                   capture_output=True, check=True).stdout)
    _fails(rf"^--base {bad}: partition 1 should be vfat .* found ext4", tmp_path / "o",
           board_name="rpi", base=bad, agent=agent_arm64)


def test_layout_errors_name_the_base_not_the_staging_file(tmp_path: Path,
                                                          agent_arm64: Path) -> None:
    bad = tmp_path / "raspios.img"
    with open(base_image("rpi"), "rb") as f:
        bad.write_bytes(f.read(40 << 20))
    with pytest.raises(ImageError) as e:
        build_image("rpi", tmp_path / "o", base=bad, agent=agent_arm64)
    assert str(e.value).startswith(f"--base {bad}: partition 1 ends at"), e.value
    assert ".dpanel-staging" not in str(e.value)


# ------------------------------------------------------------------------------ board folders

def _custom_board(tmp_path: Path, post_build: str) -> Path:
    import shutil

    from dpanel_image.board import boards_dir

    d = tmp_path / "myboard"
    shutil.copytree(boards_dir() / "rpi", d)
    units = d / "overlay" / "usr" / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / "demo.service").write_text(
        "[Unit]\nDescription=demo\n[Service]\nExecStart=/bin/true\n"
        "[Install]\nWantedBy=multi-user.target\nAlias=demo-alias.service\nAlso=demo.socket\n")
    (units / "demo.socket").write_text("[Socket]\nListenStream=1\n[Install]\n"
                                       "WantedBy=sockets.target\n")
    (d / "overlay" / "etc").mkdir()
    (d / "overlay" / "etc" / "motd").write_text("a dPanel device\n")
    (d / "post-build").write_text(post_build)
    return d


def test_board_folder_overlay_and_post_build(tmp_path: Path, agent_arm64: Path) -> None:
    board = _custom_board(tmp_path, "# edits after the overlay\n"
                                    "enable demo.service\nmask getty@tty1.service\n"
                                    "rm /etc/os-release\nrm /etc/not-there\n"
                                    "symlink /etc/demo.conf /etc/motd\n")
    r = build_image(str(board), tmp_path / "o", base=base_image("rpi"), agent=agent_arm64,
                    compression="none")
    root = root_fs(r.image)
    assert r.image.name == "dpanel-rpi.img"  # the name in board.toml
    assert root.cat("/etc/motd") == b"a dPanel device\n"
    assert stat_of(root, "/etc/motd") == ("regular", 0o644, 0, 0)

    def link(path: str) -> str:
        out = subprocess.run(["debugfs", "-R", f"stat {path}", root.spec], capture_output=True,
                             text=True).stdout
        assert "Type: symlink" in out, (path, out)
        return out.split('Fast link dest: "', 1)[1].split('"', 1)[0]
    unit = "/usr/lib/systemd/system/demo.service"
    assert link("/etc/systemd/system/multi-user.target.wants/demo.service") == unit
    assert link("/etc/systemd/system/demo-alias.service") == unit
    assert link("/etc/systemd/system/sockets.target.wants/demo.socket") == \
        "/usr/lib/systemd/system/demo.socket"
    assert link("/etc/systemd/system/getty@tty1.service") == "/dev/null"
    assert link("/etc/demo.conf") == "/etc/motd"
    assert not root.exists("/etc/os-release")
    # The common overlay is still there, and vendor directories kept their owner/mode.
    assert root.exists("/etc/systemd/system/multi-user.target.wants/dpanel-agent.service")
    subprocess.run(["e2fsck", "-fn", root.spec], check=True, capture_output=True)


@pytest.mark.parametrize("text, msg", [
    ("frobnicate x\n", r"post-build:1: unknown edit 'frobnicate'"),
    ("\nenable\n", r"post-build:2: enable takes 1 argument"),
    ("rm etc/x\n", r"post-build:1: rm: path 'etc/x' must be absolute"),
    ("enable nosuch.service\n", r"post-build:1: enable nosuch.service: no such unit"),
    ("enable foo@.service\n", r"post-build:1: template unit"),
])
def test_bad_post_build_names_file_and_line(tmp_path: Path, agent_arm64: Path, text: str,
                                            msg: str) -> None:
    board = _custom_board(tmp_path, text)
    _fails(msg, tmp_path / "o", board_name=str(board), base=base_image("rpi"),
           agent=agent_arm64)


def test_board_folder_without_board_toml(tmp_path: Path, agent_arm64: Path) -> None:
    _fails("is not a board folder", tmp_path / "o", board_name=str(tmp_path),
           base=base_image("rpi"), agent=agent_arm64)


# ---------------------------------------------------------------- --out on a read-only fs

@pytest.mark.root
def test_missing_out_subdirectory_on_read_only_fs(tmpfs, agent_arm64: Path) -> None:  # type: ignore[no-untyped-def]
    ro = tmpfs("8m", ro=True)
    with pytest.raises(ImageError, match=rf"^--out: cannot create {ro}/a/b: Read-only"):
        build_image("rpi", ro / "a" / "b", base=base_image("rpi"), agent=agent_arm64)


@pytest.mark.root
def test_cli_missing_out_subdirectory_on_read_only_fs(tmpfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ro = tmpfs("8m", ro=True)
    agent = fake_agent(tmp_path / "agent", "arm64")
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "invoke"), "build-image", "--board",
                        "rpi", "--base", str(base_image("rpi")), "--out", str(ro / "sub"),
                        "--agent", str(agent)],
                       cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: --out: cannot create {ro}/sub: Read-only file system"

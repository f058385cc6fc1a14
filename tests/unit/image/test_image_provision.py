"""provision: token placement, per-device copies, bulk, card checks and bad input."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from imagefix import (
    ED_KEY,
    base_image,
    boot_fs,
    listing,
    make_token,
    root_fs,
    stat_of,
)

from dpanel_image.build import build_image
from dpanel_image.cardwrite import check_target, confirm
from dpanel_image.errors import ImageError
from dpanel_image.provision import bulk_names, fingerprint, provision
from dpanel_proto.token import parse_token


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def rpi_image(tmp_path: Path, agent_arm64: Path) -> Path:
    return build_image("rpi", tmp_path / "out", base=base_image("rpi"), agent=agent_arm64,
                       compression="none").image


def _bmap_ok(img: Path, bmap: Path, tmp: Path) -> None:
    copy = tmp / "flashed.img"
    copy.unlink(missing_ok=True)
    subprocess.run(["bmaptool", "copy", "--bmap", str(bmap), str(img), str(copy)],
                   check=True, capture_output=True)
    assert _sha(copy) == _sha(img)


def test_in_place_token_on_fat_and_sidecars_refreshed(rpi_image: Path, tmp_path: Path) -> None:
    tok = make_token("pi-01")
    [res] = provision(rpi_image, device="pi-01", token=tok)
    assert res.image == rpi_image
    assert boot_fs(rpi_image).read("/dpanel-token.txt") == (tok + "\n").encode()
    _bmap_ok(rpi_image, rpi_image.with_suffix(".bmap"), tmp_path)
    line = (rpi_image.parent / "dpanel-rpi.img.sha256").read_text().splitlines()[0]
    assert line == f"{_sha(rpi_image)}  dpanel-rpi.img"


def test_per_device_copies_leave_the_master_unchanged(rpi_image: Path, tmp_path: Path) -> None:
    before = _sha(rpi_image)
    out = tmp_path / "devices"
    names = bulk_names("site-a-", 3)
    tokens = {n: make_token(n) for n in names}
    res = provision(rpi_image, out=out, count=3, prefix="site-a-", enrol=tokens.__getitem__)
    assert [r.device for r in res] == ["site-a-01", "site-a-02", "site-a-03"]
    assert _sha(rpi_image) == before
    assert listing(out) == sorted([f"dpanel-rpi-{n}.{e}" for n in names for e in ("bmap", "img")])
    for r in res:
        got = boot_fs(r.image).read("/dpanel-token.txt")
        assert got is not None and parse_token(got.decode()).device == r.device
        _bmap_ok(r.image, r.image.with_suffix(".bmap"), tmp_path)
        # Sparse: the copy did not write the whole image.
        assert os.stat(r.image).st_blocks * 512 < r.image.stat().st_size // 4


def test_orangepi_token_goes_to_ext4_boot_with_mode_0600(tmp_path: Path,
                                                          agent_arm64: Path) -> None:
    img = build_image("orangepi", tmp_path / "o", base=base_image("orangepi"),
                      agent=agent_arm64, compression="none").image
    tok = make_token("opi-7")
    [res] = provision(img, token=tok, out=tmp_path / "dev")
    root = root_fs(res.image)
    assert root.cat("/boot/dpanel-token.txt") == (tok + "\n").encode()
    assert stat_of(root, "/boot/dpanel-token.txt")[1:] == (0o600, 0, 0)
    subprocess.run(["e2fsck", "-fn", root.spec], check=True, capture_output=True)
    _bmap_ok(res.image, res.image.with_suffix(".bmap"), tmp_path)


def test_enrolment_via_callable_used_for_device(rpi_image: Path, tmp_path: Path) -> None:
    calls: list[str] = []

    def enrol(name: str) -> str:
        calls.append(name)
        return make_token(name)
    provision(rpi_image, device="cam-3", out=tmp_path / "d", enrol=enrol)
    assert calls == ["cam-3"]


def test_duplicate_device_name_refused_before_enrolment(rpi_image: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "d"
    provision(rpi_image, token=make_token("pi-01"), out=out)
    calls: list[str] = []
    with pytest.raises(ImageError, match="pi-01 already provisioned"):
        provision(rpi_image, device="pi-01", out=out,
                  enrol=lambda n: calls.append(n) or make_token(n))  # type: ignore[func-returns-value]
    assert calls == []


def test_duplicate_reported_by_the_manager_is_relayed(rpi_image: Path, tmp_path: Path) -> None:
    def enrol(name: str) -> str:
        raise ImageError(f"enrolling {name} with the manager failed: device {name} exists")
    with pytest.raises(ImageError, match="device pi-02 exists"):
        provision(rpi_image, device="pi-02", out=tmp_path / "d", enrol=enrol)
    assert listing(tmp_path / "d") == []


def test_bad_inputs(rpi_image: Path, tmp_path: Path) -> None:
    cases = [
        (dict(device="pi-01", token=make_token("pi-02")), "token is for device 'pi-02'"),
        (dict(token="dpt1.garbage.00000000"), "--token: token"),
        (dict(device="Bad_Name"), "not a device id"),
        (dict(), "give --device"),
        (dict(count=2, prefix="x-"), "--count needs --out"),
        (dict(count=2, prefix="x-", device="a"), "do not also pass --device"),
    ]
    before = _sha(rpi_image)
    for kw, msg in cases:
        with pytest.raises(ImageError, match=msg):
            provision(rpi_image, enrol=make_token, **kw)  # type: ignore[arg-type]
    assert _sha(rpi_image) == before
    with pytest.raises(ImageError, match="not a dPanel image"):
        provision(base_image("rpi"), token=make_token("a"), out=tmp_path / "x")
    with pytest.raises(ImageError, match="does not exist"):
        provision(tmp_path / "none.img", token=make_token("a"))


# ------------------------------------------------------------------------------ --to checks

def test_to_refuses_the_system_disk(rpi_image: Path) -> None:
    root_dev = os.stat("/").st_dev
    disk = next((Path("/dev") / p.name for p in Path("/sys/block").iterdir()
                 if (p / "dev").read_text().strip() ==
                 f"{os.major(root_dev)}:{os.minor(root_dev)}"), None)
    if disk is None or not disk.exists():
        pytest.skip("/ is not on a whole disk here (overlay/partition)")
    before = _sha(rpi_image)
    with pytest.raises(ImageError, match="holds the running system"):
        provision(rpi_image, token=make_token("pi-01"), to=str(disk), yes=True)
    assert _sha(rpi_image) == before


def test_to_refuses_files_and_missing_paths(rpi_image: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a block device"):
        provision(rpi_image, token=make_token("pi-01"), to=str(rpi_image), yes=True)
    with pytest.raises(ImageError, match="does not exist"):
        provision(rpi_image, token=make_token("pi-01"), to="/dev/sdzz9", yes=True)


def _fake_sys(tmp: Path, removable: str) -> tuple[Path, Path, tuple[int, int], tuple[int, int]]:
    """A fake sysfs/proc describing a real block device node as a disk with one partition."""
    dev = next(p for p in Path("/dev").iterdir()
               if not p.is_symlink() and stat.S_ISBLK(p.stat().st_mode))
    rdev = dev.stat().st_rdev
    disk_nums = (os.major(rdev), os.minor(rdev))
    part_nums = (disk_nums[0], disk_nums[1] + 1)
    sysr = tmp / "sys"
    disk = sysr / "devices" / "fake" / "block" / "sdx"
    (disk / "sdx1").mkdir(parents=True)
    (disk / "removable").write_text(removable + "\n")
    (disk / "sdx1" / "partition").write_text("1\n")
    (disk / "sdx1" / "dev").write_text(f"{part_nums[0]}:{part_nums[1]}\n")
    (sysr / "dev" / "block").mkdir(parents=True)
    (sysr / "dev" / "block" / f"{disk_nums[0]}:{disk_nums[1]}").symlink_to(disk)
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("")
    return dev, sysr, disk_nums, part_nums


def test_check_target_removable_mounted_and_partition(tmp_path: Path) -> None:
    dev, sysr, _, part = _fake_sys(tmp_path / "a", "1")
    proc = tmp_path / "a" / "proc"
    assert check_target(str(dev), sysr, proc) == Path("/dev/sdx")
    (proc / "self" / "mountinfo").write_text(
        f"36 25 {part[0]}:{part[1]} / /media/card rw - vfat /dev/sdx1 rw\n")
    with pytest.raises(ImageError, match="mounted"):
        check_target(str(dev), sysr, proc)
    dev, sysr, _, _ = _fake_sys(tmp_path / "b", "0")
    with pytest.raises(ImageError, match="not a removable disk"):
        check_target(str(dev), sysr, tmp_path / "b" / "proc")


def test_confirm_needs_yes_without_a_terminal() -> None:
    with pytest.raises(ImageError, match="pass --yes"):
        confirm("Write?", yes=False)
    with pytest.raises(ImageError, match="aborted"):
        confirm("Write?", yes=False, ask=lambda q: "n")
    confirm("Write?", yes=False, ask=lambda q: "y")
    confirm("Write?", yes=True)


def test_cli_provision_with_token(rpi_image: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    tok = make_token("cli-1")
    p = subprocess.run([str(root / ".venv/bin/invoke"), "provision", "--image", str(rpi_image),
                        "--token", tok, "--out", str(tmp_path / "d")], cwd=root,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert "cli-1" in p.stdout
    assert boot_fs(tmp_path / "d" / "dpanel-rpi-cli-1.img").read("/dpanel-token.txt") == \
        (tok + "\n").encode()


def test_to_flashes_master_then_writes_token_on_the_card(rpi_image: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A file stands in for /dev/sdX once the (separately tested) safety checks passed.
    card = tmp_path / "card"
    with open(card, "wb") as f:
        f.truncate(rpi_image.stat().st_size + (8 << 20))
        f.seek(0)
        f.write(b"\xff" * 4096)  # old contents must go
    monkeypatch.setattr("dpanel_image.provision.check_target", lambda dev: card)
    before = _sha(rpi_image)
    tok = make_token("card-1")
    with pytest.raises(ImageError, match="pass --yes"):
        provision(rpi_image, token=tok, to="/dev/sdx")
    [res] = provision(rpi_image, token=tok, to="/dev/sdx", yes=True)
    assert res.image == card and _sha(rpi_image) == before
    assert boot_fs(card).read("/dpanel-token.txt") == (tok + "\n").encode()
    assert root_fs(card).cat("/opt/dpanel/slots/a/dpanel-tunnel") == \
        root_fs(rpi_image).cat("/opt/dpanel/slots/a/dpanel-tunnel")


# ------------------------------------------------------------------------------ secrets on disk

def test_images_holding_a_token_are_0600(rpi_image: Path, tmp_path: Path) -> None:
    out = tmp_path / "devices"
    tokens = {n: make_token(n) for n in bulk_names("s-", 2)}
    res = provision(rpi_image, out=out, count=2, prefix="s-", enrol=tokens.__getitem__)
    for r in res:
        assert stat.S_IMODE(r.image.stat().st_mode) == 0o600, r.image
        # The block map holds checksums, not the secret.
        assert stat.S_IMODE(r.image.with_suffix(".bmap").stat().st_mode) == 0o644
    assert stat.S_IMODE(rpi_image.stat().st_mode) == 0o644  # the master has no token
    provision(rpi_image, token=make_token("in-place"))
    assert stat.S_IMODE(rpi_image.stat().st_mode) == 0o600


# ------------------------------------------------------------------------------ baked pins

def _pinned_image(tmp_path: Path, agent: Path, tunnel: str, manager: str) -> Path:
    tmp_path.mkdir(exist_ok=True)
    th, mk = tmp_path / "tunnel.pub", tmp_path / "manager.pub"
    th.write_text(tunnel + "\n")
    mk.write_text(manager + "\n")
    return build_image("rpi", tmp_path / "pinned", base=base_image("rpi"), agent=agent,
                       compression="none", tunnel_host_key=th, manager_key=mk).image


def test_token_pinning_other_keys_than_the_image_is_refused(tmp_path: Path,
                                                           agent_arm64: Path) -> None:
    tok = make_token("pin-1")
    t = parse_token(tok)
    other = ED_KEY.replace("Dpanel0", "Other00")
    img = _pinned_image(tmp_path, agent_arm64, other + " tunnel", t.manager_key)
    before = _sha(img)
    with pytest.raises(ImageError) as e:
        provision(img, token=tok, out=tmp_path / "d")
    msg = str(e.value)
    assert msg.startswith(f"--token pins tunnel host key {fingerprint(t.tunnel_host_key)}, "
                          f"but {img} was built with --tunnel-host-key {fingerprint(other)} "
                          "(/etc/dpanel/pins/tunnel_host_key.pub)"), msg
    assert fingerprint(t.tunnel_host_key) != fingerprint(other)
    assert listing(tmp_path / "d") == [] and _sha(img) == before
    # The same through enrolment: the manager handed out a token of another server.
    with pytest.raises(ImageError, match=r"the token enrolled for pin-2 .* pins tunnel host"):
        provision(img, device="pin-2", out=tmp_path / "d", enrol=make_token)
    # Manager key mismatch is named as such.
    img2 = _pinned_image(tmp_path / "m", agent_arm64, t.tunnel_host_key, other + " mgr")
    with pytest.raises(ImageError, match=r"pins manager key .* built with --manager-key"):
        provision(img2, token=tok, out=tmp_path / "d2")


def test_token_with_the_image_pins_is_accepted(tmp_path: Path, agent_arm64: Path) -> None:
    tok = make_token("pin-3")
    t = parse_token(tok)
    # Comments differ ("tunnel" vs "host"): the key is what is pinned, not its comment.
    img = _pinned_image(tmp_path, agent_arm64, ED_KEY + " host", t.manager_key)
    [res] = provision(img, token=tok, out=tmp_path / "d")
    assert boot_fs(res.image).read("/dpanel-token.txt") == (tok + "\n").encode()


# ---------------------------------------------------------------- --out on a read-only fs

@pytest.fixture
def ro_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    d = tmp_path / "ro"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", str(d)], check=False)


@pytest.mark.root
def test_missing_out_subdirectory_on_read_only_fs(rpi_image: Path, ro_dir: Path) -> None:
    calls: list[str] = []
    with pytest.raises(ImageError, match=rf"^--out: cannot create {ro_dir}/x: Read-only"):
        provision(rpi_image, device="pi-9", out=ro_dir / "x",
                  enrol=lambda n: calls.append(n) or make_token(n))  # type: ignore[func-returns-value]
    assert calls == []  # refused before enrolling anyone


@pytest.mark.root
def test_cli_missing_out_subdirectory_on_read_only_fs(rpi_image: Path, ro_dir: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    p = subprocess.run([str(root / ".venv/bin/invoke"), "provision", "--image", str(rpi_image),
                        "--token", make_token("cli-2"), "--out", str(ro_dir / "sub")],
                       cwd=root, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: --out: cannot create {ro_dir}/sub: Read-only file system"

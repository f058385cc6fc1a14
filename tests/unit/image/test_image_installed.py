"""build-image from an installed dpanel_image (a wheel, as the server .deb ships it), not
from the checkout: the boards, overlays and the agent's unit are package data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from imagefix import SYNTHETIC_SIZES, fake_agent, root_fs, stat_of

from dpanel_image.board import load_board
from dpanel_image.synthetic import synthetic_base

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import json, sys
from pathlib import Path
import dpanel_image, dpanel_image.freeze
from dpanel_image.board import board_names
from dpanel_image.build import build_image
r = build_image("qemu-arm64" if sys.argv[3] == "qemu" else "rpi", Path(sys.argv[1]),
                base=Path(sys.argv[2]), agent=Path(sys.argv[4]), compression="none")
print(json.dumps({"package": dpanel_image.__file__, "boards": board_names(),
                  "image": str(r.image),
                  "sources": [str(p) for p in dpanel_image.freeze.source_dirs()]}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel and tomli-w installed into a bare directory."""
    d = tmp_path_factory.mktemp("installed")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(d / "wheel"), str(ROOT)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    [whl] = (d / "wheel").glob("*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "dpanel_image/boards/rpi/board.toml" in names
    assert "image_tasks.py" not in names and "dpanel_image/tasks.py" not in names
    assert not [n for n in names if n.startswith(("tests/", "dpanel_image/bench"))]
    subprocess.run([*pip, "install", "--no-deps", "--target", str(d / "site"), str(whl),
                    "tomli-w"], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return d / "site"


def test_build_image_from_the_installed_package(installed: Path, tmp_path: Path) -> None:
    base = synthetic_base(load_board("qemu-arm64"), "arm64", **SYNTHETIC_SIZES["qemu-arm64"])
    agent = fake_agent(tmp_path / "dpanel-tunnel", "arm64")
    # -S: no site-packages, so neither the checkout (editable install) nor anything else
    # of this venv can be imported; only the installed wheel and the standard library.
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(installed), "HOME": str(tmp_path),
           "DPANEL_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-S", "-c", SCRIPT, str(tmp_path / "out"), str(base),
                        "qemu", str(agent)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.splitlines()[-1])
    assert r["package"].startswith(str(installed)), r
    assert r["boards"] == ["orangepi", "qemu-arm64", "rpi"]
    # The agent's sources for build-agent are found in the installed copy too.
    assert all(s.startswith(str(installed)) for s in r["sources"]), r["sources"]
    root = root_fs(Path(r["image"]))
    assert root.cat("/etc/systemd/system/dpanel-agent.service") == \
        (ROOT / "systemd" / "dpanel-agent.service").read_bytes()
    assert stat_of(root, "/usr/local/lib/dpanel/firstboot")[1] == 0o755
    assert root.cat("/etc/hostname") == b"dpanel-qemu\n"  # the board's overlay
    # ... and its post-build: systemd-networkd enabled as `systemctl enable` would.
    for link in ("multi-user.target.wants/systemd-networkd.service",
                 "dbus-org.freedesktop.network1.service",
                 "sockets.target.wants/systemd-networkd.socket",
                 "network-online.target.wants/systemd-networkd-wait-online.service"):
        assert stat_of(root, f"/etc/systemd/system/{link}")[0] == "symlink", link
    assert root.exists("/etc/dpanel/agent.toml")

"""provision enrols through the real manager (``dpanel device add``) on a loopback stack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from imagefix import base_image, boot_fs

from dpanel_image.build import build_image
from dpanel_image.errors import ImageError
from dpanel_image.provision import provision
from dpanel_proto.token import parse_token
from stackfix import Stack
from support import free_port


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", free_port(), free_port(), free_port())
    s.start()
    monkeypatch.setenv("DPANEL_CONFIG", str(s.config))
    try:
        yield s
    finally:
        s.close()


def test_enrol_via_manager_then_duplicate_refused(stack: Stack, tmp_path: Path,
                                                  agent_arm64: Path) -> None:
    img = build_image("rpi", tmp_path / "o", base=base_image("rpi"), agent=agent_arm64,
                      compression="none").image
    [dev] = provision(img, device="field-7", out=tmp_path / "a")
    raw = boot_fs(dev.image).read("/dpanel-token.txt")
    assert raw is not None
    assert parse_token(raw.decode()).device == "field-7"
    assert stack.device("field-7")["id"] == "field-7"
    # Same name again, into another directory: the manager refuses, nothing is written.
    with pytest.raises(ImageError, match=r"enrolling field-7 with the manager failed: .*exist"):
        provision(img, device="field-7", out=tmp_path / "b")
    assert not list((tmp_path / "b").glob("*.img"))

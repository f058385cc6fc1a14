"""Cipher preference of the tunnel link: AES-GCM only where the CPU accelerates it."""

from __future__ import annotations

from pathlib import Path

from dpanel_agent.link import _cpu_has_aes, preferred_ciphers


def test_aes_detected_on_x86_and_arm64(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n")
    pi4 = tmp_path / "pi4"
    pi4.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n")
    assert _cpu_has_aes(str(x86)) and _cpu_has_aes(str(arm))
    assert not _cpu_has_aes(str(pi4))
    assert not _cpu_has_aes(str(tmp_path / "missing"))


def test_gcm_first_only_with_aes() -> None:
    with_aes = preferred_ciphers(True)
    assert with_aes is not None and with_aes[0].startswith("aes128-gcm")
    assert "chacha20-poly1305@openssh.com" in with_aes  # servers without GCM still work
    assert preferred_ciphers(False) is None  # asyncssh default: chacha20 first

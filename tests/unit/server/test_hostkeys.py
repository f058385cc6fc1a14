"""Device-announced host keys: exactly one allowed key, re-serialised, or refused."""

from __future__ import annotations

import asyncssh
import pytest

from dpanel_server.hostkeys import InvalidHostKey, normalize_host_key

ED = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
OTHER = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def _bare(line: str) -> str:
    return " ".join(line.split()[:2])


def test_a_key_with_a_comment_is_kept_without_it() -> None:
    assert normalize_host_key(_bare(ED) + " root@kiosk") == _bare(ED)


@pytest.mark.parametrize("text", [
    _bare(ED) + "\n@revoked * " + _bare(OTHER),          # a second known_hosts line
    _bare(ED) + "\r@revoked * " + _bare(OTHER),
    _bare(ED) + " " + _bare(OTHER),                         # two keys on one line
    _bare(ED) + " comment\x1b[2J",                          # terminal control
    "@revoked * " + _bare(OTHER),
    "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
    "ssh-ed25519 AAAAnotakey",
    "ssh-ed25519 " + _bare(asyncssh.generate_private_key("ecdsa-sha2-nistp256")
                            .export_public_key().decode()).split()[1],  # type lies
    "",
])
def test_refused(text: str) -> None:
    with pytest.raises(InvalidHostKey, match=r"^host key: "):
        normalize_host_key(text)


def test_short_rsa_refused() -> None:
    weak = asyncssh.generate_private_key("ssh-rsa", key_size=1024)
    with pytest.raises(InvalidHostKey, match="2048"):
        normalize_host_key(weak.export_public_key().decode().strip())

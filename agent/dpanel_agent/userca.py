"""Which SSH user CA this device trusts for operator certificates, and where it is kept.

Sources, first found wins: ``<state_dir>/user_ca.pub`` (written when a signed open
request carried a new CA: migration of devices enrolled before certificates existed,
and CA rotation), then the token's ``user_ca``, then the image's pin
``<pins_dir>/user_ca.pub``. The state file wins because it is the newest word of the
manager, and it got there only through a request signed with the pinned manager key:
the trust root stays the manager key that the token and the image pin.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from dpanel_proto.signing import ManagerKey
from dpanel_proto.token import DeviceToken
from dpanel_proto.util import atomic_write
from dpanel_proto.wire import DecodeError

__all__ = ["SSHD_DIR", "USER_CA_NAME", "load_user_ca", "publish_for_sshd", "store_user_ca",
           "valid_user_ca"]

log = logging.getLogger("dpanel.agent")

USER_CA_NAME = "user_ca.pub"


def _first_key_line(path: Path) -> Optional[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("user CA file %s is unreadable (%s); ignored", path, exc.strerror)
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and valid_user_ca(f"{fields[0]} {fields[1]}"):
            return f"{fields[0]} {fields[1]}"
    log.warning("user CA file %s holds no valid ssh-ed25519 key; ignored", path)
    return None


def valid_user_ca(line: str) -> bool:
    """An Ed25519 public key line whose key blob really is one (checked without
    asyncssh, so a bad CA is refused before it is stored, never at the first login)."""
    if not line.startswith("ssh-ed25519 "):
        return False
    try:
        ManagerKey(line)
    except DecodeError:
        return False
    return True


def load_user_ca(state_dir: Path, token: DeviceToken, pins_dir: Path) -> str:
    """The CA key line ("ssh-ed25519 AAAA...") to trust, or "" for none (only the
    manager key gets in then, as before certificates)."""
    stored = _first_key_line(state_dir / USER_CA_NAME)
    if stored:
        return stored
    if token.user_ca and valid_user_ca(" ".join(token.user_ca.split()[:2])):
        return " ".join(token.user_ca.split()[:2])
    return _first_key_line(pins_dir / USER_CA_NAME) or ""


def store_user_ca(state_dir: Path, line: str) -> None:
    """Persist a CA received in a verified request (atomic: old or new, never half)."""
    atomic_write(state_dir / USER_CA_NAME, line + "\n", 0o644)


#: With ``ssh_target = "sshd"``: what the device's own OpenSSH server reads, under
#: ``<state_dir>/sshd/`` (see agent/README.md, "Certificates with ssh_target = sshd").
SSHD_DIR = "sshd"


def publish_for_sshd(state_dir: Path, device: str, ca_line: str) -> None:
    """Write the user CA (``TrustedUserCAKeys``) and the principals this device accepts
    (``AuthorizedPrincipalsFile``: ``dpanel:*`` for an unscoped operator's certificate,
    ``dpanel:<device>`` for one naming this device) where the device's sshd can read
    them; sshd re-reads both at every login, so a rotated CA applies at once. No CA:
    the files are emptied, and sshd accepts no certificate (keys only, as before)."""
    d = state_dir / SSHD_DIR
    d.mkdir(mode=0o755, exist_ok=True)
    # the state dir is 0700: sshd runs as root and reads through it; nothing here is secret
    atomic_write(d / "user_ca.pub", (ca_line + "\n") if ca_line else "", 0o644)
    atomic_write(d / "principals", f"dpanel:*\ndpanel:{device}\n" if ca_line else "", 0o644)

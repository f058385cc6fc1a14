"""File helpers for the agent: atomic private writes, private directories, the host key."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Union

from dpanel_proto.util import atomic_write

from .errors import AgentError

__all__ = [
    "AgentError",
    "atomic_write",
    "ensure_private_dir",
    "load_or_create_host_key",
    "public_line_of",
    "read_public_key_line",
]

log = logging.getLogger("dpanel.agent")


def ensure_private_dir(path: Union[str, Path], tighten: bool = True) -> Path:
    """Create ``path`` (and parents) with mode 0700. With ``tighten``, also fix the mode
    of an existing directory we own (the state dir: it holds the host key); without, a
    shared existing directory such as /etc/dpanel is left as it is (the files we put
    there are 0600 themselves)."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = p.stat()
    if tighten and stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
        os.chmod(p, 0o700)
    return p



def read_public_key_line(path: Union[str, Path]) -> str:
    """The first two fields of an OpenSSH ``.pub`` file (the comment would change with
    the hostname and is not part of the key)."""
    p = Path(path)
    try:
        fields = p.read_text().split()
    except OSError as exc:
        raise AgentError(f"sshd_host_key: cannot read {p}: {exc.strerror}") from None
    if len(fields) < 2 or not fields[0].startswith(("ssh-", "ecdsa-")):
        raise AgentError(f"sshd_host_key: {p} is not an OpenSSH public key file")
    return f"{fields[0]} {fields[1]}"


def load_or_create_host_key(path: Union[str, Path]) -> str:
    """The public key line of the device's own ed25519 host key, generating the key on
    first start on the device itself (so no two devices ever share one, whatever image
    they were flashed from).

    The public half is kept next to it in ``<path>.pub`` so that an ordinary start reads
    one line and imports no crypto library at all (an idle agent stays small); the
    private key is only parsed when the SSH server starts, and checked against it then.
    """
    p = Path(path)
    pub = p.with_name(p.name + ".pub")
    if p.exists():
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            log.warning("host key %s has mode %o; tightening to 600", p, mode)
            os.chmod(p, 0o600)
        try:
            return read_public_key_line(pub)
        except AgentError:
            pass  # missing or damaged: derive it from the private key
        try:
            pem = p.read_bytes()
        except OSError as exc:
            raise AgentError(f"cannot read host key {p}: {exc.strerror}") from None
        line = public_line_of(pem, p)
    else:
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                ser.NoEncryption())
        try:
            atomic_write(p, pem, 0o600)
        except OSError as exc:
            raise AgentError(f"cannot write host key {p}: {exc.strerror}") from None
        line = key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                             ser.PublicFormat.OpenSSH).decode()
        log.info("generated this device's SSH host key %s", p)
    try:
        atomic_write(pub, line + "\n", 0o644)
    except OSError as exc:
        log.warning("cannot write %s: %s", pub, exc.strerror)
    return line


def public_line_of(pem: bytes, path: Union[str, Path]) -> str:
    """Public key line of an OpenSSH ed25519 private key; AgentError if it is not one."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = ser.load_ssh_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise AgentError(
            f"host key {path} is unreadable ({exc}); delete it to generate a new one "
            "(the manager will then refuse the device until its pin is reset)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AgentError(f"host key {path} is not an ed25519 key")
    return key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                         ser.PublicFormat.OpenSSH).decode()

"""The operator's side of SSH certificates: their own key, a cached certificate for it.

``dpanel ssh``, ``dpanel proxy`` and ``dpanel ssh-config`` use the operator's key, not
the manager's: ``$DPANEL_SSH_KEY`` if set, else a key held by ssh-agent
(``$SSH_AUTH_SOCK``, listed with OpenSSH's ``ssh-add -L``; Ed25519 preferred), else
``~/.ssh/id_ed25519`` if present, else one generated once under ``~/.config/dpanel/``
(0600). An agent's key never touches the disk: its public half is written to
``~/.config/dpanel/agent-<hash>.pub``, which is the ``IdentityFile`` (OpenSSH then asks
the agent for the matching private key, and pairs it with the certificate).
The certificate the API signs for it (``POST /v1/certs``) is cached next to the key as
``<key>-dpanel-<manager>-cert.pub`` (one per manager, and never over an
``id_ed25519-cert.pub`` the operator may have from another CA) and fetched again when
less than half of its life is left, so that OpenSSH, which reads it before the
ProxyCommand has done anything, finds a valid one.

stdlib + ``cryptography`` only (no asyncssh): this runs at every ``ssh`` start.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dpanel_proto.util import atomic_write

from .client import ApiClient, ApiError

__all__ = ["CertInfo", "OperatorKey", "cert_info", "ensure_cert", "operator_key"]

#: Fetch a new certificate when less than this share of its lifetime is left.
REFRESH_AT = 0.5


@dataclass(frozen=True)
class OperatorKey:
    key: Path  # private key file (IdentityFile)
    public_line: str  # "ssh-ed25519 AAAA..."

    def cert_path(self, api: ApiClient) -> Path:
        tag = hashlib.sha256(api.url.encode()).hexdigest()[:8]
        return self.key.with_name(f"{self.key.name}-dpanel-{tag}-cert.pub")


def _config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "dpanel"


def operator_key() -> OperatorKey:
    """The operator's key (see the module docstring), generated if there is none."""
    env = os.environ.get("DPANEL_SSH_KEY")
    if env:
        return _load_or_create(Path(env))
    agent = agent_key()
    if agent is not None:
        return agent
    default = Path.home() / ".ssh" / "id_ed25519"
    if default.exists():
        return _load_or_create(default)
    return _load_or_create(_config_home() / "id_ed25519")


#: key types the user CA signs, in order of preference
_AGENT_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                "ecdsa-sha2-nistp521", "ssh-rsa")


def agent_key() -> Optional[OperatorKey]:
    """A key held by the running ssh-agent, or None (no agent, no key, no ssh-add)."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        return None
    import subprocess

    try:
        out = subprocess.run(["ssh-add", "-L"], capture_output=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # 1: the agent has no identities; 2: no agent there
        return None
    keys = [ln.split() for ln in out.stdout.decode(errors="replace").splitlines()]
    usable = [k for k in keys if len(k) >= 2 and k[0] in _AGENT_TYPES]
    if not usable:
        return None
    usable.sort(key=lambda k: _AGENT_TYPES.index(k[0]))
    line = f"{usable[0][0]} {usable[0][1]}"
    tag = hashlib.sha256(line.encode()).hexdigest()[:12]
    pub = _config_home() / f"agent-{tag}.pub"
    try:
        if not pub.exists():
            atomic_write(pub, line + " dpanel-agent-key\n", 0o644, make_parents=True)
    except OSError as exc:
        raise ApiError(f"cannot write {pub}: {exc.strerror}") from None
    return OperatorKey(pub, line)


def _load_or_create(path: Path) -> OperatorKey:
    pub = path.with_name(path.name + ".pub")
    if not path.exists():
        _generate(path)
    try:
        fields = pub.read_text().split()
        if len(fields) >= 2:
            return OperatorKey(path, f"{fields[0]} {fields[1]}")
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ApiError(f"cannot read {pub}: {exc.strerror}") from None
    # no .pub (or an empty one): derive it from an unencrypted private key
    from cryptography.hazmat.primitives import serialization as ser

    try:
        key = ser.load_ssh_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise ApiError(f"cannot read the public half of {path} ({exc}); put it in "
                       f"{pub}") from None
    line = key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                         ser.PublicFormat.OpenSSH).decode()
    return OperatorKey(path, line)


def _generate(path: Path) -> None:
    """A new Ed25519 key pair, published with link(): two dpanel processes racing here
    both end up with the one that won, never with a key and a .pub that differ."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                             ser.NoEncryption())
    pub = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    atomic_write(tmp, priv, 0o600)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # someone else's key won; its .pub follows (or is derived)
        atomic_write(path.with_name(path.name + ".pub"), pub + b" dpanel-operator\n", 0o644)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class CertInfo:
    key_blob: bytes  # the certified public key, as in a public key line
    valid_after: int
    valid_before: int


def _string(blob: bytes, off: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", blob, off)
    end = off + 4 + n
    if end > len(blob):
        raise ValueError("truncated")
    return blob[off + 4:end], end


#: public-key fields after the nonce, per certificate type (PROTOCOL.certkeys)
_KEY_FIELDS = {b"ssh-ed25519-cert-v01@openssh.com": 1, b"ssh-rsa-cert-v01@openssh.com": 2,
               b"ecdsa-sha2-nistp256-cert-v01@openssh.com": 2,
               b"ecdsa-sha2-nistp384-cert-v01@openssh.com": 2,
               b"ecdsa-sha2-nistp521-cert-v01@openssh.com": 2}


def cert_info(line: str) -> Optional[CertInfo]:
    """What a ``...-cert-v01@openssh.com`` line certifies and when; None if unreadable."""
    try:
        blob = base64.b64decode(line.split()[1], validate=True)
        alg, off = _string(blob, 0)
        _nonce, off = _string(blob, off)
        fields = []
        for _ in range(_KEY_FIELDS[alg]):
            value, off = _string(blob, off)
            fields.append(value)
        off += 8 + 4  # serial, type
        _key_id, off = _string(blob, off)
        _principals, off = _string(blob, off)
        after, before = struct.unpack_from(">QQ", blob, off)
    except (IndexError, KeyError, ValueError, struct.error):
        return None
    plain = alg.replace(b"-cert-v01@openssh.com", b"")
    key_blob = b"".join(struct.pack(">I", len(x)) + x for x in (plain, *fields))
    return CertInfo(key_blob, int(after), int(before))


def _usable(path: Path, key: OperatorKey, now: float) -> bool:
    try:
        info = cert_info(path.read_text())
    except OSError:
        return False
    if info is None or base64.b64encode(info.key_blob).decode() != key.public_line.split()[1]:
        return False
    life = max(info.valid_before - info.valid_after, 1)
    return info.valid_before - now > life * REFRESH_AT


def ensure_cert(api: ApiClient, key: OperatorKey, ttl: Optional[int] = None, *,
                force: bool = False) -> Path:
    """The certificate file for ``key``, fetched from the API unless a cached one has
    more than half its life left (or ``ttl`` asks for a new one)."""
    path = key.cert_path(api)
    if not force and ttl is None and _usable(path, key, time.time()):
        return path
    body: dict[str, object] = {"public_key": key.public_line}
    if ttl is not None:
        body["ttl"] = ttl
    out = api.call("POST", "/v1/certs", body)
    atomic_write(path, str(out["certificate"]).strip() + "\n", 0o600)
    return path


def refresh_if_cached(api: ApiClient, ttl: Optional[int] = None) -> None:
    """For ``dpanel proxy``: renew a certificate set up by ssh-config / ssh before it
    runs out; nothing at all (no key generated, no API call) for users of the manager
    key."""
    env = os.environ.get("DPANEL_SSH_KEY")
    candidates = [Path(env)] if env else [Path.home() / ".ssh" / "id_ed25519",
                                          _config_home() / "id_ed25519"]
    agent = None if env else agent_key()
    for path in ([agent.key] if agent is not None else []) + candidates:
        if not path.exists():
            continue
        key = agent if agent is not None and path == agent.key else _load_or_create(path)
        cert = key.cert_path(api)
        if cert.exists():
            try:
                if not _usable(cert, key, time.time()):
                    ensure_cert(api, key, ttl, force=True)
            except (ApiError, OSError):
                pass  # the ssh that follows says what is wrong, with its own words
        return

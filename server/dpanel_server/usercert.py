"""The manager's SSH user CA: short-lived OpenSSH certificates for operators' own keys.

Devices pin the CA (token ``user_ca``, the image's ``/etc/dpanel/pins/user_ca.pub``, or a
signed open request; see ``dpanel_agent.userca``) and accept a certificate whose
principals name them. The scheme:

* ``dpanel:*`` - every device: admins, and operators with an empty scope;
* ``dpanel:<device>`` - one per device in the operator's scope *at issue time*.

Device names and not label selectors, because a device knows its own name for certain
(it is its MQTT identity) but not its labels (they live in the manager's registry and
change there). The price is that a device added to a scope later needs a new
certificate, which short lifetimes make cheap. OpenSSH caps a certificate at 256
principals; a wider scope must ask for certificates naming fewer devices (``devices``).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import asyncssh

from dpanel_proto.codes import ErrorCode

from ._files import ensure_private_key
from .authz import Principal
from .errors import DPanelError

__all__ = ["DEFAULT_TTL", "MAX_PRINCIPALS", "MAX_TTL", "MIN_TTL", "PRINCIPAL_ALL",
           "UserCA", "principal_for"]

PRINCIPAL_ALL = "dpanel:*"
#: Certificate lifetime bounds, seconds (``manager.cert_ttl_max`` lowers the maximum).
MIN_TTL = 60
DEFAULT_TTL = 3600
MAX_TTL = 12 * 3600
#: OpenSSH's SSHKEY_CERT_MAX_PRINCIPALS
MAX_PRINCIPALS = 256
#: Backdating of valid_after, for clocks a little behind the manager's.
BACKDATE = 60
_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
              "ecdsa-sha2-nistp521", "ssh-rsa")


def principal_for(device: str) -> str:
    return f"dpanel:{device}"


class UserCA:
    """``UserCA(state_dir)`` loads the CA key, creating it (0600, atomic) the first time."""

    def __init__(self, state_dir: str | Path, ttl_max: int = MAX_TTL) -> None:
        self.path = Path(state_dir) / "user_ca"
        self.key = ensure_private_key(self.path)
        self.public_line = " ".join(self.key.export_public_key().decode().split()[:2])
        self.ttl_max = ttl_max

    def issue(self, principal: Principal, public_key: str, ttl: Optional[int],
              devices: Optional[Sequence[str]], *, operator: bool,
              now: Optional[float] = None) -> tuple[str, dict[str, Any]]:
        """The certificate (an OpenSSH ``...-cert-v01@openssh.com`` line) and what it
        says. ``devices``: the devices it names, already checked against the scope;
        None = every device (``dpanel:*``)."""
        key = _user_key(public_key)
        ttl = DEFAULT_TTL if ttl is None else ttl
        if not MIN_TTL <= ttl <= self.ttl_max:
            raise DPanelError(f"ttl: {ttl} s is outside {MIN_TTL}-{self.ttl_max} s",
                              ErrorCode.INVALID)
        principals = [PRINCIPAL_ALL] if devices is None else [principal_for(d)
                                                              for d in devices]
        if not principals:
            raise DPanelError(f"{principal.name}'s scope matches no device: no certificate",
                              ErrorCode.FORBIDDEN)
        if len(principals) > MAX_PRINCIPALS:
            raise DPanelError(f"devices: the scope matches {len(principals)} devices, more "
                              f"than a certificate can name ({MAX_PRINCIPALS}); ask for "
                              f"fewer with 'devices'", ErrorCode.INVALID)
        t = int(time.time() if now is None else now)
        serial = secrets.randbits(63)
        cert = self.key.generate_user_certificate(
            key, principal.name, serial=serial, principals=principals,
            valid_after=t - BACKDATE, valid_before=t + ttl,
            permit_x11_forwarding=False, permit_agent_forwarding=False,
            permit_port_forwarding=operator, permit_pty=operator, permit_user_rc=False,
            comment=f"dpanel:{principal.name}")
        info: dict[str, Any] = {
            "key_id": principal.name, "serial": serial, "principals": principals,
            "valid_after": t - BACKDATE, "valid_before": t + ttl,
            "ca": self.public_line}
        return cert.export_certificate("openssh").decode().strip(), info


def _user_key(line: str) -> asyncssh.SSHKey:
    fields = line.split()
    if len(line) > 16384 or len(fields) < 2 or fields[0] not in _KEY_TYPES:
        raise DPanelError("public_key: expected an OpenSSH public key line "
                          f"({', '.join(_KEY_TYPES)})", ErrorCode.INVALID)
    try:
        key = asyncssh.import_public_key(f"{fields[0]} {fields[1]}")
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise DPanelError(f"public_key: {exc}", ErrorCode.INVALID) from None
    if fields[0] == "ssh-rsa" and int(getattr(key.pyca_key, "key_size", 0)) < 2048:
        raise DPanelError("public_key: RSA keys under 2048 bits are refused",
                          ErrorCode.INVALID)
    return key

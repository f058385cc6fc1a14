"""A private CA and a broker server certificate, generated once (for MQTT over TLS)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._files import atomic_write

__all__ = ["ensure_broker_tls"]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_broker_tls(directory: Path, names: Iterable[str]) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) in ``directory``; created only if missing, so
    devices that pinned the CA keep working across restarts and upgrades."""
    ca_crt, crt, key = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    if ca_crt.exists() and crt.exists() and key.exists():
        return ca_crt, crt, key
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("dPanel Edge broker CA"))
          .issuer_name(_name("dPanel Edge broker CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(1))
          .not_valid_after(now + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    names = list(names)
    srv = (x509.CertificateBuilder().subject_name(_name(names[0]))
           .issuer_name(ca.subject).public_key(srv_key.public_key())
           .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(1))
           .not_valid_after(now + dt.timedelta(days=3650))
           .add_extension(_san(names), critical=False)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                          critical=False)
           .sign(ca_key, hashes.SHA256()))
    atomic_write(key, _pem_key(srv_key), 0o600)
    atomic_write(crt, srv.public_bytes(serialization.Encoding.PEM), 0o644)
    atomic_write(ca_crt, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    # The CA key is not kept: nothing else is ever signed with it.
    return ca_crt, crt, key

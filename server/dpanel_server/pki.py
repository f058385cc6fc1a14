"""The broker's private CA and server certificate: one set of rules for stack and appliance.

Both ``dpanel stack up --tls`` and ``dpanel-configure`` call :func:`ensure_broker_tls`.
The CA is made once and kept (its key too), because devices pin the CA certificate:
the server certificate can then be re-issued for a new advertised name, or before it
expires, without touching a single device. What is written, and with which owner and
mode, is the caller's (the appliance splits the files between users; the stack keeps
them all in its own 0700 directory).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._files import atomic_write
from .errors import ConfigError

__all__ = ["CA_DAYS", "CERT_DAYS", "RENEW_BEFORE", "TlsChange", "TlsFile", "ensure_broker_tls"]

#: The CA outlives many server certificates but not forever: ten years.
CA_DAYS = 3650
#: Server certificates: 825 days (the longest clients such as Apple's accept).
CERT_DAYS = 825
#: Re-issued at the next start/configure run this close to expiry.
RENEW_BEFORE = dt.timedelta(days=30)
CA_NAME = "dPanel Edge broker CA"

#: Which of the four files is being written (the writer picks owner and mode from it).
TlsFile = Literal["ca.key", "ca.crt", "server.key", "server.crt", "edge.key", "edge.crt"]
Writer = Callable[[Path, bytes, TlsFile], None]


@dataclass(frozen=True)
class TlsChange:
    what: Literal["created", "updated"]
    path: Path
    reason: str = ""


def _default_writer(path: Path, data: bytes, kind: TlsFile) -> None:
    atomic_write(path, data, 0o600 if kind.endswith(".key") else 0o644)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return entries


def _san_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)]


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # A CA signs certificates (and CRLs); an ECDSA server key only signs handshakes.
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


def _make_ca(now: dt.datetime, ca_name: str = CA_NAME
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _make_server(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, names: list[str],
                 now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + dt.timedelta(days=CERT_DAYS), ca.not_valid_after_utc)
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _reissue_reason(crt_p: Path, key_p: Path, ca: x509.Certificate, want: list[str],
                    now: dt.datetime) -> str:
    if not (crt_p.exists() and key_p.exists()):
        return "missing"
    crt = x509.load_pem_x509_certificate(crt_p.read_bytes())
    if sorted(_san_names(crt)) != sorted(want):
        return f"names {', '.join(want)}"
    if crt.not_valid_after_utc - now < RENEW_BEFORE:
        return "renewed before expiry"
    if crt.issuer != ca.subject:
        return "issued by the current CA"
    return ""


def ensure_broker_tls(directory: Path, names: Sequence[str], *,
                      writer: Optional[Writer] = None,
                      now: Optional[dt.datetime] = None,
                      ca_name: str = CA_NAME,
                      leaf: Literal["server", "edge"] = "server") -> list[TlsChange]:
    """Make sure ``directory`` holds ca.key, ca.crt, server.key and server.crt, the server
    certificate valid for exactly ``names`` (first = subject CN) and not close to expiry.

    Returns what changed. The CA is created only when there is none; a CA certificate
    whose key is gone is never replaced (devices pinned it), which is an error only when
    the server certificate has to be re-issued. ``ca_name`` names a new CA (the HTTPS
    listener has a CA of its own, see :mod:`.https_listener`). ``leaf="edge"`` makes
    edge.key/edge.crt from the same CA instead (the appliance's edge runs as another user
    than the broker, so it gets a key of its own).
    """
    write = writer or _default_writer
    now = now or dt.datetime.now(dt.timezone.utc)
    want = list(dict.fromkeys(names))
    if not want:
        raise ConfigError("broker TLS: no name to put in the server certificate")
    ca_key_p, ca_crt_p = directory / "ca.key", directory / "ca.crt"
    key_p, crt_p = directory / f"{leaf}.key", directory / f"{leaf}.crt"
    changes: list[TlsChange] = []
    ca_key: Optional[ec.EllipticCurvePrivateKey] = None
    if not ca_crt_p.exists():
        ca_key, ca = _make_ca(now, ca_name)
        write(ca_key_p, _pem_key(ca_key), "ca.key")
        write(ca_crt_p, ca.public_bytes(serialization.Encoding.PEM), "ca.crt")
        changes.append(TlsChange("created", ca_crt_p, ca_name))
    else:
        ca = x509.load_pem_x509_certificate(ca_crt_p.read_bytes())
    reason = _reissue_reason(crt_p, key_p, ca, want, now)
    if not reason:
        return changes
    if ca_key is None:
        if not ca_key_p.exists():
            raise ConfigError(
                f"{crt_p}: needs re-issuing ({reason}) but the CA key {ca_key_p} is gone; "
                f"refusing to replace a CA that devices may have pinned (remove {ca_crt_p} "
                "to start a new CA, then re-enrol the devices)")
        loaded = serialization.load_pem_private_key(ca_key_p.read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{ca_key_p}: not an EC private key")
        ca_key = loaded
    key, crt = _make_server(ca_key, ca, want, now)
    write(key_p, _pem_key(key), "edge.key" if leaf == "edge" else "server.key")
    write(crt_p, crt.public_bytes(serialization.Encoding.PEM),
          "edge.crt" if leaf == "edge" else "server.crt")
    changes.append(TlsChange("created" if reason == "missing" else "updated", crt_p,
                             "" if reason == "missing" else reason))
    return changes

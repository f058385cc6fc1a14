"""The one CA/certificate implementation (stack and appliance) and the TOML writer."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from dpanel_server.config import dump_config, load_config, stack_config
from dpanel_server.errors import ConfigError
from dpanel_server.pki import CA_DAYS, CERT_DAYS, ensure_broker_tls


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def _sans(c: x509.Certificate) -> set[str]:
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)}


def test_ca_and_server_certificate_follow_the_strict_rules(tmp_path: Path) -> None:
    changes = ensure_broker_tls(tmp_path, ["dp.example.com", "localhost", "127.0.0.1"])
    assert [c.path.name for c in changes] == ["ca.crt", "server.crt"]
    ca, srv = _cert(tmp_path / "ca.crt"), _cert(tmp_path / "server.crt")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=CA_DAYS) <= life <= dt.timedelta(days=CA_DAYS + 1)
    sbc = srv.extensions.get_extension_for_class(x509.BasicConstraints)
    assert sbc.critical and not sbc.value.ca
    sku = srv.extensions.get_extension_for_class(x509.KeyUsage)
    assert sku.critical and sku.value.digital_signature and not sku.value.key_cert_sign
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _sans(srv) == {"dp.example.com", "localhost", "127.0.0.1"}
    assert srv.not_valid_after_utc - srv.not_valid_before_utc <= dt.timedelta(days=CERT_DAYS + 1)
    srv.verify_directly_issued_by(ca)
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600


def test_second_run_changes_nothing_and_a_new_name_keeps_the_ca(tmp_path: Path) -> None:
    ensure_broker_tls(tmp_path, ["a.example", "127.0.0.1"])
    ca_pem = (tmp_path / "ca.crt").read_bytes()
    assert ensure_broker_tls(tmp_path, ["127.0.0.1", "a.example"]) == []
    [change] = ensure_broker_tls(tmp_path, ["b.example", "127.0.0.1"])
    assert change.what == "updated" and "b.example" in change.reason
    assert (tmp_path / "ca.crt").read_bytes() == ca_pem  # devices' pin still holds
    assert _sans(_cert(tmp_path / "server.crt")) == {"b.example", "127.0.0.1"}
    _cert(tmp_path / "server.crt").verify_directly_issued_by(_cert(tmp_path / "ca.crt"))


def test_renewed_before_expiry(tmp_path: Path) -> None:
    ensure_broker_tls(tmp_path, ["h"])
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=CERT_DAYS - 10)
    [change] = ensure_broker_tls(tmp_path, ["h"], now=later)
    assert change.reason == "renewed before expiry"


def test_a_pinned_ca_without_its_key_is_never_replaced(tmp_path: Path) -> None:
    ensure_broker_tls(tmp_path, ["h"])
    ca_pem = (tmp_path / "ca.crt").read_bytes()
    (tmp_path / "ca.key").unlink()  # as the old stack code left it
    assert ensure_broker_tls(tmp_path, ["h"]) == []  # nothing to sign: fine
    with pytest.raises(ConfigError, match="refusing to replace a CA"):
        ensure_broker_tls(tmp_path, ["other"])
    assert (tmp_path / "ca.crt").read_bytes() == ca_pem


def test_config_writer_escapes_what_it_writes(tmp_path: Path) -> None:
    cfg = stack_config(tmp_path)
    cfg.manager.ssh_user = 'ro"ot\\x\nnext = "injected"'
    cfg.tunnel.host_key = str(tmp_path / 'dir "with" quotes' / "k")
    (tmp_path / "server.toml").write_text(dump_config(cfg))
    back = load_config(tmp_path / "server.toml")
    assert back.manager.ssh_user == cfg.manager.ssh_user
    assert back.tunnel.host_key == cfg.tunnel.host_key


@pytest.mark.parametrize(("field", "value"), [
    ("tunnel.public_address", "0.0.0.0:2220"), ("broker.public_url", "mqtt://[::]:1883")])
def test_config_refuses_a_wildcard_advertised_address(tmp_path: Path, field: str,
                                                       value: str) -> None:
    cfg = stack_config(tmp_path)
    table, key = field.split(".")
    setattr(getattr(cfg, table), key, value)
    (tmp_path / "server.toml").write_text(dump_config(cfg))
    with pytest.raises(ConfigError, match=rf"{field}: .* no device can dial"):
        load_config(tmp_path / "server.toml")

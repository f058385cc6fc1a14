"""``mqtts://`` brokers: the agent verifies the broker against the CA in its token."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import pwd
import secrets
import subprocess
from pathlib import Path
from typing import Iterator

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dpanel_agent.agent import Agent
from dpanel_agent.config import AgentConfig
from dpanel_proto.token import DeviceToken
from dpanel_server.broker import mosquitto_hash, render_acl, render_passwd
from support import free_port, wait_port


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class TlsBroker:
    def __init__(self, d: Path, users: dict[str, str]) -> None:
        d.mkdir(parents=True)
        ca_key, self.ca = _ca("dpanel test CA")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
                .issuer_name(self.ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (d / "ca.pem").write_text(_pem(self.ca))
        (d / "server.pem").write_text(_pem(cert))
        (d / "server.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (d / "passwd").write_text(render_passwd(
            [(u, mosquitto_hash(p)) for u, p in users.items()]))
        (d / "acl").write_text(render_acl("dpanel-manager"))
        self.port = free_port()
        user = pwd.getpwuid(os.geteuid()).pw_name  # a root mosquitto would drop privileges
        (d / "mosquitto.conf").write_text(f"""\
user {user}
per_listener_settings false
allow_anonymous false
password_file {d / "passwd"}
acl_file {d / "acl"}
persistence false
log_dest stderr
listener {self.port} 127.0.0.1
use_username_as_clientid true
cafile {d / "ca.pem"}
certfile {d / "server.pem"}
keyfile {d / "server.key"}
""")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(d / "mosquitto.conf")],
                                     stdout=(d / "log").open("ab"), stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


SECRET = secrets.token_urlsafe(32)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TlsBroker]:
    b = TlsBroker(tmp_path / "mqtt", {"dev-1": SECRET})
    yield b
    b.stop()


def _token(broker: TlsBroker, ca_pem: str) -> DeviceToken:
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    return DeviceToken(device="dev-1", secret=SECRET, broker=f"mqtts://127.0.0.1:{broker.port}",
                       tunnel="127.0.0.1:1", tunnel_host_key=key, manager_key=key,
                       broker_ca=ca_pem)


async def _connected_within(agent: Agent, seconds: float) -> bool:
    for _ in range(int(seconds * 10)):
        if agent.connected:
            return True
        await asyncio.sleep(0.1)
    return agent.connected


async def test_mqtts_with_the_ca_from_the_token(broker: TlsBroker, tmp_path: Path) -> None:
    agent = Agent(AgentConfig(state_dir=tmp_path / "a", token=_token(broker, _pem(broker.ca)),
                              reconnect_min=0.2, reconnect_max=1))
    task = asyncio.ensure_future(agent.run())
    try:
        assert await _connected_within(agent, 20)
    finally:
        agent.stop()
        await asyncio.wait_for(task, 20)


async def test_mqtts_refuses_a_broker_signed_by_another_ca(broker: TlsBroker,
                                                           tmp_path: Path) -> None:
    _, other = _ca("someone else")
    agent = Agent(AgentConfig(state_dir=tmp_path / "a", token=_token(broker, _pem(other)),
                              reconnect_min=0.2, reconnect_max=1))
    task = asyncio.ensure_future(agent.run())
    try:
        # several attempts happen in this time; none may succeed
        assert not await _connected_within(agent, 3)
    finally:
        agent.stop()
        await asyncio.wait_for(task, 20)

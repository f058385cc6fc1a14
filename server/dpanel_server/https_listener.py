"""The API's HTTPS listener: which certificate it serves, made by our own CA when none is given.

Operators anywhere reach the manager here (``manager.https_listen``). Without an
operator-supplied certificate (``manager.https_cert``/``https_key``), a CA of its own
(not the broker's: devices pin that one, operators pin this one) lives in STATE_DIR/https
and issues a server certificate whose names cover the listen host, the advertised tunnel
host and loopback; it is re-issued when those change or expiry nears, the CA kept.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path

from dpanel_proto.util import parse_hostport

from .config import HTTPS_PORT, ServerConfig
from .errors import ConfigError

__all__ = ["HTTPS_CA_NAME", "https_ca_path", "https_files", "https_names"]

log = logging.getLogger("dpanel.https")

HTTPS_CA_NAME = "dPanel Edge HTTPS CA"


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def https_names(cfg: ServerConfig) -> list[str]:
    """The names the generated certificate must carry (first = subject CN)."""
    assert cfg.manager.https_listen is not None
    host, _ = parse_hostport(cfg.manager.https_listen, "manager.https_listen", HTTPS_PORT)
    adv, _ = parse_hostport(cfg.tunnel.public_address, "tunnel.public_address", 0)
    names = [] if _wildcard(host) else [host]
    if _wildcard(host):
        # every address of this machine: the advertised name and the host name
        names += [adv, socket.gethostname()]
    names += ["localhost", "127.0.0.1"]
    return list(dict.fromkeys(n for n in names if n))


def https_ca_path(cfg: ServerConfig) -> Path:
    return Path(cfg.state_dir) / "https" / "ca.crt"


def https_files(cfg: ServerConfig) -> tuple[str, str]:
    """(certificate, key) for the listener: the operator's, or our CA's (made if need be)."""
    m = cfg.manager
    if m.https_cert is not None and m.https_key is not None:
        for what, path in (("manager.https_cert", m.https_cert),
                           ("manager.https_key", m.https_key)):
            if not os.access(path, os.R_OK):
                raise ConfigError(f"{what}: {path} is missing or not readable")
        return m.https_cert, m.https_key
    from .pki import ensure_broker_tls

    directory = https_ca_path(cfg).parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for change in ensure_broker_tls(directory, https_names(cfg), ca_name=HTTPS_CA_NAME):
        log.info("HTTPS: %s %s %s", change.what, change.path, change.reason)
    return str(directory / "server.crt"), str(directory / "server.key")

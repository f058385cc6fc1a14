"""Checks before a deploy touches anything: reachable, root, Debian 12, systemd, free ports.

One read-only script gathers the facts in a single round trip; :func:`problems` judges
them (a pure function, so every refusal is unit-tested without a host).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Optional

from dpanel_proto.ports import API_PORT, BROKER_PORT, BROKER_TLS_PORT, TUNNEL_PORT

__all__ = ["FACTS_SCRIPT", "Facts", "Listener", "parse_facts", "problems"]

#: POSIX sh, read-only, works on any Linux so that "not Debian" gets a clear answer.
FACTS_SCRIPT = r"""
echo "uid=$(id -u)"
if [ -r /etc/os-release ]; then
    . /etc/os-release
    echo "os_id=${ID:-}"
    echo "os_version=${VERSION_ID:-}"
    echo "os_name=${PRETTY_NAME:-}"
fi
echo "arch=$(dpkg --print-architecture 2>/dev/null || uname -m)"
[ -d /run/systemd/system ] && echo systemd=yes || echo systemd=no
echo "build_id=$(cat /opt/dpanel/BUILD-ID 2>/dev/null)"
for u in dpanel-tunnel dpanel-manager mosquitto; do
    echo "active_$u=$(systemctl is-active "$u" 2>/dev/null)"
done
[ -e /etc/dpanel/mosquitto.conf ] && echo ours_broker=yes
[ -e /etc/dpanel/server.toml ] && echo has_config=yes
echo "mosquitto_confd=$(ls /etc/mosquitto/conf.d/*.conf 2>/dev/null | tr '\n' ' ')"
echo "---tcp"
cat /proc/net/tcp /proc/net/tcp6 2>/dev/null
exit 0
"""



@dataclass(frozen=True)
class Listener:
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


@dataclass
class Facts:
    values: dict[str, str] = field(default_factory=dict)
    listeners: list[Listener] = field(default_factory=list)

    def get(self, key: str) -> str:
        return self.values.get(key, "")

    def active(self, unit: str) -> bool:
        return self.get(f"active_{unit}") == "active"


def _hex_addr(text: str) -> str:
    """/proc/net/tcp's little-endian-per-word hex address -> text."""
    raw = bytes.fromhex(text)
    words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]
    return str(ipaddress.ip_address(b"".join(words)))


def parse_facts(text: str) -> Facts:
    facts = Facts()
    head, _, tcp = text.partition("---tcp\n")
    for line in head.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            facts.values[key.strip()] = value.strip()
    for line in tcp.splitlines():
        cols = line.split()
        if len(cols) < 4 or cols[3] != "0A" or ":" not in cols[1]:  # 0A == LISTEN
            continue
        addr, _, port = cols[1].partition(":")
        try:
            facts.listeners.append(Listener(_hex_addr(addr), int(port, 16)))
        except ValueError:
            continue
    return facts


def _taken(facts: Facts, port: int, *, loopback_only: bool) -> list[Listener]:
    """Listeners that would collide with ours on ``port`` (a wildcard or loopback
    listener collides with our loopback one; anything collides with a wildcard)."""
    out = []
    for ln in facts.listeners:
        if ln.port != port:
            continue
        if loopback_only and not (ln.loopback or ipaddress.ip_address(ln.address)
                                  .is_unspecified):
            continue
        out.append(ln)
    return out


def _broker_is_ours(facts: Facts) -> bool:
    """Our configured broker, or Debian's stock one that nobody configured yet."""
    return facts.active("mosquitto") and (facts.get("ours_broker") == "yes"
                                          or not facts.get("mosquitto_confd"))


Check = Callable[[Facts, str, str], Optional[str]]


def _root(f: Facts, host: str, arch: str) -> Optional[str]:
    if f.get("uid") != "0":
        return (f"{host}: deploy needs root (got uid {f.get('uid') or '?'}); "
                "use root@HOST or run --local as root")
    return None


def _debian12(f: Facts, host: str, arch: str) -> Optional[str]:
    if f.get("os_id") != "debian" or f.get("os_version") != "12":
        name = f.get("os_name") or f.get("os_id") or "an unknown OS (no /etc/os-release)"
        return f"{host} runs {name}; the dPanel server package is for Debian 12 (bookworm)"
    return None


def _arch(f: Facts, host: str, arch: str) -> Optional[str]:
    if f.get("arch") != arch:
        return (f"{host} is {f.get('arch') or '?'}, the package is built for {arch} "
                f"(run build-deb and deploy from an {f.get('arch')} Debian 12 machine)")
    return None


def _systemd(f: Facts, host: str, arch: str) -> Optional[str]:
    if f.get("systemd") != "yes":
        return f"{host}: systemd is not running as PID 1; the services need it"
    return None


def _foreign_broker(f: Facts, host: str, arch: str) -> Optional[str]:
    confd = f.get("mosquitto_confd")
    if confd and f.get("ours_broker") != "yes":
        return (f"{host} already has a Mosquitto configured for something else ({confd.strip()}); "
                "dPanel needs the broker to itself")
    return None


#: port, loopback only, owner check, what it is
PORTS: tuple[tuple[int, bool, Callable[[Facts], bool], str], ...] = (
    (TUNNEL_PORT, False, lambda f: f.active("dpanel-tunnel"), "the tunnel"),
    (BROKER_TLS_PORT, False, _broker_is_ours, "MQTT over TLS"),
    (BROKER_PORT, True, _broker_is_ours, "the broker's loopback listener"),
    (API_PORT, True, lambda f: f.active("dpanel-manager"), "the manager API"),
)


def _ports(f: Facts, host: str, arch: str) -> Optional[str]:
    taken = []
    for port, loopback, ours, what in PORTS:
        holders = _taken(f, port, loopback_only=loopback)
        if holders and not ours(f):
            where = ", ".join(sorted({h.address for h in holders}))
            taken.append(f"port {port} ({what}) is already in use on {where}")
    if taken:
        return f"{host}: " + "; ".join(taken) + " (stop whatever listens there)"
    return None


#: In order: the first ones explain the later ones (no point listing ports on Alpine).
CHECKS: tuple[Check, ...] = (_root, _debian12, _arch, _systemd, _foreign_broker, _ports)


def problems(facts: Facts, host: str, arch: str) -> list[str]:
    out = []
    for check in CHECKS:
        msg = check(facts, host, arch)
        if msg:
            out.append(msg)
            if check in (_root, _debian12):
                break
    return out

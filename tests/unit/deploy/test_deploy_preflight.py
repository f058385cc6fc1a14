"""Preflight: facts parsing and every refusal, without a host."""

from __future__ import annotations

import re

import pytest

from dpanel_deploy.deploy import public_host_of
from dpanel_deploy.preflight import Listener, parse_facts, problems

HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
          "   uid  timeout inode\n")


def tcp(addr_hex: str, port: int, state: str = "0A") -> str:
    return (f"   0: {addr_hex}:{port:04X} 00000000:0000 {state} 00000000:00000000 "
            "00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0\n")


def facts_text(listeners: str = "", **values: str) -> str:
    base = {"uid": "0", "os_id": "debian", "os_version": "12",
            "os_name": "Debian GNU/Linux 12 (bookworm)", "arch": "amd64", "systemd": "yes",
            "build_id": "", "active_dpanel-tunnel": "inactive",
            "active_dpanel-manager": "inactive", "active_mosquitto": "inactive",
            "mosquitto_confd": ""}
    base.update(values)
    head = "".join(f"{k}={v}\n" for k, v in base.items())
    return head + "---tcp\n" + HEADER + listeners


def test_parse_facts_decodes_proc_net_tcp() -> None:
    f = parse_facts(facts_text(
        tcp("0100007F", 1883) + tcp("00000000", 22) + tcp("0500000A", 8883)
        + tcp("0100007F", 40000, state="01")  # established: not a listener
        + tcp("00000000000000000000000001000000", 8780)
        + tcp("00000000000000000000000000000000", 2220)))
    assert f.listeners == [Listener("127.0.0.1", 1883), Listener("0.0.0.0", 22),
                           Listener("10.0.0.5", 8883), Listener("::1", 8780),
                           Listener("::", 2220)]
    assert f.get("os_id") == "debian" and f.active("mosquitto") is False


def test_a_fresh_debian_12_host_passes() -> None:
    assert problems(parse_facts(facts_text(tcp("00000000", 22))), "h", "amd64") == []


@pytest.mark.parametrize("values,message", [
    ({"uid": "1000"}, r"h: deploy needs root \(got uid 1000\)"),
    ({"os_id": "alpine", "os_version": "3.19", "os_name": "Alpine Linux v3.19"},
     r"h runs Alpine Linux v3\.19; .*Debian 12"),
    ({"os_version": "11", "os_name": "Debian GNU/Linux 11 (bullseye)"},
     r"h runs Debian GNU/Linux 11 \(bullseye\)"),
    ({"os_id": "", "os_version": "", "os_name": ""}, r"an unknown OS"),
    ({"arch": "arm64"}, r"h is arm64, the package is built for amd64"),
    ({"systemd": "no"}, r"systemd is not running as PID 1"),
    ({"mosquitto_confd": "/etc/mosquitto/conf.d/site.conf "},
     r"already has a Mosquitto configured for something else \(/etc/mosquitto/conf\.d/site"),
])
def test_refusals(values: dict[str, str], message: str) -> None:
    found = problems(parse_facts(facts_text(**values)), "h", "amd64")
    assert len(found) == 1
    assert re.search(message, found[0]), found


def test_not_root_stops_before_the_other_checks() -> None:
    f = parse_facts(facts_text(uid="1000", os_id="alpine", systemd="no"))
    assert len(problems(f, "h", "amd64")) == 1


@pytest.mark.parametrize("listeners,port", [
    (tcp("00000000", 2220), 2220),  # someone else on the tunnel port
    (tcp("00000000000000000000000000000000", 8883), 8883),
    (tcp("0100007F", 1883), 1883),  # a foreign loopback broker
    (tcp("00000000", 1883), 1883),  # a wildcard listener takes our loopback port too
    (tcp("0100007F", 8780), 8780),
])
def test_taken_ports_are_refused(listeners: str, port: int) -> None:
    found = problems(parse_facts(facts_text(listeners)), "h", "amd64")
    assert len(found) == 1 and f"port {port} " in found[0] and "already in use" in found[0]


def test_our_own_listeners_are_not_conflicts() -> None:
    mine = (tcp("00000000", 2220) + tcp("00000000", 8883) + tcp("0100007F", 1883)
            + tcp("0100007F", 8780))
    f = parse_facts(facts_text(mine, **{
        "active_dpanel-tunnel": "active", "active_dpanel-manager": "active",
        "active_mosquitto": "active", "ours_broker": "yes"}))
    assert problems(f, "h", "amd64") == []


def test_debians_stock_broker_may_be_taken_over() -> None:
    f = parse_facts(facts_text(tcp("0100007F", 1883), active_mosquitto="active"))
    assert problems(f, "h", "amd64") == []


def test_a_loopback_port_on_another_address_is_no_conflict() -> None:
    f = parse_facts(facts_text(tcp("0500000A", 1883) + tcp("0500000A", 8780)))
    assert problems(f, "h", "amd64") == []


@pytest.mark.parametrize("dest,host", [
    ("root@example.com", "example.com"), ("example.com", "example.com"),
    ("ssh://root@example.com:2222", "example.com"), ("root@[2001:db8::1]:22", "2001:db8::1"),
    ("root@10.0.0.5", "10.0.0.5"), ("2001:db8::1", "2001:db8::1"),
])
def test_public_host_of(dest: str, host: str) -> None:
    assert public_host_of(dest) == host

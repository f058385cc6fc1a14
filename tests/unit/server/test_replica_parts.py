"""Manager replicas without processes: the config, what each replica subscribes to and
under which client id, and job parts cut only by the replica that ran them (both
engines). The processes themselves: tests/integration/test_manager_replicas.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpanel_proto import wire
from dpanel_server.config import ServerConfig, load_config
from dpanel_server.errors import ConfigError
from dpanel_server.jobs import JobSpec, JobStore
from dpanel_server.registry import Registry
from dpanel_server.requests import client_id, subscriptions


def _cfg(tmp_path: Path, text: str) -> ServerConfig:
    p = tmp_path / "server.toml"
    p.write_text(text)
    return load_config(p)


def test_a_replica_has_its_own_client_id_and_shares_audit_on_one_mosquitto(
        tmp_path: Path) -> None:
    lone = _cfg(tmp_path, "")
    assert client_id(lone) == "dpanel-manager"
    assert subscriptions(lone) == list(wire.MANAGER_SUBSCRIPTIONS)
    a = _cfg(tmp_path, '[broker]\nauth = "dynsec"\n[manager]\nreplica = "a"\n')
    assert client_id(a) == "dpanel-manager-a"
    subs = subscriptions(a)
    # statuses and answers reach every replica; audit records one of them
    assert f"{wire.TOPIC_ROOT}/+/status" in subs and f"{wire.TOPIC_ROOT}/+/resp" in subs
    assert f"$share/dpanel-managers/{wire.TOPIC_ROOT}/+/audit" in subs
    assert f"{wire.TOPIC_ROOT}/+/audit" not in subs


def test_no_shared_subscription_where_the_broker_may_lack_them(tmp_path: Path) -> None:
    plain = list(wire.MANAGER_SUBSCRIPTIONS)
    rabbit = _cfg(tmp_path, '[broker]\nauth = "http"\n[manager]\nreplica = "b"\n')
    assert subscriptions(rabbit) == plain  # RabbitMQ 3.10: MQTT 3.1.1 only
    cluster = _cfg(tmp_path, '[broker]\nauth = "dynsec"\n'
                   'url = "mqtt://127.0.0.1:1883,mqtt://127.0.0.1:1884"\n'
                   '[manager]\nreplica = "b"\n')
    assert subscriptions(cluster) == plain
    off = _cfg(tmp_path, '[broker]\nauth = "dynsec"\n[manager]\nreplica = "b"\n'
               'shared_subscriptions = "off"\n')
    assert subscriptions(off) == plain


@pytest.mark.parametrize(("text", "field"), [
    ('[broker]\nauth = "dynsec"\n[manager]\nreplica = "A b"\n', "manager.replica"),
    ('[broker]\nauth = "dynsec"\n[manager]\nreplica = "' + "x" * 33 + '"\n',
     "manager.replica"),
    ('[manager]\nreplica = "a"\n', "manager.replica"),  # files: one client id per user
    ('[manager]\nshared_subscriptions = "yes"\n', "manager.shared_subscriptions"),
])
def test_bad_replica_settings_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        _cfg(tmp_path, text)


def test_a_restarting_replica_cuts_only_its_own_running_parts(registry_url: str) -> None:
    reg = Registry(registry_url)
    try:
        reg.add("d1")
        reg.add("d2")
        a, b = JobStore(reg, "a"), JobStore(reg, "b")
        a.add("j1", JobSpec(command="true"), {"devices": ["d1", "d2"]}, "admin", ["d1", "d2"])
        assert a.claim("j1", "d1") and b.claim("j1", "d2")
        assert not b.claim("j1", "d1")  # the compare-and-set, across stores
        assert b.cut_by_restart() == 1  # b restarted: its own part only
        parts = {p["device"]: p["state"] for p in a.job("j1")["parts"]}
        assert parts == {"d1": "running", "d2": "failed"}
    finally:
        reg.close()

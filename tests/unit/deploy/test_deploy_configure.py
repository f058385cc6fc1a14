"""dpanel-configure's pure parts: the server.toml and mosquitto.conf it writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dpanel_deploy.configure import Layout, Options, _desired_config, render_mosquitto_conf
from dpanel_deploy.debpkg import _fix_venv_paths
from dpanel_deploy.deploy import write_handover
from dpanel_server.config import load_config


def _layout(tmp_path: Path) -> Layout:
    lay = Layout(etc=tmp_path / "etc", state=tmp_path / "state")
    lay.etc.mkdir()
    return lay


def test_first_run_needs_a_public_host(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--public-host is required"):
        _desired_config(_layout(tmp_path), Options())


def test_config_from_public_host(tmp_path: Path) -> None:
    lay = _layout(tmp_path)
    lay.config.write_text(_desired_config(lay, Options(public_host="dp.example.com")))
    cfg = load_config(lay.config)
    assert cfg.tunnel.public_address == "dp.example.com:2220"
    assert cfg.tunnel.listen == "0.0.0.0:2220"
    assert cfg.broker.public_url == "mqtts://dp.example.com:8883"
    assert cfg.broker.url == "mqtt://127.0.0.1:1883"  # the manager stays on loopback
    assert cfg.broker.reload == "none"  # the .path unit reloads mosquitto
    assert cfg.manager.api_listen == "127.0.0.1:8780"
    assert cfg.broker.passwd_path == str(lay.state / "mosquitto" / "passwd")
    assert cfg.broker.ca_file == str(lay.etc / "tls" / "ca.crt")


def test_rerun_without_options_keeps_the_public_addresses(tmp_path: Path) -> None:
    lay = _layout(tmp_path)
    first = _desired_config(lay, Options(tunnel_public="127.0.0.1:40000",
                                         broker_public="[2001:db8::5]:40001"))
    lay.config.write_text(first)
    assert _desired_config(lay, Options()) == first
    changed = _desired_config(lay, Options(public_host="new.example.com"))
    cfg_text = changed
    assert "new.example.com:2220" in cfg_text and "mqtts://new.example.com:8883" in cfg_text


def test_bad_public_address_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--tunnel-public: port '99999'"):
        _desired_config(_layout(tmp_path), Options(tunnel_public="h:99999",
                                                   broker_public="h:8883"))


def test_mosquitto_conf_is_locked_down(tmp_path: Path) -> None:
    text = render_mosquitto_conf(_layout(tmp_path))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert "allow_anonymous false" in lines
    assert "per_listener_settings false" in lines
    listeners = [ln for ln in lines if ln.startswith("listener ")]
    assert listeners == ["listener 1883 127.0.0.1", "listener 8883"]
    tls_part = lines[lines.index("listener 8883"):]
    assert any(ln.startswith("keyfile ") for ln in tls_part)
    assert lines.count("use_username_as_clientid true") == 2  # per listener


def test_venv_paths_are_rewritten(tmp_path: Path) -> None:
    venv = tmp_path / "stage" / "opt" / "dpanel"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "dpanel").write_text(f"#!{venv}/bin/python\nimport x\n")
    (venv / "bin" / "python").symlink_to("/usr/bin/python3")
    (venv / "pyvenv.cfg").write_text(f"home = /usr/bin\ncommand = /usr/bin/python3 -m venv "
                                     f"{venv}\n")
    _fix_venv_paths(venv, str(venv))
    assert (venv / "bin" / "dpanel").read_text().startswith("#!/opt/dpanel/bin/python\n")
    assert str(tmp_path) not in (venv / "pyvenv.cfg").read_text()


def test_handover_files(tmp_path: Path) -> None:
    e = {"tunnel": "h:2220", "tunnel_host_key": "ssh-ed25519 AAAA h",
         "manager_key": "ssh-ed25519 BBBB m", "broker_ca": "-----BEGIN CERTIFICATE-----\n",
         "broker": "mqtts://h:8883"}
    files = write_handover(e, tmp_path / "out")
    assert sorted(p.name for p in files) == ["broker-ca.crt", "manager_key.pub", "server.json",
                                             "tunnel_host_key.pub"]
    assert (tmp_path / "out" / "tunnel_host_key.pub").read_text() == "ssh-ed25519 AAAA h\n"


@pytest.mark.parametrize(("opts", "flag"), [
    (Options(public_host="0.0.0.0"), "--advertise"),
    (Options(tunnel_public="[::]:2220", broker_public="h:8883"), "--tunnel-public"),
])
def test_wildcard_is_never_advertised(tmp_path: Path, opts: Options, flag: str) -> None:
    with pytest.raises(SystemExit, match=rf"{flag}: .* no device can dial"):
        _desired_config(_layout(tmp_path), opts)


def test_advertise_is_the_public_host_option(tmp_path: Path) -> None:
    from dpanel_deploy.configure import _parser

    assert _parser().parse_args(["--advertise", "dp.example"]).public_host == "dp.example"
    assert _parser().parse_args(["--public-host", "dp.example"]).public_host == "dp.example"


def test_appliance_broker_has_the_public_limits(tmp_path: Path) -> None:
    text = render_mosquitto_conf(_layout(tmp_path))
    public = text[text.index("listener 8883"):]
    loopback = text[text.index("listener 1883"):text.index("listener 8883")]
    assert "max_connections 60000" in public and "max_qos 1" in public
    assert "max_connections" not in loopback  # the manager's listener is never capped
    assert "max_packet_size 65536" in text and "max_queued_bytes" in text
    assert "\nuser " not in text  # the unit starts it as mosquitto


def test_rerun_keeps_the_registry_url_and_metrics_listener(tmp_path: Path) -> None:
    lay = _layout(tmp_path)
    text = _desired_config(lay, Options(public_host="dp.example.com"))
    assert "\n[registry]\n" in text  # written empty: where the URL goes
    lay.config.write_text(text.replace(
        "\n[registry]\n", '\n[registry]\nurl = "postgresql://dpanel@db/dpanel"\n'))
    cfg = load_config(lay.config)
    assert cfg.registry_url == "postgresql://dpanel@db/dpanel"
    lay.config.write_text(_desired_config(lay, Options()))
    again = load_config(lay.config)
    assert again.registry_url == "postgresql://dpanel@db/dpanel"
    assert again.tunnel.metrics_listen == "127.0.0.1:9781"


def test_operator_listener_is_off_until_asked_and_kept_on_reruns(tmp_path: Path) -> None:
    lay = _layout(tmp_path)
    first = _desired_config(lay, Options(public_host="dp.example.com"))
    assert "https_listen =" not in first  # default: off
    lay.config.write_text(first)
    lay.config.write_text(_desired_config(lay, Options(https_listen="0.0.0.0:443")))
    assert 'https_listen = "0.0.0.0:443"' in lay.config.read_text()
    # devices fetch agent updates there, at the name they dial (not the wildcard)
    assert 'update_url = "https://dp.example.com:443"' in lay.config.read_text()
    # a hand-set certificate survives a re-run (package upgrade) without options
    lay.config.write_text(lay.config.read_text().replace(
        'https_listen = "0.0.0.0:443"',
        'https_listen = "0.0.0.0:443"\nhttps_cert = "/etc/c.pem"\nhttps_key = "/etc/k.pem"'))
    again = _desired_config(lay, Options())
    assert 'https_cert = "/etc/c.pem"' in again and 'https_listen = "0.0.0.0:443"' in again
    off = _desired_config(lay, Options(https_listen=""))
    assert "https_listen =" not in off and "https_cert =" not in off
    assert "update_url =" not in off
    with pytest.raises(SystemExit, match="--https-listen: port"):
        _desired_config(lay, Options(https_listen="0.0.0.0:99999"))


def test_listen_dropin_adds_only_what_the_address_needs() -> None:
    from dpanel_deploy.configure import listen_dropin

    public_443 = listen_dropin("0.0.0.0:443", "--https-listen")
    assert public_443 is not None
    body = [ln for ln in public_443.splitlines() if ln and not ln.startswith("#")]
    assert body == ["[Service]", "IPAddressAllow=any",
                    "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                    "AmbientCapabilities=CAP_NET_BIND_SERVICE"]
    high = listen_dropin("0.0.0.0:8443", "--edge-listen")
    assert high is not None and "CAP_NET_BIND_SERVICE" not in high
    assert "IPAddressAllow=any" in high
    low_loop = listen_dropin("127.0.0.1:443", "--https-listen")
    assert low_loop is not None and "IPAddressAllow" not in low_loop
    assert listen_dropin("127.0.0.1:8443", "--https-listen") is None  # the unit suffices
    assert listen_dropin(None, "--https-listen") is None


def test_edge_is_off_until_asked_kept_and_names_its_public_address(tmp_path: Path) -> None:
    lay = _layout(tmp_path)
    first = _desired_config(lay, Options(public_host="dp.example.com"))
    assert load_config_text(lay, first).edge.listen is None
    cfg = load_config_text(lay, _desired_config(lay, Options(edge_listen="0.0.0.0:443")))
    assert cfg.edge.listen == "0.0.0.0:443"
    assert cfg.edge.public_address == "dp.example.com:443"  # the advertised host
    assert cfg.edge.cert_file == str(lay.tls / "edge.crt")
    assert cfg.edge.broker_upstream == "mqtts://127.0.0.1:8883"  # the device listener
    again = load_config_text(lay, _desired_config(lay, Options()))
    assert again.edge.listen == "0.0.0.0:443"
    nat = load_config_text(lay, _desired_config(lay, Options(edge_public="1.2.3.4:10443")))
    assert nat.edge.public_address == "1.2.3.4:10443" and nat.edge.listen == "0.0.0.0:443"
    off = load_config_text(lay, _desired_config(lay, Options(edge_listen="")))
    assert off.edge.listen is None and off.edge.public_address is None


def test_edge_and_https_cannot_share_a_port(tmp_path: Path) -> None:
    lay = _layout(tmp_path)
    lay.config.write_text(_desired_config(lay, Options(public_host="dp.example.com",
                                                       https_listen="0.0.0.0:443")))
    with pytest.raises(SystemExit, match=r"--edge-listen 0\.0\.0\.0:443 and --https-listen "
                       r"0\.0\.0\.0:443 share port 443.*ALPN"):
        _desired_config(lay, Options(edge_listen="0.0.0.0:443"))
    with pytest.raises(SystemExit, match="--edge-public needs --edge-listen"):
        _desired_config(lay, Options(edge_public="h:443"))


def test_broker_auth_dynsec_on_fresh_installs_files_kept_on_upgrades(tmp_path: Path) -> None:
    from dpanel_deploy import configure

    lay = _layout(tmp_path)
    fresh = load_config_text(lay, _desired_config(lay, Options(public_host="dp.example.com")))
    assert fresh.broker.auth == configure._default_broker_auth()
    assert fresh.broker.dynsec_path == str(lay.dynsec_dir / "dynamic-security.json")
    # an appliance from before: its file says files (the old default), and stays so
    lay.config.write_text(lay.config.read_text().replace('auth = "dynsec"', 'auth = "files"'))
    assert load_config_text(lay, _desired_config(lay, Options())).broker.auth == "files"
    switched = load_config_text(lay, _desired_config(lay, Options(broker_auth="dynsec")))
    assert switched.broker.auth == "dynsec"


def test_dynsec_mosquitto_conf_names_the_plugin_not_the_files(tmp_path: Path) -> None:
    pytest.importorskip("dpanel_server.dynsec")
    from dpanel_server.dynsec import find_plugin

    try:
        plugin = find_plugin()
    except Exception:
        pytest.skip("mosquitto's dynamic-security plugin is not installed")
    lay = _layout(tmp_path)
    text = render_mosquitto_conf(lay, dynsec=True)
    assert f"plugin {plugin}\n" in text
    assert f"plugin_opt_config_file {lay.dynsec_dir / 'dynamic-security.json'}" in text
    assert "password_file" not in text and "acl_file" not in text
    assert "allow_anonymous false" in text


def test_https_cert_needs_its_key_and_is_copied_to_etc(tmp_path: Path) -> None:
    lay = _layout(tmp_path)
    lay.config.write_text(_desired_config(lay, Options(public_host="dp.example.com",
                                                       https_listen="0.0.0.0:443")))
    with pytest.raises(SystemExit, match="--https-cert, --https-key: give both"):
        _desired_config(lay, Options(https_cert="/root/c.pem"))
    own = load_config_text(lay, _desired_config(lay, Options(https_cert="/root/c.pem",
                                                             https_key="/root/k.pem")))
    assert own.manager.https_cert == str(lay.operator_https / "server.crt")
    assert own.manager.https_key == str(lay.operator_https / "server.key")
    back = load_config_text(lay, _desired_config(lay, Options(https_cert="", https_key="")))
    assert back.manager.https_cert is None and back.manager.https_listen == "0.0.0.0:443"


def test_handover_has_the_operators_https_ca(tmp_path: Path) -> None:
    e = {"tunnel": "h:2220", "tunnel_host_key": "ssh-ed25519 AAAA h",
         "manager_key": "ssh-ed25519 BBBB m", "broker_ca": "-----BEGIN CERTIFICATE-----\n",
         "broker": "mqtts://h:8883", "https_ca": "-----BEGIN CERTIFICATE-----\nX\n"}
    write_handover(e, tmp_path / "out")
    assert (tmp_path / "out" / "https-ca.crt").read_text() == e["https_ca"]


def load_config_text(lay: Layout, text: str) -> Any:
    lay.config.write_text(text)
    return load_config(lay.config)


def test_appliance_edge_splices_mqtt_to_the_device_listener(tmp_path: Path) -> None:
    """The appliance's edge: MQTT to the broker's TLS device listener (its limits),
    verified against the broker CA; SSH to the tunnel from per-source loopback addresses."""
    from dpanel_server.edge import ALPN_MQTT, ALPN_SSH, edge_from_config
    from dpanel_server.pki import ensure_broker_tls

    lay = _layout(tmp_path)
    cfg = load_config_text(lay, _desired_config(lay, Options(public_host="dp.example.com",
                                                             edge_listen="127.0.0.1:8443")))
    ensure_broker_tls(lay.tls, ["dp.example.com"], leaf="edge")
    edge = edge_from_config(cfg)
    mqtt, ssh = edge._routes[ALPN_MQTT], edge._routes[ALPN_SSH]
    assert (mqtt.host, mqtt.port, mqtt.ca_file) == ("127.0.0.1", 8883, cfg.broker.ca_file)
    assert (ssh.host, ssh.port, ssh.spread_source) == ("127.0.0.1", 2220, True)

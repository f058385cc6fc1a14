"""AgentConfig: TOML validated once, errors name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpanel_agent.config import AgentConfig, ConfigError, load_config, parse_config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_full_example_loads(tmp_path: Path) -> None:
    p = _write(tmp_path, """
token_file = "/var/lib/dpanel-tunnel/token"
import_token_from = ["/boot/firmware/dpanel-token.txt", "/boot/dpanel-token.txt"]
state_dir = "/var/lib/dpanel-tunnel"
log_level = "debug"
ssh_target = "sshd"
sshd_port = 2022
allow_forward_hosts = ["127.0.0.1"]
request_clock_skew = 300
idle_timeout_max = 1800
mqtt_protocol = "5"
""")
    cfg = load_config(p)
    assert cfg.token_path == Path("/var/lib/dpanel-tunnel/token")
    assert cfg.import_token_from == (Path("/boot/firmware/dpanel-token.txt"),
                                     Path("/boot/dpanel-token.txt"))
    assert (cfg.ssh_target, cfg.sshd_port, cfg.mqtt_protocol) == ("sshd", 2022, "5")
    assert cfg.allow_forward_hosts == ("127.0.0.1",)
    assert cfg.request_clock_skew == 300 and cfg.idle_timeout_max == 1800
    assert cfg.source == str(p)


def test_defaults() -> None:
    cfg = AgentConfig(state_dir=Path("/s"))
    assert cfg.token_path == Path("/s/token")
    assert cfg.host_key_path == Path("/s/ssh_host_ed25519_key")
    assert cfg.ssh_target == "builtin" and cfg.sshd_port == 22
    assert cfg.allow_forward_hosts == ("127.0.0.1", "::1", "localhost")
    assert cfg.mqtt_keepalive == 60 and cfg.mqtt_protocol == "3.1.1"


@pytest.mark.parametrize(("text", "expected"), [
    ('log_level = "info"\nssh_target = "dropbear"\n', ":2: ssh_target: expected one of"),
    ('sshd_port = 70000\n', ":1: sshd_port: must be 1-65535"),
    ('sshd_port = "22"\n', ":1: sshd_port: expected an integer"),
    ('sshd_port = true\n', ":1: sshd_port: expected an integer"),
    ('\n\nallow_forward_hosts = "127.0.0.1"\n', ":3: allow_forward_hosts: expected a list"),
    ('allow_forward_hosts = ["a b"]\n', "allow_forward_hosts: 'a b' is not a host"),
    ('request_clock_skew = -1\n', ":1: request_clock_skew: must be 0-86400"),
    ('idle_timout_max = 5\n', ":1: unknown key 'idle_timout_max' (did you mean "
                              "'idle_timeout_max'?)"),
    ('[mqtt]\nkeepalive = 5\n', ":1: unknown section 'mqtt'"),
    ('token = "dpt1.x.y"\n', ":1: token: do not put the token in the config file"),
    ('log_level = \n', "not valid TOML"),
    ('reconnect_min = 10\nreconnect_max = 5\n', "reconnect_min/reconnect_max"),
    ('shell = "bash"\n', ":1: shell: 'bash' must be an absolute path"),
    ('state_dir = ""\n', ":1: state_dir: expected a non-empty path"),
])
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert msg.startswith(str(p)), msg
    assert expected in msg, msg


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def test_overrides_are_validated_again() -> None:
    cfg = parse_config('log_level = "info"\n', "x.toml")
    assert cfg.with_overrides(log_level="debug", state_dir=None).log_level == "debug"
    with pytest.raises(ConfigError, match="log_level"):
        cfg.with_overrides(log_level="loud")


def test_pins_dir_default_and_key() -> None:
    from dpanel_agent.config import DEFAULT_PINS_DIR

    assert AgentConfig().pins_dir == DEFAULT_PINS_DIR == Path("/etc/dpanel/pins")
    assert parse_config('pins_dir = "/opt/pins"\n').pins_dir == Path("/opt/pins")

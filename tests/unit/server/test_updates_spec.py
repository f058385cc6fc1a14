"""A rollout's download URL: one that devices cannot reach is refused before anything
is offered (a loopback URL from the manager host would fail every device)."""

from __future__ import annotations

import pytest

from dpanel_server.config import ConfigError, ManagerConfig
from dpanel_server.updates import UpdateError
from dpanel_server.updates_api import _spec


def test_a_loopback_url_is_refused_when_devices_are_elsewhere() -> None:
    with pytest.raises(UpdateError, match=r"url_base: http://127\.0\.0\.1:8\d+/ is loopback.*"
                                          r"dpanel\.example\.com.*manager\.update_url"):
        _spec({"version": "1.0"}, "http://127.0.0.1:8080/", "dpanel.example.com")
    for base in ("http://localhost/", "https://[::1]:9443/"):
        with pytest.raises(UpdateError, match="is loopback"):
            _spec({"version": "1.0", "url_base": base}, "https://x.example/", "203.0.113.7")


@pytest.mark.parametrize(("base", "devices"), [
    ("http://127.0.0.1:8080/", "127.0.0.1"),  # the demo: devices on this host too
    ("https://dpanel.example.com/", "dpanel.example.com"),
    ("https://10.0.0.5:8443/", "10.0.0.5"),
])
def test_reachable_urls_pass(base: str, devices: str) -> None:
    assert _spec({"version": "1.0"}, base, devices).url_base == base


def test_update_url_is_checked_once_at_load() -> None:
    with pytest.raises(ConfigError, match=r"manager\.update_url: 'ftp://x' is not"):
        ManagerConfig(update_url="ftp://x").validate()
    with pytest.raises(ConfigError, match=r"manager\.update_url"):
        ManagerConfig(update_url="https://a b").validate()
    ManagerConfig(update_url="https://dpanel.example.com").validate()


@pytest.mark.parametrize("base", ["https://m.example/\nX-Evil: 1", "https://m.example/ a",
                                  "https://m.example/\x1b[31m", "ftp://m.example/"])
def test_a_url_the_agent_would_refuse_is_refused_before_any_offer(base: str) -> None:
    with pytest.raises(UpdateError, match=r"^url_base: expected"):
        _spec({"version": "1.0", "url_base": base}, "https://x.example/", "x.example")


"""Roles and label scopes: the one check every API route makes."""

from __future__ import annotations

import pytest

from dpanel_server.authz import ACTIONS, ROLES, Forbidden, Principal, in_scope, require
from dpanel_server.errors import DPanelError


def test_viewer_reads_only() -> None:
    v = Principal("vera", "viewer")
    require(v, "read", "d1", {})
    for action in ("exec", "tunnel", "enrol", "users"):
        with pytest.raises(Forbidden, match=r"vera is a viewer: .* needs the (operator|admin)"):
            require(v, action)  # type: ignore[arg-type]


def test_operator_scope_names_the_device_and_scope() -> None:
    op = Principal("olga", "operator", ("site=a",))
    require(op, "exec", "d1", {"site": "a"})
    with pytest.raises(Forbidden, match=r"device d2 is outside olga's scope \(site=a\)"):
        require(op, "exec", "d2", {"site": "b"})
    with pytest.raises(Forbidden, match="needs the admin role"):
        require(op, "enrol")


def test_several_selectors_widen_the_scope() -> None:
    op = Principal("o", "operator", ("site=a", "site=b"))
    assert in_scope(op, {"site": "b"}) and not in_scope(op, {"site": "c"})
    assert not in_scope(op, {})
    assert in_scope(Principal("o", "operator"), {})  # unscoped: every device


def test_admin_may_do_everything() -> None:
    a = Principal("root", "admin")
    for action in ACTIONS:
        require(a, action, "d", {})
    assert ROLES == ("viewer", "operator", "admin")


@pytest.mark.parametrize("bad", ["site", "=a", "site=", "site=a\nx=y", "a=b,c=d"])
def test_bad_selector_is_named(bad: str) -> None:
    with pytest.raises(DPanelError, match=r"scope: .* is not a label selector"):
        in_scope(Principal("o", "operator", (bad,)), {"site": "a"})

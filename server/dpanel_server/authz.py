"""Who may do what: roles, label-selector scopes, and the one check every API route makes.

The contract other modules code against (the API, certificates, audit):

- a request is made by a :class:`Principal` (name, role, scope);
- :func:`require` raises :class:`Forbidden` naming what was missing, or returns;
- :func:`in_scope` tells whether a device's labels match a principal's scope.

A scope is a tuple of ``key=value`` selectors. An empty scope means every device. Several
selectors widen the scope (a device matching any of them is in scope), as an operator who
looks after two sites expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, get_args

from dpanel_proto.codes import ErrorCode

from .errors import DPanelError

__all__ = ["ACTIONS", "ROLES", "Action", "Forbidden", "Principal", "Role", "in_scope",
           "parse_selector", "require"]

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)

#: read: devices, presence, tunnels, audit. exec: exec, ssh, proxy, certificates.
#: tunnel: open/close. enrol: add, revoke, delete, reset host keys. users: manage operators.
Action = Literal["read", "exec", "tunnel", "enrol", "users"]
ACTIONS: tuple[Action, ...] = get_args(Action)

_GRANTS: dict[Role, frozenset[Action]] = {
    "viewer": frozenset({"read"}),
    "operator": frozenset({"read", "exec", "tunnel"}),
    "admin": frozenset(ACTIONS),
}

#: actions that are about one device, so the scope applies
_SCOPED: frozenset[Action] = frozenset({"read", "exec", "tunnel"})


class Forbidden(DPanelError):
    """Authenticated, but not allowed: HTTP 403, code ``forbidden``."""

    code = ErrorCode.FORBIDDEN


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an operator account, or the built-in admin token."""

    name: str
    role: Role
    scope: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "scope": list(self.scope)}


def parse_selector(text: str, what: str = "scope") -> tuple[str, str]:
    """``key=value`` → (key, value); a clear error naming ``what`` otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value or any(c in text for c in "\r\n\0,"):
        raise DPanelError(f"{what}: {text!r} is not a label selector KEY=VALUE",
                          ErrorCode.INVALID)
    return key, value


def in_scope(principal: Principal, labels: Mapping[str, str]) -> bool:
    """True if the device with ``labels`` is in ``principal``'s scope."""
    if not principal.scope:
        return True
    for sel in principal.scope:
        key, value = parse_selector(sel)
        if labels.get(key) == value:
            return True
    return False


def require(principal: Principal, action: Action, device: str | None = None,
            labels: Mapping[str, str] | None = None) -> None:
    """Raise :class:`Forbidden` unless ``principal`` may do ``action`` (on ``device``)."""
    if action not in _GRANTS[principal.role]:
        raise Forbidden(f"{principal.name} is a {principal.role}: {action} needs the "
                        f"{_least_role(action)} role")
    if device is not None and action in _SCOPED and not in_scope(principal, labels or {}):
        raise Forbidden(f"device {device} is outside {principal.name}'s scope "
                        f"({', '.join(principal.scope)})")


def _least_role(action: Action) -> Role:
    return next(r for r in ROLES if action in _GRANTS[r])

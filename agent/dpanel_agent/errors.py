"""Agent error types (kept import-light: the idle agent never loads asyncssh)."""

from __future__ import annotations

from dpanel_proto.codes import ErrorCode

__all__ = ["AgentError", "TunnelError"]


class AgentError(Exception):
    """A runtime problem the operator must fix (unwritable state dir, unreadable key)."""


class TunnelError(Exception):
    """Dialling the tunnel failed or was not attempted; ``code`` is TUNNEL_UNREACHABLE,
    TUNNEL_REFUSED, or EXPIRED (the request asking for it expired first)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code

"""Agent error types (kept import-light: the idle agent never loads asyncssh)."""

from __future__ import annotations

from dpanel_proto.codes import ErrorCode

__all__ = ["AgentError", "TunnelError"]


class AgentError(Exception):
    """A runtime problem the operator must fix (unwritable state dir, unreadable key)."""


class TunnelError(Exception):
    """Dialling the tunnel failed or was not attempted; ``code`` is TUNNEL_UNREACHABLE,
    TUNNEL_REFUSED, or EXPIRED (the request asking for it expired first). ``final``: not
    worth dialling again within this request (a named server that accepted no TCP
    connection in time: the manager has others to try)."""

    def __init__(self, code: ErrorCode, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.final = final

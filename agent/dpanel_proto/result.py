"""The ``DPANEL-RESULT <json>`` line a remote deploy step prints for its caller.

Deploy steps run over SSH and print human progress; the one machine-readable answer is
the last line with this prefix, so that the caller never has to parse prose.
"""

from __future__ import annotations

import json
from typing import Any, Optional

__all__ = ["RESULT_PREFIX", "format_result", "parse_result"]

RESULT_PREFIX = "DPANEL-RESULT "


def format_result(result: dict[str, Any]) -> str:
    """The line to print (no newline)."""
    return RESULT_PREFIX + json.dumps(result, sort_keys=True)


def parse_result(output: str) -> Optional[dict[str, Any]]:
    """The last result line in ``output``, or None if there is none or it is not JSON."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                obj = json.loads(line[len(RESULT_PREFIX):])
            except ValueError:
                return None
            return obj if isinstance(obj, dict) else None
    return None

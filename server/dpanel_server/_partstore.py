"""What the jobs and the agent-rollout stores share: a parent row with one part per device,
each moved by compare-and-set in one transaction of the registry's database."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["PartStore", "count_states"]


def count_states(parts: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many parts are in each state."""
    counts: dict[str, int] = {}
    for p in parts:
        counts[p["state"]] = counts.get(p["state"], 0) + 1
    return counts


class PartStore:
    """Base of a store whose table ``PARENT`` (key ``id``) has parts in ``PARTS`` (key
    ``PARENT_KEY`` + ``device``). Table names are class constants, never caller input."""

    PARENT: ClassVar[str]
    PARTS: ClassVar[str]
    PARENT_KEY: ClassVar[str]

    def __init__(self, registry: Registry, runner: str, component: str,
                 schema: Sequence[str], steps: Sequence[Sequence[str]]) -> None:
        self._reg = registry
        #: this manager's replica name ("" alone): the parts it claims or offers carry it
        self.runner = runner
        # under the schema lock: manager replicas may open one PostgreSQL at once
        registry.db.ensure(component, schema, steps)

    def _tx(self) -> Any:
        # the registry's own transaction: these tables live in the same database
        return self._reg._tx()

    def settle(self, parent: str, from_state: str, to_state: str, reason: str) -> int:
        """Every part of ``parent`` in ``from_state`` moves to ``to_state``."""
        with self._tx() as cur:
            cur.execute(f"UPDATE {self.PARTS} SET state = ?, ended = ?, reason = ? "  # noqa: S608
                        f"WHERE {self.PARENT_KEY} = ? AND state = ?",
                        (to_state, time.time(), reason, parent, from_state))
            return int(cur.rowcount)

    def set_state(self, parent: str, state: str) -> bool:
        """A running parent ends in ``state``, once (a second caller gets False)."""
        with self._tx() as cur:
            cur.execute(f"UPDATE {self.PARENT} SET state = ?, ended = ? "  # noqa: S608
                        "WHERE id = ? AND state = 'running'", (state, time.time(), parent))
            return bool(cur.rowcount == 1)

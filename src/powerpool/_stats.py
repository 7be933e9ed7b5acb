"""Run statistics as users get them: ``pool.stats()``'s frozen record.

Imported when first asked for (``powerpool.PoolStats``, ``pool.stats()``): the
ledger that counts during runs is :mod:`powerpool._ledger`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["PoolStats"]


@dataclass(frozen=True)
class PoolStats:
    """What a pool has done since it was created (``pool.stats()``)."""

    backend: str
    """Backend of the most recent run ("" before any work)."""
    workers: int
    """Workers of that backend."""
    items_done: int
    """Items that returned a result."""
    items_failed: int
    """Items that ended in an error (after retries)."""
    items_retried: int
    """Re-runs of failed items (an item retried twice counts 2)."""
    chunks: int
    """Chunks completed (a chunk is one message to a worker)."""
    wall_s: float
    """Seconds during which at least one run or future was active."""
    busy_s_by_worker: Mapping[str, float] = field(default_factory=dict)
    """Seconds each worker spent computing items."""
    predicted_speedup: float | None = None
    """For the most recent auto run: the speed-up its plan predicted (None: not auto)."""
    actual_speedup: float | None = None
    """For the most recent run: worker-busy seconds / wall seconds, as measured."""
    items_in_caller: int = 0
    """For the most recent auto run: items that ran in the caller's process
    (its thread, or its threads); the rest ran in worker processes."""

    @property
    def busy_s(self) -> float:
        """Total compute seconds over all workers."""
        return sum(self.busy_s_by_worker.values())

    @property
    def utilization(self) -> float:
        """busy_s / (wall_s * workers): 1.0 means every worker was always busy."""
        if self.wall_s <= 0 or self.workers <= 0:
            return 0.0
        return min(1.0, self.busy_s / (self.wall_s * self.workers))

    def _repr_html_(self) -> str:
        """A small table in notebooks (a run's timeline: ``pool.last_report``)."""
        from ._report_html import stats_html

        return stats_html(self)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle (and ``copy.deepcopy``) through a plain dict: the read-only
        mapping of busy seconds does not pickle itself."""
        state = {name: getattr(self, name) for name in self.__dataclass_fields__}
        state["busy_s_by_worker"] = dict(self.busy_s_by_worker)
        return (_rebuild, (state,))


def _rebuild(state: dict[str, Any]) -> PoolStats:
    busy = MappingProxyType(state.pop("busy_s_by_worker"))
    return PoolStats(busy_s_by_worker=busy, **state)

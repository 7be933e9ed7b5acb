"""Run statistics: a frozen record for users, a small locked ledger behind it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["PoolStats", "StatsLedger"]


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


class StatsLedger:
    """Counters updated from the caller's thread and from backend threads.

    Invariant: every field is only changed under ``_lock``; ``_active`` counts
    runs and futures in progress, and wall time accrues only while it is > 0.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.backend = ""
        self.workers = 0
        self.done = 0
        self.failed = 0
        self.retried = 0
        self.chunks = 0
        self._busy: dict[str, float] = {}
        self._active = 0
        self._since = 0.0
        self._wall = 0.0
        self.predicted: Callable[[], float | None] | None = None
        self.actual: float | None = None
        self.in_caller = 0

    def begin(self, backend: str, workers: int) -> None:
        with self._lock:
            self.backend, self.workers = backend, workers
            if self._active == 0:
                self._since = time.perf_counter()
            self._active += 1

    def end(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._wall += time.perf_counter() - self._since

    def switched(self, backend: str, workers: int) -> None:
        """A running auto run moved to ``backend``."""
        with self._lock:
            self.backend, self.workers = backend, workers

    def run_done(
        self,
        *,
        predicted: Callable[[], float | None] | None,
        actual: float | None,
        in_caller: int = 0,
    ) -> None:
        """Speed-ups of the run that just ended (see PoolStats); the predicted one is
        read when asked for (auto's plan is built when first read)."""
        with self._lock:
            self.predicted, self.actual, self.in_caller = predicted, actual, in_caller

    def chunk(self, worker: str, busy_s: float) -> None:
        with self._lock:
            self.chunks += 1
            self._busy[worker] = self._busy.get(worker, 0.0) + busy_s

    def items(self, *, done: int = 0, failed: int = 0, retried: int = 0) -> None:
        with self._lock:
            self.done += done
            self.failed += failed
            self.retried += retried

    def snapshot(self) -> PoolStats:
        predicted = self.predicted
        # Outside the lock: the first read of auto's plan loads the planner.
        predicted_speedup = predicted() if predicted is not None else None
        with self._lock:
            wall = self._wall
            if self._active:
                wall += time.perf_counter() - self._since
            return PoolStats(
                backend=self.backend,
                workers=self.workers,
                items_done=self.done,
                items_failed=self.failed,
                items_retried=self.retried,
                chunks=self.chunks,
                wall_s=wall,
                busy_s_by_worker=MappingProxyType(dict(self._busy)),
                predicted_speedup=predicted_speedup,
                actual_speedup=self.actual,
                items_in_caller=self.in_caller,
            )

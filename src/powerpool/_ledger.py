"""The counters behind ``pool.stats()``, updated while runs go on.

The record users get, :class:`powerpool.PoolStats`, lives in
:mod:`powerpool._stats`, imported when first asked for: its dataclass costs
a cold start 1-2 ms to create (see "Records" in docs/architecture.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._stats import PoolStats

__all__ = ["StatsLedger"]


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
        from ._stats import PoolStats

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

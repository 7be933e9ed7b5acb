"""Worker recycling and memory: retire workers by item count or RSS, explain OOM deaths.

Worker side, :class:`Budget` counts the items a worker process ran and reads
its RSS after each one (only when a limit is set: ~3 us from
``/proc/self/statm``). A worker that reached ``max_tasks_per_child``, or
whose RSS passed ``max_worker_memory`` — or would pass it on the next item,
growing as much as the last one did — finishes that item, sends the
results it has, and exits; the dispatcher hands the rest of its chunk to
another worker and starts a replacement. So a leaking function is never
allowed to reach the limit, when it leaks steadily.

Parent side, every worker's last RSS sits in a shared array (written after
each chunk, and every ``_worker.ORPHAN_CHECK_S`` by the worker's watch
thread, which wakes that often anyway), so
a worker SIGKILLed while its memory was high is reported as a likely
out-of-memory death with that figure, and :class:`Throttle` runs fewer
workers at once for a while, so the retried item gets the memory it needs.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import NamedTuple

from .._errors import WorkerCrashedError
from .._probes import RssProbe

__all__ = ["Budget", "Limits", "Throttle", "oom_error", "rss_reader"]

OOM_SUSPECT_BYTES = 256 * 1024 * 1024
"""A worker SIGKILLed with at least this RSS (or past max_worker_memory) is
reported as a likely out-of-memory death; smaller ones were more likely
killed by hand. Below it, the OOM killer rarely picks a Python worker."""

THROTTLE_RECOVERY_CHUNKS_PER_WORKER = 2
"""After an out-of-memory death, fewer workers run until this many chunks
per worker have finished: long enough for the re-queued item to run in the
room it lacked, short enough that one bad item does not slow a long run."""


def rss_reader() -> Callable[[], int]:
    """This process's resident set size in bytes, as a function to call often.

    ``/proc/self/statm`` is opened once and re-read (~1 us a reading): opening
    it for each reading cost 20-40 us, paid per chunk by every worker. Where
    it cannot be read, psutil (0 if that fails too). Make one per process: a
    forked child's ``/proc/self`` is not its parent's.
    """
    probe = RssProbe()
    return probe.read if probe.read() else _psutil_rss


def _psutil_rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0


# A named tuple, not a dataclass: see "Records" in docs/architecture.md.
class Limits(NamedTuple):
    """When a worker process is replaced by a fresh one."""

    max_tasks: int | None = None
    """Items a worker runs before it retires (``max_tasks_per_child``)."""
    max_memory: int | None = None
    """RSS in bytes a worker must not pass (``max_worker_memory``)."""

    def __bool__(self) -> bool:
        return self.max_tasks is not None or self.max_memory is not None


class Budget:
    """A worker's count of items and memory against its :class:`Limits`."""

    def __init__(self, limits: Limits, rss_now: Callable[[], int]) -> None:
        self.limits = limits
        self.tasks = 0
        self._rss_now = rss_now
        self.rss = rss_now() if limits.max_memory is not None else 0
        self.retire: str | None = None
        """Why this worker retires after the current chunk; None while it may go on."""

    def spent(self) -> bool:
        """Count one finished item; True when the worker must stop after it."""
        self.tasks += 1
        limits = self.limits
        if limits.max_tasks is not None and self.tasks >= limits.max_tasks:
            self.retire = f"ran {self.tasks} items (max_tasks_per_child={limits.max_tasks})"
        elif limits.max_memory is not None:
            rss = self._rss_now()
            growth, self.rss = max(0, rss - self.rss), rss
            if rss + growth > limits.max_memory:
                self.retire = (
                    f"RSS {rss / 1e6:.0f} MB (+{growth / 1e6:.0f} MB per item) would pass "
                    f"max_worker_memory={limits.max_memory / 1e6:.0f} MB"
                )
        return self.retire is not None


def oom_error(
    exitcode: int | None, pid: int | None, last_rss: int, limit: int | None
) -> WorkerCrashedError | None:
    """The error for a worker SIGKILLed with high memory; None if it does not look like OOM."""
    if exitcode != -signal.SIGKILL:
        return None
    high = OOM_SUSPECT_BYTES if limit is None else min(limit, OOM_SUSPECT_BYTES)
    if last_rss < high:
        return None
    return WorkerCrashedError(
        f"worker process {pid} was killed by SIGKILL while using {last_rss / 1e6:.0f} MB: "
        "likely the kernel's out-of-memory killer (retried items run with fewer workers "
        "at once; max_worker_memory= replaces workers before they grow that far)",
        exitcode=exitcode,
    )


class Throttle:
    """How many workers may run at once after out-of-memory deaths (dispatcher only)."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self.limit: int | None = None
        """Most busy workers allowed now; None: all of them."""
        self._calm = 0

    def oom(self, busy: int) -> None:
        """A worker died of memory while ``busy`` workers (itself included) ran."""
        self.limit = max(1, min(busy, self.limit or busy) - 1)
        self._calm = 0

    def chunk_done(self) -> None:
        if self.limit is None:
            return
        self._calm += 1
        if self._calm >= THROTTLE_RECOVERY_CHUNKS_PER_WORKER * self._workers:
            self.limit = None

    def room(self, busy: int, idle: int) -> int:
        """How many of ``idle`` workers may be given a chunk now."""
        return idle if self.limit is None else max(0, min(idle, self.limit - busy))

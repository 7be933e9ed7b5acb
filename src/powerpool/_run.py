"""One map/imap run over a backend: the pool core, written once for all backends.

Data flow (caller's thread on the left, backend threads on the right)::

    input iterator ──► take(chunk size) ──► Chunk ──► backend.submit ─┐
          ▲                                                            │ runs items
          │ refill while in-flight < window                           ▼
    caller ◄── yield in order ◄── outcomes ◄── inbox (SimpleQueue) ◄── deliver

* The **window** bounds chunks in flight (and, when ordered, results waiting
  for an earlier one), so an infinite input iterator runs in bounded memory.
* **Retries** re-queue a failed item ahead of new input; items lost with a
  crashed worker are re-queued without counting a retry.
* The caller's thread blocks only on ``inbox.get()``: no polling, and Ctrl-C
  interrupts it promptly.
"""

from __future__ import annotations

import itertools
import queue
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, Literal

from ._chunking import ChunkSizer
from ._errors import (
    InitializerError,
    ItemTimeoutError,
    SerializationError,
    WorkerCrashedError,
    WorkerError,
)
from ._progress import Progress, ProgressMode
from ._stats import StatsLedger
from ._task import Chunk, ChunkResult, Item, ItemLost, Outcome

__all__ = ["ErrorPolicy", "Run", "RunOptions", "is_retryable"]

ErrorPolicy = Literal["raise", "return", "skip"]

CHUNKS_IN_FLIGHT_PER_WORKER = 2
"""Chunks queued or running per worker: 2 means a worker that finishes always
finds its next chunk ready (no idle round trip), while memory and the work
lost to a cancel stay small."""

MAX_LOSSES = 3
"""An item whose worker died under *another* item is re-run for free this
many times; past that the pool is failing repeatedly and the item fails."""

_NEVER_RETRIED = (InitializerError, SerializationError, CancelledError)


@dataclass(frozen=True)
class RunOptions:
    """Per-run settings (a pool's defaults, overridable per call)."""

    chunksize: int | None = None
    """Items per chunk; None adapts it from measured per-item time."""
    timeout_s: float | None = None
    """Per-item time limit in seconds."""
    retries: int = 0
    """How many times a failed item is re-run."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Exception types that are retried (crashes and timeouts always are)."""
    errors: ErrorPolicy = "raise"
    """What a failed item does: raise it, return the exception in its place, or skip it."""
    progress: ProgressMode = False
    """Show a progress bar: True, False, or "auto" (only on a terminal, after 2 s)."""


def is_retryable(exc: BaseException, options: RunOptions) -> bool:
    """Whether a failure may be cured by running the item again."""
    if isinstance(exc, _NEVER_RETRIED):
        return False
    if isinstance(exc, (WorkerError, ItemTimeoutError)):
        return True
    return isinstance(exc, options.retry_on)


class Run:
    """Iterates over the outcomes of one run; yields (index, value) pairs.

    ``prefilled`` holds outcomes the caller already has for the first items
    (auto's profiling sample): they are reported in place, never recomputed.
    """

    def __init__(
        self,
        *,
        backend: Any,
        fn: Callable[..., Any],
        calls: Iterator[tuple[tuple[Any, ...], dict[str, Any]]],
        options: RunOptions,
        ordered: bool,
        total: int | None,
        epoch: int,
        ledger: StatsLedger,
        new_chunk_id: Callable[[], int],
        prefilled: Sequence[tuple[Item, Outcome]] = (),
        per_item_s: float | None = None,
    ) -> None:
        self._backend = backend
        self._fn = fn
        self._options = options
        self._ordered = ordered
        self._total = total
        self._epoch = epoch
        self._ledger = ledger
        self._new_chunk_id = new_chunk_id
        self._prefilled = list(prefilled)
        start = len(self._prefilled)
        self._input: Iterator[Item] = (
            (index, args, kwargs) for index, (args, kwargs) in zip(itertools.count(start), calls)
        )
        remaining = None if total is None else max(0, total - start)
        self._sizer = ChunkSizer(
            fixed=options.chunksize,
            target_s=backend.chunk_target_s,
            workers=backend.workers,
            total=remaining,
        )
        if per_item_s is not None:
            self._sizer.seed(per_item_s)
        self._window = CHUNKS_IN_FLIGHT_PER_WORKER * max(1, backend.workers)
        # None in the inbox means "the pool cancelled this run" (see abort()).
        self._inbox: queue.SimpleQueue[ChunkResult | None] = queue.SimpleQueue()
        self._closed = False

    def _claim(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """Drop chunks not yet started; late results are ignored."""
        self._closed = True

    def abort(self) -> None:
        """Make the iterating thread raise CancelledError now (called from any thread)."""
        self._closed = True
        self._inbox.put(None)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        options = self._options
        retry: deque[Item] = deque()
        attempts: dict[int, int] = {}
        losses: dict[int, int] = {}
        waiting: dict[int, Outcome] = {}  # ordered: finished, not yet yielded
        ready: deque[tuple[int, Outcome]] = deque()
        next_index = 0
        in_flight = 0
        input_done = False
        progress = Progress(options.progress, total=self._total, desc=getattr(
            self._fn, "__name__", "items"))
        self._ledger.begin(self._backend.name, self._backend.workers)

        def settle(index: int, outcome: Outcome, item: Item | None) -> None:
            ok, value = outcome
            if not ok and item is not None:
                if isinstance(value, ItemLost):
                    losses[index] = losses.get(index, 0) + 1
                    if losses[index] <= MAX_LOSSES:
                        retry.append(item)
                        return
                    value = WorkerCrashedError(
                        f"item {index} was lost {MAX_LOSSES + 1} times with crashing workers"
                    )
                elif attempts.get(index, 0) < options.retries and is_retryable(value, options):
                    attempts[index] = attempts.get(index, 0) + 1
                    self._ledger.items(retried=1)
                    retry.append(item)
                    return
            if ok:
                self._ledger.items(done=1)
                progress.update(1)
            else:
                self._ledger.items(failed=1)
                progress.update(0, failed=1)
            if self._ordered:
                waiting[index] = (ok, value)
            else:
                ready.append((index, (ok, value)))

        try:
            for item, outcome in self._prefilled:
                settle(item[0], outcome, item)
            while True:
                # Refill: retries first, then new input, while the window has room.
                # When ordered, results waiting for an earlier item also count
                # against the window, or one slow item would let memory grow.
                while in_flight < self._window and (
                    in_flight == 0 or len(waiting) <= self._window * self._sizer.next_size()
                ):
                    items = self._take(retry, input_done)
                    if not items:
                        input_done = True  # retries are taken first: only input is left
                        break
                    self._submit(items)
                    in_flight += 1
                # Hand over what is ready, in the order asked for.
                if self._ordered:
                    while next_index in waiting:
                        yield from self._emit(next_index, waiting.pop(next_index))
                        next_index += 1
                else:
                    while ready:
                        yield from self._emit(*ready.popleft())
                if in_flight == 0 and not retry and input_done:
                    return
                if in_flight == 0:
                    continue
                result = self._inbox.get()
                if result is None:
                    raise CancelledError("the pool's work was cancelled")
                in_flight -= 1
                self._ledger.chunk(result.worker, result.busy_s)
                self._sizer.observe(len(result.chunk.items), result.busy_s)
                for item, outcome in zip(result.chunk.items, result.outcomes):
                    settle(item[0], outcome, item)
        finally:
            self.close()
            progress.close()
            self._ledger.end()

    def _take(self, retry: deque[Item], input_done: bool) -> list[Item]:
        size = self._sizer.next_size()
        items: list[Item] = []
        while retry and len(items) < size:
            items.append(retry.popleft())
        if items or input_done:
            return items
        return list(itertools.islice(self._input, size))

    def _submit(self, items: list[Item]) -> None:
        chunk = Chunk(
            id=self._new_chunk_id(),
            fn=self._fn,
            items=items,
            timeout_s=self._options.timeout_s,
            epoch=self._epoch,
            claim=self._claim,
            on_done=self._inbox.put,
        )
        self._backend.submit(chunk)

    def _emit(self, index: int, outcome: Outcome) -> Iterator[tuple[int, Any]]:
        ok, value = outcome
        if ok:
            yield index, value
        elif self._options.errors == "raise":
            raise value
        elif self._options.errors == "return":
            yield index, value

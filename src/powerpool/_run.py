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
  interrupts it promptly. From async code (``amap``) the same run awaits its
  inbox on the caller's event loop instead (see ``Run.ablocks``).
"""

from __future__ import annotations

import itertools
import queue
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ._backends._base import chunk_floor_s
from ._chunk import Chunk, ChunkResult, Item, ItemLost, Outcome
from ._chunking import ChunkSizer
from ._errors import (
    InitializerError,
    ItemTimeoutError,
    SerializationError,
    WorkerCrashedError,
    WorkerError,
)
from ._progress import Progress, ProgressMode

if TYPE_CHECKING:
    from ._ledger import StatsLedger
    from ._recorder import Recorder
    from ._speculate import Steer

__all__ = ["Attempts", "ErrorPolicy", "Run", "RunOptions", "is_retryable"]

ErrorPolicy = Literal["raise", "return", "skip"]

CHUNKS_IN_FLIGHT_PER_WORKER = 2
"""Chunks queued or running per worker: 2 means a worker that finishes always
finds its next chunk ready (no idle round trip), while memory and the work
lost to a cancel stay small."""

DEFAULT_INFLIGHT_BYTES = 64 * 1024 * 1024
"""Default ``max_inflight_bytes``: keeps the caller's memory for results in
the tens of MB whatever the result size (1 MB results once took 2.8 GB);
more lets chunks of big results grow and amortize overhead."""

MAX_LOSSES = 3
"""An item whose worker died under *another* item is re-run for free this
many times; past that the pool is failing repeatedly and the item fails."""

_NEVER_RETRIED = (InitializerError, SerializationError, CancelledError)

_WAIT: list[Any] = []
"""What Run._steps yields when it needs the next chunk result (a block is never empty)."""


# Not a dataclass: see "Records" in docs/architecture.md (cold-start cost).
class RunOptions(NamedTuple):
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
    max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES
    """Bytes of results a run keeps in flight or waiting for an earlier one;
    chunks are cut so the window fits (at least one item per worker runs)."""


def is_retryable(exc: BaseException, options: RunOptions) -> bool:
    """Whether a failure may be cured by running the item again."""
    if isinstance(exc, _NEVER_RETRIED):
        return False
    if isinstance(exc, (WorkerError, ItemTimeoutError)):
        return True
    return isinstance(exc, options.retry_on)


class Attempts:
    """How often one item ran and failed, and what to do about its latest failure."""

    __slots__ = ("losses", "retries")

    def __init__(self) -> None:
        self.retries = 0
        """Re-runs after failures (limited by ``RunOptions.retries``)."""
        self.losses = 0
        """Re-runs because a crash elsewhere took the item down (limited by MAX_LOSSES)."""

    def after(self, exc: BaseException, options: RunOptions) -> BaseException | None:
        """None if the item should run again (counted here); else the error to report.

        The one retry policy of the core: map runs and submit() both use it.
        """
        if isinstance(exc, ItemLost):
            self.losses += 1
            if self.losses <= MAX_LOSSES:
                return None
            return WorkerCrashedError(
                f"the item was lost {self.losses} times with crashing workers"
            )
        if self.retries < options.retries and is_retryable(exc, options):
            self.retries += 1
            return None
        return exc


def _result_bytes(result: ChunkResult, values: list[Any]) -> int | None:
    """The chunk's result size: measured by the backend, else estimated from
    the first value (shallow ``sys.getsizeof``: exact for bytes, str and
    numpy arrays that own their data, cheap for the rest)."""
    if result.nbytes is not None:
        return result.nbytes
    if not values:
        return None
    try:
        return sys.getsizeof(values[0]) * len(values)
    except TypeError:  # objects that do not report a size
        return None


class Run:
    """Iterates over the results of one run, in blocks (lists) to keep per-item cost low.

    Each block holds values, or ``(index, value)`` pairs when ``with_index``.
    Callers flatten with ``itertools.chain.from_iterable``, which runs in C:
    on trivial items the per-item cost of the core is what users pay.

    With a ``steer`` (``backend="auto"``) the run asks it where the first
    chunks go and, after each finished chunk, whether to switch: chunks in
    flight finish where they are, new ones go to the new routes.
    """

    def __init__(
        self,
        *,
        backend: Any,
        fn: Callable[..., Any],
        source: Iterator[Any],
        star: bool,
        options: RunOptions,
        ordered: bool,
        with_index: bool,
        total: int | None,
        epoch: int,
        ledger: StatsLedger,
        new_chunk_id: Callable[[], int],
        steer: Steer | None = None,
        recorder: Recorder | None = None,
        inbox: Any = None,
    ) -> None:
        self._recorder = recorder
        self._fn = fn
        self._source = source
        self._star = star
        self._options = options
        self._ordered = ordered
        self._with_index = with_index
        self._total = total
        self._epoch = epoch
        self._ledger = ledger
        self._new_chunk_id = new_chunk_id
        self._steer = steer
        self._next_input = 0
        # None in the inbox means "the pool cancelled this run" (see abort()).
        self._inbox: Any = queue.SimpleQueue() if inbox is None else inbox
        self._routes: list[_Route] = []
        self.backends: list[Any] = []
        """Every backend this run sent chunks to (for Ctrl-C: the pool kills them)."""
        self._sizer = ChunkSizer(fixed=options.chunksize, target_s=1.0, workers=1, total=total)
        self._window = 0
        self._reroute([backend] if steer is None else steer.routes())
        if steer is not None and steer.remembered_item_s is not None:
            # A warm start: chunks the right size from the first one, not a ramp
            # from one item (a tiny function's 100 items would otherwise go one
            # chunk of 1, 2, 3... at a time through the steer).
            self._sizer.seed(steer.remembered_item_s)
        self._closed = False
        # Iteration state (caller's thread only).
        self._retry: deque[Item] = deque()
        self._attempts: dict[int, Attempts] = {}  # items that failed and will run again
        # Ordered runs: finished but waiting for an earlier item. Whole chunks
        # that succeeded wait as one block (start -> (stop, values)); items
        # from failed or re-queued chunks wait one by one.
        self._waiting: dict[int, Outcome] = {}
        self._waiting_blocks: dict[int, tuple[int, list[Any]]] = {}
        self._waiting_count = 0
        self._ready: list[tuple[int, Outcome]] = []  # unordered: finished, not handed over
        self._next_out = 0
        self._block: list[Any] = []  # a ready-made block from the in-order fast path
        self._progress: Progress | None = None
        self._input_error: Exception | None = None  # what the caller's input raised
        self._busy_s = 0.0
        self.speedup: float | None = None
        """Measured speed-up of the finished run: worker-busy seconds / wall seconds."""

    def _reroute(self, backends: Sequence[Any]) -> None:
        """Send new chunks to ``backends`` from now on (chunks already sent finish where they are).

        The one way a run changes backend: each route gets its own in-flight
        window; the chunk sizer restarts for the new routes from the per-item
        time measured so far.
        """
        remaining = None if self._total is None else max(0, self._total - self._next_input)
        self._routes = [_Route(b, self._inbox) for b in backends]
        if all(b.name == "serial" for b in backends):
            remaining = None  # one thread, nothing to balance: no shrinking tail of chunks
        self.backends.extend(b for b in backends if b not in self.backends)
        per_item = self._sizer.per_item_s
        window = sum(route.window for route in self._routes)
        self._sizer = ChunkSizer(
            fixed=self._options.chunksize,
            target_s=min(b.chunk_target_s for b in backends),
            workers=sum(max(1, b.workers) for b in backends),
            total=remaining,
            floor_s=max(chunk_floor_s(b) for b in backends),
            # Chunks in flight and results waiting are both bounded by the window
            # in chunks, so chunks of budget/window bytes keep both in budget.
            max_chunk_bytes=self._options.max_inflight_bytes // max(1, window),
        )
        if per_item is not None:
            self._sizer.seed(per_item)
        self._window = sum(route.window for route in self._routes)

    def _claim(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """Drop chunks not yet started; late results are ignored."""
        self._closed = True

    def abort(self) -> None:
        """Make the iterating thread raise CancelledError now (called from any thread)."""
        self._closed = True
        self._inbox.put(None)

    # The run is written once, as a sans-IO state machine (_steps), and
    # driven two ways: __iter__ blocks the caller's thread on the inbox (the
    # blocking API), ablocks() awaits it on an event loop (amap/aimap, whose
    # coroutines run on that same loop, so nothing may block it). Every
    # decision (windows, order, retries, errors, progress, stats) lives in
    # _steps; a driver only waits for the next result and hands blocks on.
    # A generator that yields WAIT and is sent each result costs one resume
    # per chunk, not per item: the blocking path keeps its speed.

    def __iter__(self) -> Iterator[list[Any]]:
        steps = self._steps()
        get = self._inbox.get
        try:
            step = next(steps)
            while True:
                if step is _WAIT:
                    step = steps.send(get())
                else:
                    yield step
                    step = next(steps)
        except StopIteration:
            return
        finally:
            steps.close()  # Ctrl-C in get(), or the caller stopped early: clean up now

    async def ablocks(self) -> AsyncGenerator[list[Any], None]:
        """Like ``__iter__``, awaiting results on the running loop (the inbox must
        have an async ``get``; see :class:`powerpool._coroutines.LoopInbox`)."""
        steps = self._steps()
        get = self._inbox.get
        try:
            step = next(steps)
            while True:
                if step is _WAIT:
                    step = steps.send(await get())
                else:
                    yield step
                    step = next(steps)
        except StopIteration:
            return
        finally:
            steps.close()  # cancelled while awaiting, or the caller stopped early

    def _steps(self) -> Generator[list[Any], tuple[_Route, ChunkResult] | None, None]:
        """The run: yields a block of results to hand over, or ``_WAIT`` when it
        needs the next chunk result, which the driver sends in."""
        in_flight = 0
        input_done = False
        self._progress = Progress(
            self._options.progress, total=self._total, desc=getattr(self._fn, "__name__", "items")
        )
        first = self._routes[0].backend
        self._ledger.begin(first.name, first.workers)
        started = time.perf_counter()
        announced = False  # the steer was told that the first chunks are out
        try:
            while True:
                in_flight, input_done = self._refill(in_flight, input_done)
                if not announced and self._steer is not None:
                    announced = True
                    self._steer.started()
                block, error = self._handover()
                if block:
                    yield block
                if error is not None:
                    raise error
                if in_flight == 0 and not self._retry and input_done:
                    if self._input_error is not None:
                        raise self._input_error
                    return
                if in_flight == 0:
                    continue
                got = yield _WAIT
                if got is None:
                    raise CancelledError("the pool's work was cancelled")
                route, result = got
                route.in_flight -= 1
                in_flight -= 1
                self._absorb(result)
                if self._steer is not None:
                    if self._steer.deciding:
                        # The first decision takes the caller's thread a few
                        # ms (more when the run moves and the planner's model
                        # loads): the workers get their next chunks first.
                        in_flight, input_done = self._refill(in_flight, input_done)
                    switch = self._steer.observe(route.backend.name, result)
                    if switch is not None:
                        before = "+".join(route.backend.name for route in self._routes)
                        self._reroute(switch)
                        self._ledger.switched(switch[0].name, switch[0].workers)
                        if self._recorder is not None:
                            after = "+".join(backend.name for backend in switch)
                            self._recorder.event("plan-switch", detail=f"{before} -> {after}")
        finally:
            self.close()
            # Shared copies of this run's arguments go now, not when the Run
            # object does (a traceback may keep it alive for a long time).
            for backend in self.backends:
                release = getattr(backend, "release", None)
                if release is not None:
                    release(self)
            self._progress.close()
            wall = time.perf_counter() - started
            self.speedup = self._busy_s / wall if wall > 0 and self._busy_s > 0 else None
            self._ledger.end()

    def _refill(self, in_flight: int, input_done: bool) -> tuple[int, bool]:
        """Send chunks to each route while its window has room: retries first,
        then new input. When ordered, results waiting for an earlier item also
        count against the window, or one slow item would let memory grow.
        Returns the chunks now in flight and whether the input is used up."""
        for route in self._routes:
            if route.backend.workers != route.workers:
                self._resize(route)
            while route.in_flight < route.window and (
                in_flight == 0 or self._waiting_count <= self._window * self._sizer.next_size()
            ):
                chunk = self._take(input_done, route)
                if chunk is None:
                    input_done = True  # retries are taken first: only input is left
                    break
                route.backend.submit(chunk)
                route.in_flight += 1
                in_flight += 1
        return in_flight, input_done

    def _resize(self, route: _Route) -> None:
        """Follow a backend's capacity (a cluster's workers come and go)."""
        route.workers = route.backend.workers
        route.window = CHUNKS_IN_FLIGHT_PER_WORKER * max(1, route.workers)
        self._window = sum(r.window for r in self._routes)
        self._sizer.resize(
            workers=sum(max(1, r.workers) for r in self._routes),
            target_s=min(r.backend.chunk_target_s for r in self._routes),
        )
        self._sizer.limit_bytes(self._options.max_inflight_bytes // max(1, self._window))

    # -- outcomes -------------------------------------------------------------

    def _absorb(self, result: ChunkResult) -> None:
        """Take one chunk's results; when all succeeded, no Python runs per item."""
        self._ledger.chunk(result.worker, result.busy_s)
        self._busy_s += result.busy_s
        chunk = result.chunk
        n = len(chunk)
        values = result.values
        if self._recorder is not None:
            self._record(result, values)
        if values is not None:  # failed chunks report no (or a made-up) compute time
            # Time spent queued for a CPU (a loaded machine) is not the items'
            # cost: counting it would shrink chunks exactly when each round
            # trip to the parent is slowest.
            m = result.measures
            active_s = result.busy_s - (m.queued_s if m is not None else 0.0)
            self._sizer.observe(n, active_s, _result_bytes(result, values))
        if values is None:
            for item, outcome in zip(chunk.items, result.outcomes):
                self._settle(item, outcome)
            return
        self._ledger.items(done=n)
        assert self._progress is not None
        self._progress.update(n)
        indices = chunk.indices
        if not self._ordered:
            self._block.extend(zip(indices, values) if self._with_index else values)
        elif isinstance(indices, range):
            self._waiting_blocks[indices.start] = (indices.stop, values)
            self._waiting_count += n
        else:
            self._waiting.update(zip(indices, [(True, value) for value in values]))
            self._waiting_count += n

    def _record(self, result: ChunkResult, values: list[Any] | None) -> None:
        """Give the run's recorder this chunk, with its failed items (report= only)."""
        assert self._recorder is not None
        from ._recorder import failed_items  # loaded with the recorder already

        self._recorder.chunk(result, failed_items(result) if values is None else ())

    def _settle(self, item: Item, outcome: Outcome) -> None:
        """Retry, re-queue or record one item's outcome."""
        ok, value = outcome
        index = item[0]
        if not ok:
            attempts = self._attempts.setdefault(index, Attempts())
            error = attempts.after(value, self._options)
            if error is None:
                if not isinstance(value, ItemLost):
                    self._ledger.items(retried=1)
                    if self._recorder is not None:
                        self._recorder.event("retry", index=index, detail=repr(value)[:200])
                self._retry.append(item)
                return
            value = error
            del self._attempts[index]
        assert self._progress is not None
        if ok:
            self._ledger.items(done=1)
            self._progress.update(1)
        else:
            self._ledger.items(failed=1)
            self._progress.update(0, failed=1)
        if self._ordered:
            self._waiting[index] = (ok, value)
            self._waiting_count += 1
        else:
            self._ready.append((index, (ok, value)))

    def _handover(self) -> tuple[list[Any], BaseException | None]:
        """The results the caller may have now (one block), and an error to raise after it."""
        block, self._block = self._block, []
        with_index = self._with_index
        if not self._ordered:
            pairs, self._ready = self._ready, []
        else:
            pairs = []
            waiting, blocks, index = self._waiting, self._waiting_blocks, self._next_out
            while True:
                if index in blocks:
                    # A whole chunk in line: no per-item work unless indices are wanted.
                    stop, values = blocks.pop(index)
                    if pairs:
                        error = self._append(block, pairs)
                        pairs = []
                        if error is not None:
                            return block, error
                    block.extend(zip(range(index, stop), values) if with_index else values)
                    self._waiting_count -= stop - index
                    index = stop
                elif index in waiting:
                    pairs.append((index, waiting.pop(index)))
                    self._waiting_count -= 1
                    index += 1
                else:
                    break
            self._next_out = index
        return block, self._append(block, pairs)

    def _append(self, block: list[Any], pairs: list[tuple[int, Outcome]]) -> BaseException | None:
        """Add outcomes to ``block`` under the errors policy; return the error to raise, if any."""
        with_index, policy = self._with_index, self._options.errors
        for index, (ok, value) in pairs:
            if ok or policy == "return":
                block.append((index, value) if with_index else value)
            elif policy == "raise":
                error: BaseException = value
                return error  # results before the failure still reach the caller
        return None

    # -- input ----------------------------------------------------------------

    def _take(self, input_done: bool, route: _Route) -> Chunk | None:
        """The next chunk: re-queued items first, then fresh input; None when both are out."""
        size = self._sizer.next_size()
        steer = self._steer
        if steer is not None:
            cap = steer.max_chunk(self._sizer.per_item_s)
            if cap is not None and self._options.chunksize is None:
                size = min(size, cap)
        retry = self._retry
        chunk = Chunk(
            self._new_chunk_id(),
            self._fn,
            timeout_s=self._options.timeout_s,
            epoch=self._epoch,
            claim=self._claim,
            on_done=route.deliver,
            star=self._star,
            scope=self,
        )
        if self._recorder is not None:
            chunk.recorder = self._recorder
        if steer is not None and route.backend.name == "processes":
            chunk.probe = steer.probe()
        if retry:
            chunk.items = [retry.popleft() for _ in range(min(size, len(retry)))]
            return chunk
        if input_done:
            return None
        if self._input_error is not None:
            return None
        # extend() keeps what the input yielded before it raised (no Python
        # work per item either way).
        chunk.args = []
        try:
            chunk.args.extend(itertools.islice(self._source, size))
        except Exception as exc:
            # Like the builtin map: the results of every earlier item first,
            # then this error (raised by __iter__ once they are handed over).
            self._input_error = exc
        if not chunk.args:
            return None
        chunk.indices = range(self._next_input, self._next_input + len(chunk.args))
        self._next_input = chunk.indices.stop
        self._sizer.taken(len(chunk.args))
        return chunk


class _Route:
    """A backend a run sends chunks to, with its own window of chunks in flight.

    ``in_flight`` is changed by the run's thread only; ``deliver`` (any
    thread) tags each result with its route, so a run that switched knows
    which window a late result of the old backend frees.
    """

    __slots__ = ("backend", "deliver", "in_flight", "window", "workers")

    def __init__(self, backend: Any, inbox: Any) -> None:
        self.backend = backend
        self.in_flight = 0
        self.workers = backend.workers  # as last seen: a cluster's may change
        self.window = CHUNKS_IN_FLIGHT_PER_WORKER * max(1, backend.workers)
        put = inbox.put
        self.deliver: Callable[[ChunkResult], None] = lambda result: put((self, result))

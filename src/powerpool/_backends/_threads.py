"""The threads backend: concurrency for work that waits or releases the GIL.

Worker threads pull chunks from one queue, so a worker that finishes early
takes the next chunk (skewed durations balance themselves). Threads are
started on demand, up to ``workers``, like ``ThreadPoolExecutor``.

Threads cannot be killed, so a per-item timeout *abandons* the late thread:
a watchdog (started only when a timeout is in use) fails the item with
:class:`ItemTimeoutError`, tells the task to stop through ``should_stop()``,
reports the chunk's not-yet-run items as lost (the core re-queues them), and
starts a replacement thread so capacity is kept. Whatever the abandoned
thread returns later is dropped.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import ClassVar

from .._chunk import Chunk, ChunkResult, ItemLost, Measures, Outcome
from .._errors import InitializerError, ItemTimeoutError
from .._stop import CancelFlag, StopToken, running
from ._base import BackendConfig, Deliver
from ._itemloop import VALUES, ItemWatch, chunk_entries, run_chunk

__all__ = ["ThreadBackend"]

SEEN_FUNCTIONS = 256
"""Function ids remembered to flag a first call (see Measures.first); cleared
when full: a forgotten function is only reported cold once more."""


@dataclass(eq=False)
class _Running:
    """What one worker thread is doing (only with a timeout); guarded by the backend's lock.

    Invariant: the worker appends item i's outcome before it marks item i+1,
    so when ``position`` is p, ``outcomes[:p]`` are the finished items.
    """

    chunk: Chunk
    """The chunk being run."""
    token: StopToken
    """Its stop token; abandoning the thread sets it."""
    position: int = 0
    """Index in the chunk of the item running now."""
    started: float = field(default_factory=time.monotonic)
    """time.monotonic() when that item started."""
    abandoned: bool = False
    """Set by the watchdog when the item ran late: the thread stops at its next item."""
    outcomes: list[Outcome] = field(default_factory=list)
    """Outcomes of the chunk's finished items, appended as they finish."""


class _Marker(ItemWatch):
    """Publishes the item a timed chunk's thread starts, under the backend's lock."""

    __slots__ = ("_lock", "_record")

    def __init__(self, lock: threading.Lock, record: _Running) -> None:
        self._lock = lock
        self._record = record

    def started(self, position: int) -> bool:
        with self._lock:
            if self._record.abandoned:
                # The watchdog reported this chunk and the core re-queued the
                # items after the late one: running them here too would run
                # them twice.
                return False
            self._record.position, self._record.started = position, time.monotonic()
        return True


class ThreadBackend:
    name: ClassVar[str] = "threads"
    # A queue hand-off costs ~10-20 us: 2 ms chunks keep that near 1% while
    # leaving plenty of chunks to spread over hundreds of I/O threads.
    chunk_target_s: ClassVar[float] = 0.002
    supports_timeout: ClassVar[bool] = True

    def __init__(self, config: BackendConfig, deliver: Deliver) -> None:
        self.workers = config.workers
        self._config = config
        self._deliver = deliver
        self._flag = CancelFlag()
        self._queue: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        # Invariant: _threads holds live, non-abandoned workers and changes
        # only under _lock. _idle holds one permit per worker that finished a
        # chunk and went back to the queue (ThreadPoolExecutor's scheme): the
        # hot path takes no lock, which matters with hundreds of I/O threads.
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = threading.Semaphore(0)
        self._running: dict[threading.Thread, _Running] = {}
        self._init_error: BaseException | None = None
        self._watchdog: threading.Thread | None = None
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._names = itertools.count()
        self._seen: set[int] = set()  # ids of functions that ran here (see _first_call)

    # -- protocol -------------------------------------------------------------

    def submit(self, chunk: Chunk) -> None:
        if chunk.timeout_s is not None and self._watchdog is None:
            with self._lock:
                if self._watchdog is None:
                    self._watchdog = threading.Thread(
                        target=self._watch, name="powerpool-threads-watchdog", daemon=True
                    )
                    self._watchdog.start()
        # Under the lock, so that no chunk lands behind shutdown's exit sentinels
        # where no thread would ever take it (its caller would wait forever).
        with self._lock:
            closed = self._closed
            if not closed:
                self._queue.put(chunk)
                # Decided here too: a shutdown between the put and a later
                # grow would leave the chunk with no thread to take it.
                thread = None if self._idle.acquire(blocking=False) else self._new_thread()
                if thread is not None:
                    # Started under the lock: a shutdown that lists this thread
                    # must be able to join it (joining an unstarted thread raises).
                    thread.start()
        if closed:
            if chunk.claim():
                error = CancelledError("the pool was shut down")
                self._deliver(ChunkResult.failed(chunk, error, "threads"))
            return

    def cancel(self, epoch: int) -> None:
        self._flag.value = max(self._flag.value, epoch)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        with self._lock:
            if self._closed:
                threads: list[threading.Thread] = []
            else:
                self._closed = True
                threads = [*self._threads]
                for _ in threads:
                    self._queue.put(None)
                self._wake.notify_all()
        if kill:
            # Threads can't be killed: ask running tasks to stop, don't wait.
            self._flag.value = 1 << 62
            return
        if wait:
            for thread in threads:
                thread.join()
            if self._watchdog is not None:
                self._watchdog.join()

    # -- workers --------------------------------------------------------------

    def _new_thread(self) -> threading.Thread | None:
        """A new worker thread (not started yet), unless there are enough. Call under _lock."""
        if self._closed or len(self._threads) >= self.workers:
            return None
        thread = threading.Thread(
            target=self._work, name=f"powerpool-thread-{next(self._names)}", daemon=True
        )
        self._threads.add(thread)
        return thread

    def _work(self) -> None:
        me = threading.current_thread()
        if self._config.initializer is not None:
            try:
                self._config.initializer(*self._config.initargs)
            except Exception as exc:
                self._init_error = exc
        while True:
            chunk = self._queue.get()
            if chunk is None:
                with self._lock:
                    self._threads.discard(me)
                return
            if chunk.claim():
                if self._init_error is not None:
                    error = InitializerError.wrap(self._init_error)
                    self._deliver(ChunkResult.failed(chunk, error, me.name))
                elif not self._run(me, chunk):
                    return  # abandoned after a timeout: a replacement already runs
            # Don't keep the finished chunk (its function, arguments and whatever
            # they bind) alive while blocked on the next get(): CPython's "del work_item".
            del chunk
            self._idle.release()

    def _run(self, me: threading.Thread, chunk: Chunk) -> bool:
        token = StopToken(self._flag, chunk.epoch)
        first = self._first_call(chunk)
        cpu_started = time.thread_time()
        started = time.perf_counter()
        entries, convention = chunk_entries(chunk)
        if chunk.timeout_s is None:
            with running(token):
                kind, results = run_chunk(chunk.fn, entries, convention, in_caller=False)
        else:
            record = _Running(chunk, token)
            with self._lock:
                self._running[me] = record
                self._wake.notify()
            with running(token):
                kind, results = run_chunk(
                    chunk.fn,
                    entries,
                    convention,
                    _Marker(self._lock, record),
                    in_caller=False,
                    outcomes=record.outcomes,
                )
            with self._lock:
                del self._running[me]
                if record.abandoned:
                    return False
        busy_s = time.perf_counter() - started
        measures = Measures(time.thread_time() - cpu_started, first)
        values, outcomes = (results, None) if kind == VALUES else (None, results)
        self._deliver(
            ChunkResult(
                chunk,
                outcomes,
                me.name,
                busy_s,
                values=values,
                started_s=started,
                measures=measures,
            )
        )
        return True

    def _first_call(self, chunk: Chunk) -> bool:
        """Whether no chunk of this function ran here before (its time may include warm-up).

        Racy between threads by design: two first chunks both saying True is harmless.
        """
        key = id(chunk.fn)
        if key in self._seen:
            return False
        if len(self._seen) >= SEEN_FUNCTIONS:
            self._seen.clear()
        self._seen.add(key)
        return True

    # -- timeouts -------------------------------------------------------------

    def _watch(self) -> None:
        """Sleep until the earliest item deadline; abandon threads past theirs."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                expired: list[tuple[threading.Thread, _Running, int]] = []
                next_deadline = float("inf")
                for thread, record in self._running.items():
                    deadline = record.started + (record.chunk.timeout_s or float("inf"))
                    if deadline <= now and not record.abandoned:
                        # The position is read now: once abandoned, it cannot move.
                        expired.append((thread, record, record.position))
                    else:
                        next_deadline = min(next_deadline, deadline)
                replacements = []
                for thread, record, _ in expired:
                    record.abandoned = True
                    record.token.abandon()
                    self._threads.discard(thread)
                    replacements.append(self._new_thread())  # keeps the capacity
                if expired:
                    self._lock.release()
                    try:
                        for replacement in replacements:
                            if replacement is not None:
                                replacement.start()
                        for thread, record, position in expired:
                            self._report_timeout(thread, record, position)
                    finally:
                        self._lock.acquire()
                    continue
                wait = None if next_deadline == float("inf") else max(0.0, next_deadline - now)
                self._wake.wait(wait)

    def _report_timeout(self, thread: threading.Thread, record: _Running, position: int) -> None:
        chunk = record.chunk
        # Items before the late one finished (their outcomes are in the record:
        # the worker appends item i's outcome before it marks item i+1); items
        # after it never started and are re-queued by the core (ItemLost).
        late = ItemTimeoutError(
            f"item {chunk.indices[position]} ran longer than its "
            f"{chunk.timeout_s:g} s timeout; its thread was abandoned"
        )
        done = record.outcomes[:position]
        lost: list[Outcome] = [(False, ItemLost())] * (len(chunk) - position - 1)
        outcomes = [*done, (False, late), *lost]
        self._deliver(ChunkResult(chunk, outcomes, thread.name, float(chunk.timeout_s or 0.0)))

    def __repr__(self) -> str:
        return f"<ThreadBackend workers={self.workers}>"

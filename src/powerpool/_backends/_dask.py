"""The dask backend: the same pool, run on a ``distributed`` cluster (scale-out).

This is the client side; what runs inside the workers is in ``_dask_worker``.
Each :class:`~powerpool._chunk.Chunk` becomes exactly one dask task. The pool
core sizes chunks (``chunk_target_s``, ``chunk_floor_s``) and bounds how many
are in flight (``workers``: the cluster's threads, re-read as workers come
and go), so this module only maps chunks onto cluster futures and back::

    core thread(s)              client (this process)                 dask workers
    ──────────────              ─────────────────────                 ────────────
    submit(chunk) ─ claim() ─► pickle items (bytes) ─ client.submit ─► _run_chunk(
                               fn pickled ONCE per run (inside the      fn box, items, ...)
                               task if small, else scattered)            initializer once
                                                                         per worker, then
                                                                         every item (timed
                                                                         when timeout=);
                                                                         returns a TaskReport
    deliver(ChunkResult) ◄─ results thread ◄─ _fetch() per future ◄──────┘
                            (unpickle, rebuild   (on the client's event
                             remote tracebacks)   loop, many at once)
                                    │
                                    └─ a late item's worker ─► _Restarter ─► its nanny
                                                               restarts it

Why the items and outcomes travel as bytes we pickle ourselves: an
unpicklable argument, result or exception is then caught here, per item, and
reported as :class:`SerializationError`, instead of failing the whole task
inside dask's comm layer (which logs a wall of errors and fails every item).

Failures map onto powerpool's error tree:

* an exception in your function: the item fails with it, its worker traceback
  attached as ``__cause__`` (a :class:`RemoteTraceback`);
* a worker dying mid-chunk: dask re-runs the task elsewhere by itself
  (``distributed.scheduler.allowed-failures``); when dask gives up
  (``KilledWorker``) every item of the chunk fails with
  :class:`WorkerCrashedError`, so the core's retries apply;
* ``cancel(epoch)``: the cluster futures of those epochs are cancelled; a task
  already running sees ``should_stop()`` turn true on its worker (we read the
  worker's own task state: no network round trip), and its chunk is delivered
  with :class:`concurrent.futures.CancelledError` outcomes.

* a per-item timeout: the worker gives up on the late item (its thread is
  abandoned, ``should_stop()`` turns true in it) and returns the chunk at
  once; the item fails with :class:`ItemTimeoutError`, the items after it are
  re-queued (:class:`ItemLost`), and the worker is restarted by its nanny,
  which ends the abandoned thread (without a nanny the thread runs on);
* a result lost before it was fetched whose recompute fails: reported like
  any failed task (never waited on forever).

``distributed`` is imported only inside functions, so ``import powerpool`` (and
even importing this module) works without it.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from powerpool._backends._base import BackendConfig, Deliver
from powerpool._backends._worker_logs import deliver as deliver_logs
from powerpool._chunk import Chunk, ChunkResult, ItemLost, Outcome
from powerpool._errors import (
    BackendUnavailableError,
    ItemTimeoutError,
    PoolClosedError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashedError,
)

from ._dask_cluster import (
    _check_options,
    _close_at_exit,
    _connect,
    _Restarter,
    check_worker_limits,
)
from ._dask_ship import Box, Shipper, pack_items, pickle_initializer, task_name
from ._dask_worker import TaskReport, _run_chunk
from ._wire import decode, format_error

__all__ = ["INSTALL_HINT", "DaskBackend"]

INSTALL_HINT = 'pip install "powerpool[dask]"'
"""What to run when ``distributed`` is missing (quoted: shells expand ``[...]``)."""

_log = logging.getLogger("powerpool")

# distributed's Client, Future and LocalCluster are only partly annotated
# (mypy --strict rejects calls to their unannotated methods), so they are
# handled as Any here; these aliases keep the intent readable.
_Client = Any
_Future = Any
_Cluster = Any

_KILLED = (
    "dask gave up on this chunk: every worker that ran it died "
    "(often out of memory, or a crash in native code). "
)

_E = TypeVar("_E", bound=BaseException)

_BATCH_MAX = 64
# Results handed to the core per wake-up of the results thread: enough to
# read the cluster's thread count once per batch, few enough that the first
# results are not held back.

_THREADS_REFRESH_S = 1.0
# How often, while results arrive, the cluster's thread count is read again
# (one small scheduler round trip): quick enough to follow an adaptive
# cluster, rare enough to cost nothing next to the chunks.

_TASK_COST_S = 0.001
_SCHEDULER_SHARE = 0.25
# The scheduler spends about 1 ms per task (dask's own estimate). Chunks are
# made long enough that, with every thread busy, the tasks need at most a
# quarter of the scheduler's time: target >= threads x 1 ms / 0.25. That is
# the 0.2 s floor up to 50 threads and 4 s on a 1000-thread cluster (250
# tasks/s); a busier scheduler answers late and leaves workers idle.

_CANCEL_GRACE_S = 10.0
# How long shutdown(wait=False) or shutdown(kill=True) waits for the cluster
# to confirm cancelled futures before reporting them cancelled itself. The
# confirmation is one message from the scheduler, normally milliseconds.


class _State(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(eq=False)
class _InFlight:
    """One chunk on the cluster (invariant: in the ledger until delivered)."""

    chunk: Chunk
    future: _Future
    sent: list[int]
    """Positions in ``chunk.items`` that were sent (the rest failed to pickle)."""
    prefailed: dict[int, BaseException]
    """Position -> error for items that never left this process."""
    fn_box: Box
    """Keeps the shipped function wanted while this chunk may still need it."""
    cancelled: bool = False
    """Set by cancel()/shutdown(): a CancelledError from dask is then expected."""


class DaskBackend:
    """Run chunks as tasks on a dask ``distributed`` cluster.

    ``BackendConfig.options``: at most one of ``address``, ``scheduler_file``
    or ``client`` (an existing synchronous Client, never closed here), plus
    ``security`` (passed to Client/LocalCluster). With none of the three, a
    ``LocalCluster`` of ``config.workers`` single-threaded processes is
    started (``cluster_kwargs`` adds to its arguments) and closed by
    :meth:`shutdown`. See docs/cluster.md.
    """

    name: ClassVar[str] = "dask"
    chunk_target_s: float = 1.0
    # Each task costs about 1 ms of scheduler time plus a network round trip
    # to start it and another to fetch its result: tens of ms on a busy
    # scheduler, when the client, the scheduler and the workers share cores.
    # 1 s chunks keep that to a few %, and a known-length run still gets 4
    # chunks per thread (the core's cap) to balance the load and re-run after
    # a worker loss. 0.2 s and 0.5 s measurably left workers waiting on the
    # scheduler (32 in-process workers x 3200 waits of 20 ms: medians 12.5 s
    # at 0.5 s, 5.4 s at 1 s, hand-batched client.map 4.2-4.8 s), worst where
    # the workers' own measured item time is inflated by a contended GIL. The
    # price: an imap's first results and a retried chunk's lost work are up
    # to ~1 s. This is the floor: a big cluster raises it with its thread
    # count (_chunk_target_s) so that the one scheduler never becomes the
    # bottleneck.
    chunk_floor_s: ClassVar[float] = 0.5
    # The core tapers chunks toward the end of a run so that no worker is left
    # alone with a long last chunk. On a cluster each task costs tens of ms
    # end to end on a busy scheduler, so the taper stops at half the target:
    # with a lower floor the taper doubled the task count (16 workers x 1600
    # waits: 0.1 s floor 3.4 s, 0.25 s floor 2.9-4.3 s, 0.5 s floor 2.9 s
    # against 2.8 s hand-batched), and the idle tail it could save is at most
    # one such chunk per worker.
    supports_timeout: ClassVar[bool] = True

    workers: int
    """Threads on the cluster now (re-read about once a second while chunks run)."""

    def __init__(self, config: BackendConfig, deliver: Deliver) -> None:
        try:
            import distributed
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the dask backend needs the 'distributed' package: {INSTALL_HINT}"
            ) from exc
        options = dict(config.options)
        _check_options(options)
        self._deliver = deliver
        # Unique per backend: names its tasks (so identical inputs are never
        # merged by dask) and keys the per-worker initializer state.
        self._token = uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)  # next() is atomic under the GIL
        from distributed.scheduler import KilledWorker  # where every version defines it

        _close_at_exit(self)

        self._killed_worker: type[BaseException] = KilledWorker

        self._native_threads = config.native_threads
        init_blob = pickle_initializer(config.initializer, config.initargs)

        check_worker_limits(config.max_tasks_per_child, config.max_worker_memory, options)
        if config.max_worker_memory is not None:
            # Dask's own rule: its nanny restarts a worker past 95% of this.
            cluster_kwargs = dict(options.get("cluster_kwargs") or {})
            cluster_kwargs.setdefault("memory_limit", config.max_worker_memory)
            options["cluster_kwargs"] = cluster_kwargs
        self._client, self._cluster, self._owns_client = _connect(
            distributed, options, config.workers
        )
        self._default_workers = max(1, config.workers)
        self.workers = self._default_workers
        self._shipper = Shipper(self._client, self._token)
        self._threads_read_at = 0.0
        try:
            self._read_threads()
            self._shipper.ship_initializer(init_blob)
        except BaseException:
            self._close_owned()
            raise

        # Invariant: _lock guards _state, _ledger and _delivering; a future
        # is in the ledger from submit() until the results thread takes it.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = _State.RUNNING
        self._ledger: dict[str, _InFlight] = {}
        self._delivering = 0  # chunks taken from the ledger, not yet delivered
        # Each future's result is fetched by a coroutine on the client's event
        # loop as its task finishes (many at once, no thread blocks) and
        # lands here; None tells the results thread to end.
        self._fetched: queue.SimpleQueue[tuple[_Future, str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._results_loop, name=f"powerpool-dask-results-{self._token}", daemon=True
        )
        self._thread.start()
        self._restarter = _Restarter(self._client, f"powerpool-dask-restarts-{self._token}")

    # -- the Backend protocol -------------------------------------------------

    def submit(self, chunk: Chunk) -> None:
        """Send ``chunk`` to the cluster as one task; never blocks on its work."""
        if not self._running():
            raise PoolClosedError("the dask backend was shut down")
        if not chunk.claim():
            return
        try:
            fn_box = self._shipper.ship(chunk.fn)
        except SerializationError as exc:
            # Delivered right here, as the serial backend does: the core allows
            # deliver() from inside submit().
            message, cause = str(exc), exc.__cause__
            make = functools.partial(_fresh, SerializationError, message, cause)
            self._safe_deliver(_all_failed(chunk, make))
            return
        blob, sent, prefailed = pack_items(chunk)
        if not sent:
            outcomes: list[Outcome] = [(False, prefailed[i]) for i in range(len(chunk.items))]
            self._safe_deliver(ChunkResult(chunk, outcomes, worker="", busy_s=0.0))
            return
        key = f"powerpool-{task_name(chunk.fn)}-{self._token}-{next(self._seq)}"
        try:
            future = self._client.submit(
                _run_chunk,
                fn_box,
                self._shipper.initializer,
                blob,
                n_items=len(sent),
                task_key=key,
                epoch=chunk.epoch,
                native_threads=self._native_threads,
                timeout_s=chunk.timeout_s,
                key=key,
                pure=False,  # also implied by the unique key; said for the reader
                retries=0,  # the core retries items; dask re-runs only on worker loss
            )
        except Exception as exc:  # the client is closed or lost its scheduler
            self._safe_deliver(_all_failed(chunk, functools.partial(_same, exc)))
            return
        with self._lock:
            if not self._running():  # shut down while we were submitting
                future.cancel()
                raise PoolClosedError("the dask backend was shut down")
            self._ledger[key] = _InFlight(chunk, future, sent, prefailed, fn_box)
            # Thread-safe and non-blocking: the fetch runs on the event loop.
            self._client.loop.add_callback(self._fetch, future)
            self._changed.notify_all()

    def cancel(self, epoch: int) -> None:
        """Cancel the cluster futures of every chunk of epochs <= ``epoch``."""
        with self._lock:
            doomed = [
                e for e in self._ledger.values() if e.chunk.epoch <= epoch and not e.cancelled
            ]
            for entry in doomed:
                entry.cancelled = True
        if doomed:
            # One message to the scheduler; a running task then finds its
            # worker-side state "cancelled" and should_stop() turns true. A
            # client that lost its scheduler has nothing left to cancel: its
            # futures are reported as they fail, so cancel() need not raise.
            with contextlib.suppress(Exception):
                self._client.cancel([entry.future for entry in doomed])

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        """Wait for (or cancel) in-flight chunks, then close what powerpool opened.

        ``wait=True`` delivers every in-flight chunk first; ``wait=False`` or
        ``kill=True`` cancels them (delivered as cancelled). A task already
        running on an external cluster finishes its current item unless it
        polls ``should_stop()``: dask cannot interrupt a running thread.
        """
        with self._lock:
            if self._state is not _State.RUNNING:
                return
            self._state = _State.CLOSING
            drain = wait and not kill
            doomed = [] if drain else [e for e in self._ledger.values() if not e.cancelled]
            for entry in doomed:
                entry.cancelled = True
        if doomed:
            # A dead client cancels nothing; whatever stays in the ledger is
            # reported cancelled below.
            with contextlib.suppress(Exception):
                self._client.cancel([entry.future for entry in doomed])
        on_results_thread = threading.current_thread() is self._thread
        if not on_results_thread:
            with self._lock:
                self._changed.wait_for(
                    lambda: not self._ledger and not self._delivering,
                    timeout=None if drain else _CANCEL_GRACE_S,
                )
        with self._lock:
            leftovers = list(self._ledger.values())
            self._ledger.clear()
            self._changed.notify_all()
        self._fetched.put(None)
        for entry in leftovers:
            self._safe_deliver(_all_failed(entry.chunk, _cancelled_error))
        if not on_results_thread:
            self._thread.join()
        self._shipper.clear()
        self._restarter.stop()
        if self._cluster is None:
            # Someone else's cluster lives on: let a restart under way finish
            # so that it gets its worker back, then let go of the client.
            self._restarter.join()
            self._close_owned()
        else:
            # Our own LocalCluster goes now: no reason to wait for a restart
            # (a new worker process) first. Closing the client ends it.
            self._close_owned()
            self._restarter.join()
        self._state = _State.CLOSED

    # -- internals ------------------------------------------------------------

    def _running(self) -> bool:
        return self._state is _State.RUNNING

    def _read_threads(self) -> None:
        """Set ``workers`` from the cluster's thread count (a blocking call: start-up only)."""
        self._threads_read_at = time.monotonic()
        try:
            info = self._client.scheduler_info(n_workers=0)  # totals only: one small reply
            threads = int(info.get("total_threads", 0))
        except TypeError:  # an older distributed without n_workers=
            threads = sum(self._client.nthreads().values())
        self._set_threads(threads)

    async def _refresh_threads(self) -> None:
        """On the client's event loop: read the thread count again, without blocking anyone.

        Adaptive clusters grow and shrink while a run goes on; the core reads
        ``workers`` before each refill and resizes its window and chunks.
        """
        try:
            info = await self._client.scheduler.identity(n_workers=0)
            threads = int(info.get("total_threads", 0))
        except Exception:  # an older scheduler, or none left: keep the old count
            return
        if self._set_threads(threads):
            boxes = self._shipper.scattered()
            if boxes:  # new workers get work only once they hold the scattered boxes
                with contextlib.suppress(Exception):
                    await self._client.replicate(boxes, asynchronous=True)

    def _set_threads(self, threads: int) -> bool:
        """Size for ``threads`` worker threads; whether the cluster grew."""
        # A cluster whose workers are all gone (yet) still gets chunks sized
        # for the workers it was asked for; dask queues them until some join.
        workers = threads if threads > 0 else self._default_workers
        self.chunk_target_s = _chunk_target_s(workers)
        grew = workers > self.workers
        self.workers = workers
        return grew

    def _results_loop(self) -> None:
        """Turn fetched results into ChunkResults, off dask's threads."""
        while (first := self._fetched.get()) is not None:
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < _BATCH_MAX:
                    more = self._fetched.get_nowait()
                    if more is None:
                        self._fetched.put(None)  # seen again after this batch: end then
                        break
                    batch.append(more)
            try:
                self._deliver_batch(batch)
            finally:
                # Drop our references before blocking again: a Future kept
                # alive keeps its task (and result) pinned on the cluster.
                del first, batch
                with self._lock:
                    self._delivering = 0
                    self._changed.notify_all()

    def _deliver_batch(self, batch: list[tuple[_Future, str, Any]]) -> None:
        with self._lock:
            taken = [(self._ledger.pop(str(f.key), None), status, v) for f, status, v in batch]
            live = [(e, status, v) for e, status, v in taken if e is not None]
            self._delivering += len(live)  # the others: shutdown() reported them
        if time.monotonic() - self._threads_read_at > _THREADS_REFRESH_S:
            # Asked on the event loop: a blocking call here would hold up
            # every result behind one scheduler round trip.
            self._threads_read_at = time.monotonic()
            self._client.loop.add_callback(self._refresh_threads)
        for entry, status, value in live:
            self._safe_deliver(self._collect(entry, status, value))

    async def _fetch(self, future: _Future) -> None:
        """On the client's event loop: wait for ``future``, fetch its result, queue both.

        Not ``distributed.as_completed(with_results=True)``: when a finished
        task's result is lost before it is fetched and its recompute then
        fails (e.g. ``KilledWorker``), as_completed's fetch raises inside it
        and the future is never handed out, so the run would hang. Here every
        outcome, that one included, reaches the results thread.
        """
        try:
            value = await self._client.gather(future, asynchronous=True)
            status = "finished"
        except BaseException as exc:
            if future.status == "cancelled" or isinstance(exc, CancelledError):
                status, value = "cancelled", exc
            else:
                status, value = "error", (type(exc), exc, exc.__traceback__)
        self._fetched.put((future, status, value))

    def _collect(self, entry: _InFlight, status: str, value: Any) -> ChunkResult:
        """Build the ChunkResult from what :meth:`_fetch` got for ``entry``."""
        chunk = entry.chunk
        if status == "cancelled":
            if entry.cancelled:
                return _all_failed(chunk, _cancelled_error)
            # Not ours: the scheduler forgot the task (e.g. the client lost it).
            lost = f"the dask scheduler dropped this chunk: {value}"
            return self._fail_sent(
                entry, functools.partial(_fresh, WorkerCrashedError, lost, value)
            )
        if status == "error":
            _type, exc, tb = value
            exc = exc.with_traceback(tb)
            if isinstance(exc, self._killed_worker):
                return self._fail_sent(
                    entry, functools.partial(_fresh, WorkerCrashedError, _KILLED + str(exc), exc)
                )
            # The task itself failed outside any item (we catch those).
            exc.__cause__ = RemoteTraceback(format_error(exc))
            return self._fail_sent(entry, functools.partial(_same, exc))
        report = TaskReport(*value)
        where, busy_s = report.worker, report.busy_s
        if report.logs is not None:  # the items' log records, for this process's handlers
            indices = [chunk.indices[position] for position in entry.sent]
            records, dropped = report.logs
            deliver_logs(records, dropped, indices, where, chunk.recorder)
        # Sent items only: a late item's outcome is added below.
        n_sent = len(entry.sent) if report.late < 0 else report.late
        loaded, values = decode(report.outcomes, n_sent)
        if loaded is None:
            assert values is not None  # decode gives one or the other
            loaded = [(True, value) for value in values]
        sent_outcomes = loaded  # remote errors arrive rebuilt (see _wire.ShippedError)
        if report.late >= 0:
            sent_outcomes.extend(self._late(entry, report))
            busy_s = float(chunk.timeout_s or 0.0)
        outcomes = _merge(entry, sent_outcomes)
        # .of(): all-succeeded chunks carry plain values, which is also what
        # feeds the core's chunk sizer (it learns only from such chunks).
        return ChunkResult.of(chunk, outcomes, where, busy_s)

    def _late(self, entry: _InFlight, report: TaskReport) -> list[Outcome]:
        """Outcomes from the item that ran late on: it timed out, the rest never ran."""
        chunk = entry.chunk
        index = chunk.indices[entry.sent[report.late]]
        if report.nanny:
            self._restarter.restart(report.worker)
            fate = "the worker was restarted to stop it"
        else:
            fate = "its thread was abandoned (a worker without a nanny cannot be restarted)"
        late = ItemTimeoutError(
            f"item {index} ran longer than its {chunk.timeout_s:g} s timeout on dask "
            f"worker {report.worker}; {fate}"
        )
        lost: list[Outcome] = [(False, ItemLost())] * (len(entry.sent) - report.late - 1)
        return [(False, late), *lost]

    def _fail_sent(self, entry: _InFlight, make: Callable[[], BaseException]) -> ChunkResult:
        failed: list[Outcome] = [(False, make()) for _ in entry.sent]
        return ChunkResult(entry.chunk, _merge(entry, failed), worker="", busy_s=0.0)

    def _safe_deliver(self, result: ChunkResult) -> None:
        try:
            self._deliver(result)
        except Exception:
            # The core's callback must not raise; if it does, losing this
            # thread would hang every later chunk, so say so and go on.
            _log.exception("deliver() raised in the dask backend")

    def _close_owned(self) -> None:
        if self._owns_client:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()


# -- client side helpers -----------------------------------------------------


def _chunk_target_s(threads: int) -> float:
    """Seconds of work per chunk for a cluster of ``threads`` worker threads."""
    return max(DaskBackend.chunk_target_s, threads * _TASK_COST_S / _SCHEDULER_SHARE)


def _merge(entry: _InFlight, sent_outcomes: list[Outcome]) -> list[Outcome]:
    """Put the outcomes of sent items and of items that failed here back in order."""
    if not entry.prefailed:
        return sent_outcomes
    merged: list[Outcome] = [(False, None)] * len(entry.chunk.items)
    for pos, err in entry.prefailed.items():
        merged[pos] = (False, err)
    for pos, outcome in zip(entry.sent, sent_outcomes, strict=True):
        merged[pos] = outcome
    return merged


def _all_failed(chunk: Chunk, make: Callable[[], BaseException]) -> ChunkResult:
    return ChunkResult(chunk, [(False, make()) for _ in chunk.items], worker="", busy_s=0.0)


def _fresh(cls: type[_E], message: str, cause: BaseException | None) -> _E:
    """A new error per item, so that raising one does not alter the others."""
    err = cls(message)
    err.__cause__ = cause
    return err


def _same(exc: BaseException) -> BaseException:
    return exc


def _cancelled_error() -> CancelledError:
    return CancelledError("the pool cancelled this item before it finished")

"""The dask backend: the same pool, run on a ``distributed`` cluster (scale-out).

Each :class:`~powerpool._task.Chunk` becomes exactly one dask task. The pool
core already sizes chunks (``chunk_target_s``) and bounds how many are in
flight, so this module only maps chunks onto cluster futures and back::

    core thread(s)              client (this process)                 dask workers
    ──────────────              ─────────────────────                 ────────────
    submit(chunk) ─ claim() ─► pickle items (bytes) ─ client.submit ─► _run_chunk(
                               fn scattered ONCE per run  ─ broadcast ─►  fn box, items, ...)
                                                                         initializer once
                                                                         per worker, then
                                                                         every item; returns
                                                                         pickled outcomes
    deliver(ChunkResult) ◄─ results thread ◄─ as_completed ◄─────────────┘
                            (unpickle, rebuild   (results fetched on the
                             remote tracebacks)   client's event loop,
                                                  without blocking it)

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

Per-item timeouts are not enforced (``supports_timeout = False``): dask cannot
stop a running task short of restarting the whole worker process, which would
also kill the other tasks that worker is running.

``distributed`` is imported only inside functions, so ``import powerpool`` (and
even importing this module) works without it.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import functools
import itertools
import logging
import os
import pickle
import re
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from powerpool._backends._base import BackendConfig, Deliver
from powerpool._backends._worker_logs import captured, deliver
from powerpool._errors import (
    BackendUnavailableError,
    InitializerError,
    PoolClosedError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashedError,
)
from powerpool._stop import StopToken, running
from powerpool._task import Chunk, ChunkResult, Outcome

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

_OPTIONS = frozenset({"address", "client", "cluster_kwargs", "scheduler_file", "security"})
"""Keys of ``BackendConfig.options`` this backend understands; others are typos."""

_FN_CACHE_SIZE = 4
# Scattered functions kept alive on the cluster. A run uses one function, and
# a warm pool may alternate between a few; each entry pins one copy of the
# function (and whatever a functools.partial carries) in every worker's
# memory, so the cache stays small.

_KILLED = (
    "dask gave up on this chunk: every worker that ran it died "
    "(often out of memory, or a crash in native code). "
)

_E = TypeVar("_E", bound=BaseException)

_CANCEL_GRACE_S = 10.0
# How long shutdown(wait=False) or shutdown(kill=True) waits for the cluster
# to confirm cancelled futures before reporting them cancelled itself. The
# confirmation is one message from the scheduler, normally milliseconds.


# Every backend not yet shut down, for the exit handler below.
_live: weakref.WeakSet[DaskBackend] = weakref.WeakSet()


@functools.cache
def _shut_down_before_distributed() -> None:
    """Register, once and after ``import distributed``, an exit handler that shuts
    every live dask backend down before distributed's own exit handlers run
    (atexit runs the last registered first). Otherwise distributed closes the
    LocalCluster while our client still holds scattered functions, and the
    scheduler logs "... caused the cluster to lose scattered data" at exit."""

    def shut_down() -> None:
        for backend in list(_live):
            backend.shutdown(wait=True)

    atexit.register(shut_down)


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
    fn_box: _Future
    """Keeps the scattered function wanted while this chunk may still need it."""
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
    chunk_target_s: ClassVar[float] = 0.2
    # Dask costs about 1 ms of scheduler and network time per task, plus a
    # round trip to fetch each result: 0.2 s chunks keep that under 1 %, while
    # still giving the scheduler many tasks to balance and re-run after a
    # worker loss (the core aims each chunk at 0.1-1 s from this target).
    supports_timeout: ClassVar[bool] = False

    workers: int

    def __init__(self, config: BackendConfig, deliver: Deliver) -> None:
        try:
            import distributed
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the dask backend needs the 'distributed' package: {INSTALL_HINT}"
            ) from exc
        _shut_down_before_distributed()
        options = dict(config.options)
        _check_options(options)
        self._deliver = deliver
        # Unique per backend: names its tasks (so identical inputs are never
        # merged by dask) and keys the per-worker initializer state.
        self._token = uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)  # next() is atomic under the GIL
        from distributed.scheduler import KilledWorker  # where every version defines it

        self._killed_worker: type[BaseException] = KilledWorker

        self._native_threads = config.native_threads
        init_blob: bytes | None = None
        if config.initializer is not None:
            spec = (config.initializer, tuple(config.initargs))
            try:
                init_blob = _dumps(spec)
            except Exception as exc:
                raise SerializationError(
                    f"the initializer or its initargs could not be pickled: {exc}"
                ) from exc

        self._client, self._cluster, self._owns_client = _connect(
            distributed, options, config.workers
        )
        try:
            if self._cluster is not None:
                self.workers = max(1, config.workers)
            else:
                threads = sum(self._client.nthreads().values())
                self.workers = threads if threads > 0 else max(1, config.workers)
            self._init_box: _Future | None = None
            if init_blob is not None:
                self._init_box = self._client.scatter(
                    _Shipped(init_blob, self._token), broadcast=True, hash=False
                )
        except BaseException:
            self._close_owned()
            raise

        # Invariant: _lock guards _state, _ledger, _delivering and _stopping;
        # a future is in the ledger exactly while it is in _done (added together).
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = _State.RUNNING
        self._ledger: dict[str, _InFlight] = {}
        self._delivering = 0  # chunks taken from the ledger, not yet delivered
        self._stopping = False
        self._fn_lock = threading.Lock()  # held while scattering: blocks only new functions
        self._fns: list[tuple[Callable[..., Any], _Future]] = []
        # as_completed gathers each result on the client's event loop as its
        # task finishes (no thread of dask's own blocks, none is started) and
        # hands (future, result) pairs to our results thread.
        as_completed: Any = distributed.as_completed  # unannotated in distributed
        self._done = as_completed(loop=self._client.loop, with_results=True, raise_errors=False)
        self._thread = threading.Thread(
            target=self._results_loop, name=f"powerpool-dask-results-{self._token}", daemon=True
        )
        self._thread.start()
        _live.add(self)

    # -- the Backend protocol -------------------------------------------------

    def submit(self, chunk: Chunk) -> None:
        """Send ``chunk`` to the cluster as one task; never blocks on its work."""
        if not self._running():
            raise PoolClosedError("the dask backend was shut down")
        if not chunk.claim():
            return
        try:
            fn_box = self._ship(chunk.fn)
        except SerializationError as exc:
            # Delivered right here, as the serial backend does: the core allows
            # deliver() from inside submit().
            message, cause = str(exc), exc.__cause__
            make = functools.partial(_fresh, SerializationError, message, cause)
            self._safe_deliver(_all_failed(chunk, make))
            return
        blob, sent, prefailed = _pack_items(chunk)
        if not sent:
            outcomes: list[Outcome] = [(False, prefailed[i]) for i in range(len(chunk.items))]
            self._safe_deliver(ChunkResult(chunk, outcomes, worker="", busy_s=0.0))
            return
        key = f"powerpool-{_task_name(chunk.fn)}-{self._token}-{next(self._seq)}"
        try:
            future = self._client.submit(
                _run_chunk,
                fn_box,
                self._init_box,
                blob,
                n_items=len(sent),
                task_key=key,
                epoch=chunk.epoch,
                native_threads=self._native_threads,
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
            self._done.add(future)  # non-blocking: schedules a watcher on the event loop
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
            _live.discard(self)
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
            self._stopping = True
            self._changed.notify_all()
        self._done.clear()  # the results thread's wait on it ends within 0.1 s
        for entry in leftovers:
            self._safe_deliver(_all_failed(entry.chunk, _cancelled_error))
        if not on_results_thread:
            self._thread.join()
        with self._fn_lock:
            self._fns.clear()  # dropping the futures lets dask free the scattered copies
        self._init_box = None
        self._close_owned()
        self._state = _State.CLOSED

    # -- internals ------------------------------------------------------------

    def _running(self) -> bool:
        return self._state is _State.RUNNING

    def _ship(self, fn: Callable[..., Any]) -> _Future:
        """Scatter ``fn`` to every worker once; later chunks refer to the copy."""
        with self._fn_lock:
            for i, (known, box) in enumerate(self._fns):
                if known is fn:
                    self._fns.append(self._fns.pop(i))  # most recently used last
                    return box
            try:
                blob = _dumps(fn)
            except Exception as exc:
                raise SerializationError(
                    f"the function {getattr(fn, '__qualname__', fn)!s} could not be pickled: {exc}"
                ) from exc
            box = self._client.scatter(_Shipped(blob, self._token), broadcast=True, hash=False)
            self._fns.append((fn, box))
            del self._fns[:-_FN_CACHE_SIZE]
            return box

    def _results_loop(self) -> None:
        """Turn finished futures into ChunkResults, off dask's threads."""
        while True:
            with self._lock:
                self._changed.wait_for(lambda: bool(self._ledger) or self._stopping)
                if self._stopping:
                    return
            # Ends when every future added so far has been handed out.
            for future, value in self._done:
                with self._lock:
                    entry = self._ledger.pop(str(future.key), None)
                    if entry is None:  # shutdown() already reported it
                        continue
                    self._delivering += 1
                try:
                    self._safe_deliver(self._collect(entry, future.status, value))
                finally:
                    # Drop our references before blocking again: a Future kept
                    # alive keeps its task (and result) pinned on the cluster.
                    del entry, future, value
                    with self._lock:
                        self._delivering -= 1
                        self._changed.notify_all()

    def _collect(self, entry: _InFlight, status: str, value: Any) -> ChunkResult:
        """Build the ChunkResult from what as_completed gathered for ``entry``."""
        chunk = entry.chunk
        if status == "cancelled" or isinstance(value, CancelledError):
            if entry.cancelled:
                return _all_failed(chunk, _cancelled_error)
            # Not ours: the scheduler forgot the task (e.g. the client lost it).
            lost = f"the dask scheduler dropped this chunk: {value}"
            return self._fail_sent(
                entry, functools.partial(_fresh, WorkerCrashedError, lost, value)
            )
        if status == "error":
            _type, exc, tb = value  # what as_completed gives for a failed task
            exc = exc.with_traceback(tb)
            if isinstance(exc, self._killed_worker):
                return self._fail_sent(
                    entry, functools.partial(_fresh, WorkerCrashedError, _KILLED + str(exc), exc)
                )
            # The task itself failed outside any item (we catch those).
            exc.__cause__ = RemoteTraceback(_format(exc))
            return self._fail_sent(entry, functools.partial(_same, exc))
        where, busy_s, blob, *logs = value
        if logs:  # the items' log records, for this process's handlers
            indices = [chunk.indices[position] for position in entry.sent]
            records, dropped = logs[0]
            deliver(records, dropped, indices, where, chunk.recorder)
        try:
            sent_outcomes: list[tuple[bool, Any]] = pickle.loads(blob)
        except Exception as exc:
            why = f"the results of this chunk could not be unpickled: {exc}"
            return self._fail_sent(entry, functools.partial(_fresh, SerializationError, why, exc))
        outcomes = _merge(entry, [_rebuild(o) for o in sent_outcomes])
        return ChunkResult(chunk, outcomes, worker=where, busy_s=busy_s)

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


def _check_options(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown dask option(s) {', '.join(unknown)}; known: {', '.join(sorted(_OPTIONS))}"
        )
    given = [k for k in ("address", "scheduler_file", "client") if options.get(k) is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of address, scheduler_file, client (got {given})")
    if options.get("client") is not None and options.get("security") is not None:
        raise ValueError("security= applies to a new Client; the given client has its own")
    if options.get("cluster_kwargs") and given:
        raise ValueError("cluster_kwargs only applies when powerpool starts a LocalCluster")


def _connect(
    distributed: Any, options: Mapping[str, Any], workers: int
) -> tuple[_Client, _Cluster | None, bool]:
    """Return (client, cluster we started or None, whether we own the client)."""
    client = options.get("client")
    if client is not None:
        if not isinstance(client, distributed.Client):
            raise TypeError(f"client= must be a distributed.Client, not {type(client).__name__}")
        if client.asynchronous:
            raise ValueError("client= must be a synchronous Client (asynchronous=False)")
        return client, None, False
    security = options.get("security")
    address = options.get("address")
    scheduler_file = options.get("scheduler_file")
    if address is not None or scheduler_file is not None:
        where = address if address is not None else f"scheduler file {scheduler_file}"
        try:
            new = distributed.Client(
                address,
                scheduler_file=scheduler_file,
                security=security,
                set_as_default=False,  # never hijack the caller's default dask scheduler
            )
        except OSError as exc:
            raise OSError(f"could not connect to the dask scheduler at {where}: {exc}") from exc
        return new, None, True
    kwargs: dict[str, Any] = {
        "n_workers": max(1, workers),
        "threads_per_worker": 1,  # the pool's workers are processes, like backend="processes"
        "processes": True,
        # A free port, not :8787: a second cluster would find 8787 taken and
        # warn (None does not help: the scheduler's HTTP server still takes 8787).
        "dashboard_address": ":0",
    }
    if security is not None:
        kwargs["security"] = security
    kwargs.update(options.get("cluster_kwargs") or {})
    cluster = distributed.LocalCluster(**kwargs)
    try:
        new = distributed.Client(cluster, security=cluster.security, set_as_default=False)
    except BaseException:
        cluster.close()
        raise
    return new, cluster, True


def _dumps(obj: object) -> bytes:
    """Pickle ``obj``, with cloudpickle where plain pickle cannot (lambdas, ``__main__``)."""
    try:
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        blob = b"__main__"  # fall through to cloudpickle below
    # Same test as distributed's own: a reference to __main__ cannot be
    # resolved in another process, so such objects are pickled by value.
    if b"__main__" not in blob:
        return blob
    import cloudpickle

    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


def _pack_items(chunk: Chunk) -> tuple[bytes, list[int], dict[int, BaseException]]:
    """Pickle the calls of ``chunk``; an item that cannot be pickled fails alone."""
    calls = [(args, kwargs) for _index, args, kwargs in chunk.items]
    try:
        return _dumps(calls), list(range(len(calls))), {}
    except Exception:
        pass  # find the culprits one by one: the rare path, so the double work is fine
    sent: list[int] = []
    prefailed: dict[int, BaseException] = {}
    for pos, call in enumerate(calls):
        try:
            _dumps(call)
        except Exception as exc:
            err = SerializationError(
                f"the arguments of item {chunk.items[pos][0]} could not be pickled: {exc}"
            )
            err.__cause__ = exc
            prefailed[pos] = err
        else:
            sent.append(pos)
    blob = _dumps([calls[pos] for pos in sent]) if sent else b""
    return blob, sent, prefailed


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


def _task_name(fn: Callable[..., Any]) -> str:
    """A readable task prefix for the dashboard, e.g. ``powerpool-is_prime-...``."""
    inner = getattr(fn, "func", fn)  # functools.partial shows what it wraps
    raw = getattr(inner, "__name__", type(inner).__name__)
    return re.sub(r"[^A-Za-z0-9_]", "_", raw)[:40] or "fn"


def _rebuild(outcome: tuple[bool, Any]) -> Outcome:
    ok, value = outcome
    if ok or not isinstance(value, _RemoteFailure):
        return ok, value
    return False, value.rebuild()


# -- shared by both sides ----------------------------------------------------

_UNSET: Any = object()


class _Shipped:
    """Bytes pickled once on the client and unpickled at most once per worker.

    Scattered with ``broadcast=True``: each worker receives the bytes once
    and every task on it gets this same object, so ``load()`` unpickles the
    function (and a functools.partial's big arguments) once per worker, not
    once per chunk. After loading, the bytes are dropped to halve the memory;
    they are rebuilt only if dask copies the object to a new worker.
    """

    __slots__ = ("_blob", "_lock", "_value", "token")

    def __init__(self, blob: bytes, token: str) -> None:
        self._blob: bytes | None = blob
        self.token = token
        self._lock = threading.Lock()
        self._value: Any = _UNSET

    def __getstate__(self) -> tuple[bytes, str]:
        with self._lock:
            blob = self._blob if self._blob is not None else _dumps(self._value)
        return blob, self.token

    def __setstate__(self, state: tuple[bytes, str]) -> None:
        self._blob, self.token = state
        self._lock = threading.Lock()
        self._value = _UNSET

    def load(self) -> Any:
        with self._lock:
            if self._value is _UNSET:
                assert self._blob is not None  # invariant: one of the two is set
                self._value = pickle.loads(self._blob)
                self._blob = None
            return self._value


class _RemoteFailure:
    """An item's exception on its way back, with the worker traceback as text.

    Exceptions lose ``__cause__`` when pickled, so the traceback (and, for an
    initializer failure, the original error) travel beside it and are
    attached again on the client by :meth:`rebuild`.
    """

    __slots__ = ("cause", "exc", "tb")

    def __init__(self, exc: BaseException, tb: str, cause: _RemoteFailure | None = None) -> None:
        self.exc = exc
        self.tb = tb
        self.cause = cause

    def __reduce__(self) -> tuple[object, ...]:
        return (_RemoteFailure, (self.exc, self.tb, self.cause))

    @classmethod
    def capture(cls, exc: BaseException) -> _RemoteFailure:
        """Record ``exc``; one that cannot cross the wire becomes a SerializationError."""
        tb = _format(exc)
        try:
            pickle.loads(_dumps(exc))  # both ways: a bad __init__ fails only on loads
        except Exception as why:
            name = f"{type(exc).__module__}.{type(exc).__qualname__}"
            exc = SerializationError(f"{name}: {exc} (the exception could not be pickled: {why})")
        return cls(exc, tb)

    def rebuild(self) -> BaseException:
        exc = self.exc
        exc.__cause__ = self.cause.rebuild() if self.cause else RemoteTraceback(self.tb)
        return exc


# -- worker side -------------------------------------------------------------

_INIT_LOCK = threading.Lock()
_INIT_DONE: dict[tuple[str, str], _RemoteFailure | None] = {}
"""(backend token, worker address) -> None once the initializer ran, or its failure.

Lives in each worker process; keyed by worker too because several in-process
workers (LocalCluster(processes=False)) share one module."""


def _initialize(box: _Shipped, where: str) -> _RemoteFailure | None:
    """Run the pool's initializer once per worker, before that worker's first item."""
    key = (box.token, where)
    with _INIT_LOCK:  # held while it runs: the worker's other threads must wait for it
        if key in _INIT_DONE:
            return _INIT_DONE[key]
        failure: _RemoteFailure | None = None
        try:
            initializer, initargs = box.load()
            initializer(*initargs)
        except Exception as exc:
            failure = _RemoteFailure(
                InitializerError(
                    f"the pool's initializer raised {type(exc).__name__}: {exc} "
                    f"(on dask worker {where})"
                ),
                tb="",
                cause=_RemoteFailure.capture(exc),
            )
        _INIT_DONE[key] = failure
        return failure


class _TaskCancelled:
    """Stop flag for one task: reads the worker's own state for the task's key.

    ``client.cancel`` makes the scheduler tell the worker to forget the key;
    the worker marks a running task "cancelled" (or drops it). Reading that is
    a dict lookup in this process, cheap enough to poll in a tight loop.
    """

    __slots__ = ("_epoch", "_key", "_tasks")

    def __init__(self, key: str, epoch: int) -> None:
        self._key = key
        self._epoch = epoch
        try:
            from distributed import get_worker

            self._tasks: Mapping[Any, Any] | None = get_worker().state.tasks
        except Exception:  # not inside a dask worker (direct call in a test)
            self._tasks = None

    @property
    def value(self) -> int:
        if self._tasks is None:
            return -1
        task = self._tasks.get(self._key)
        if task is None or task.state in ("cancelled", "released", "forgotten"):
            return self._epoch
        return -1

    @value.setter
    def value(self, _new: int) -> None:
        raise AttributeError("a dask task's stop flag is set by the scheduler only")


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except Exception:
        return f"pid {os.getpid()}"


def _run_chunk(
    fn_box: _Shipped,
    init_box: _Shipped | None,
    blob: bytes,
    *,
    n_items: int,
    task_key: str,
    epoch: int,
    native_threads: int | None,
) -> tuple[Any, ...]:
    """Worker side: run every call of one chunk; return (worker, busy_s, pickled
    outcomes) and, once items ran, ((log record dicts, dropped),)."""
    where = _worker_address()
    failure = _initialize(init_box, where) if init_box is not None else None
    if failure is not None:
        return where, 0.0, _dump_outcomes([(False, failure)] * n_items)
    try:
        fn = fn_box.load()
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = pickle.loads(blob)
    except Exception as exc:  # e.g. a module importable on the client but not here
        return where, 0.0, _dump_outcomes([(False, _RemoteFailure.capture(exc))] * n_items)
    outcomes: list[tuple[bool, Any]] = []
    token = StopToken(_TaskCancelled(task_key, epoch), epoch)
    start = time.perf_counter()
    with running(token), _native_limit(native_threads), captured(lambda: len(outcomes)) as logs:
        for args, kwargs in calls:
            if token.is_set():
                break  # dask discards a cancelled task's result: skip the rest
            try:
                outcomes.append((True, fn(*args, **kwargs)))
            except (Exception, SystemExit) as exc:
                outcomes.append((False, _RemoteFailure.capture(exc)))
    busy_s = time.perf_counter() - start
    stopped = _RemoteFailure(CancelledError("cancelled"), tb="")
    outcomes.extend([(False, stopped)] * (len(calls) - len(outcomes)))
    return where, busy_s, _dump_outcomes(outcomes), (logs.records, logs.dropped)


def _native_limit(native_threads: int | None) -> contextlib.AbstractContextManager[object]:
    """Cap BLAS/OpenMP threads for one chunk, when the pool asked for a cap.

    Per chunk, not once per worker: threadpoolctl limits only the libraries
    loaded so far, and the function may load numpy on its first call. It
    costs under 1 ms per 0.2 s chunk. Without a cap, dask's default holds
    (nannies start workers with OMP/MKL/OPENBLAS_NUM_THREADS=1).
    """
    if native_threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    limits: contextlib.AbstractContextManager[object] = threadpool_limits(limits=native_threads)
    return limits


def _dump_outcomes(outcomes: list[tuple[bool, Any]]) -> bytes:
    """Pickle the outcomes; a result that cannot be pickled fails alone."""
    try:
        return _dumps(outcomes)
    except Exception:
        pass
    checked: list[tuple[bool, Any]] = []
    for ok, value in outcomes:
        try:
            _dumps(value)
        except Exception as exc:
            err = SerializationError(
                f"the result (a {type(value).__qualname__}) could not be pickled: {exc}"
            )
            checked.append((False, _RemoteFailure(err, tb=_format(exc))))
        else:
            checked.append((ok, value))
    return _dumps(checked)


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

"""The worker side of the dask backend: what runs inside dask workers.

Kept apart from the client side (``_dask.py``) because dask pickles these
functions *by reference*: every worker imports this module, so it must stay
importable without the client's state and light to import. It holds

* :class:`_Shipped`, the box both sides share: bytes pickled once on the
  client, unpickled once per worker (an item's exception travels in
  ``_wire.ShippedError``, as from process workers);
* :func:`_run_chunk`, the task body: initializer once per worker, then every
  item of the chunk, with per-item timeouts when the run has one.

Nothing here imports ``distributed`` at module level.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError
from typing import Any, NamedTuple

from powerpool._backends._itemloop import KEYWORDS, ItemWatch, run_chunk
from powerpool._backends._native_threads import limit_native_threads
from powerpool._backends._wire import OUTCOMES, VALUES, ShippedError, dumps, encode
from powerpool._backends._worker_logs import ChunkCapture, captured
from powerpool._errors import InitializerError
from powerpool._stop import StopToken, running

# -- shared by both sides ----------------------------------------------------


def _dumps(obj: object) -> bytes:
    """Pickle ``obj`` by the one wire rule (:func:`_wire.dumps`), by value with cloudpickle."""
    return dumps(obj, by_value=_cloudpickle)


def _cloudpickle(obj: object) -> bytes:
    import cloudpickle

    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


_UNSET: Any = object()


class _Shipped:
    """Bytes pickled once on the client and unpickled at most once per worker.

    A small one travels inside each task and is unpickled per chunk (cheap).
    A big one is scattered with ``broadcast=True``: each worker receives the
    bytes once and every task on it gets this same object, so ``load()``
    unpickles the
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


# -- worker side -------------------------------------------------------------

_INIT_LOCK = threading.Lock()
_INIT_DONE: dict[tuple[str, str], ShippedError | None] = {}
"""(backend token, worker address) -> None once the initializer ran, or its failure.

Lives in each worker process; keyed by worker too because several in-process
workers (LocalCluster(processes=False)) share one module."""


def _initialize(box: _Shipped, where: str) -> ShippedError | None:
    """Run the pool's initializer once per worker, before that worker's first item."""
    key = (box.token, where)
    with _INIT_LOCK:  # held while it runs: the worker's other threads must wait for it
        if key in _INIT_DONE:
            return _INIT_DONE[key]
        failure: ShippedError | None = None
        try:
            initializer, initargs = box.load()
            initializer(*initargs)
        except Exception as exc:
            failure = ShippedError(
                InitializerError(
                    f"the pool's initializer raised {type(exc).__name__}: {exc} "
                    f"(on dask worker {where})"
                ),
                tb="",
                cause=ShippedError.capture(exc),
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


class TaskReport(NamedTuple):
    """What one chunk's task sends back to the client."""

    worker: str
    """Address of the dask worker that ran it."""
    busy_s: float
    """Seconds spent running items."""
    outcomes: bytes
    """Pickled ``(ok, value)`` of each item that finished (all, unless one ran late)."""
    late: int = -1
    """Position of the item that ran past the timeout and was abandoned, or -1."""
    nanny: bool = False
    """Whether the worker has a nanny (so the client can restart it after a late item)."""
    logs: tuple[list[dict[str, Any]], int] | None = None
    """The items' log records (plain dicts, by position in the chunk) and how many
    were dropped, for the client's handlers; None when no item ran."""


def _run_chunk(
    fn_box: _Shipped,
    init_box: _Shipped | None,
    blob: bytes,
    *,
    n_items: int,
    task_key: str,
    epoch: int,
    native_threads: int | None,
    timeout_s: float | None = None,
) -> TaskReport:
    """Worker side: run every call of one chunk and report the outcomes."""
    where = _worker_address()
    failure = _initialize(init_box, where) if init_box is not None else None
    if failure is not None:
        return TaskReport(where, 0.0, _dump_outcomes([(False, failure)] * n_items))
    try:
        fn = fn_box.load()
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = pickle.loads(blob)
    except Exception as exc:  # e.g. a module importable on the client but not here
        return TaskReport(
            where, 0.0, _dump_outcomes([(False, ShippedError.capture(exc))] * n_items)
        )
    token = StopToken(_TaskCancelled(task_key, epoch), epoch)
    progress = _Progress()
    start = time.perf_counter()
    if timeout_s is None:
        outcomes = _run_calls(fn, calls, token, native_threads, progress, timed=False)
        late = -1
    else:
        outcomes, late = _run_timed(fn, calls, token, native_threads, timeout_s, progress)
    busy_s = time.perf_counter() - start
    logs = progress.logs
    if late >= 0:
        return TaskReport(where, busy_s, _dump_outcomes(outcomes), late, _has_nanny(), logs)
    stopped = ShippedError(CancelledError("cancelled"), tb="")
    outcomes.extend([(False, stopped)] * (len(calls) - len(outcomes)))
    return TaskReport(where, busy_s, _dump_outcomes(outcomes), logs=logs)


class _Progress:
    """Where a timed chunk's item thread is; guarded by ``cond``.

    Invariant: ``outcomes`` holds the finished items in order, so the item
    running now is at ``len(outcomes)`` and started at ``started``. Once
    ``abandoned`` is set the task thread reports a copy of the list: what the
    item thread appends after that is dropped.
    """

    __slots__ = ("abandoned", "capture", "cond", "finished", "logs", "outcomes", "started")

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.outcomes: list[tuple[bool, Any]] = []
        self.started = time.monotonic()
        self.finished = False
        self.abandoned = False
        self.capture: ChunkCapture | None = None
        """What the item thread logs (its records are kept per thread)."""
        self.logs: tuple[list[dict[str, Any]], int] | None = None
        """The records to report, taken when the items end or are given up on."""


def _run_calls(
    fn: Callable[..., Any],
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    token: StopToken,
    native_threads: int | None,
    progress: _Progress,
    *,
    timed: bool,
) -> list[tuple[bool, Any]]:
    """Run the calls in order until done or stopped; the outcomes go to ``progress``.

    ``timed``: another thread watches ``progress`` for a late item, so each
    item's start and end are published under its lock.
    """
    outcomes = progress.outcomes
    with (
        running(token),
        # Capped around the chunk only: the worker is shared (see _native_threads).
        contextlib.nullcontext()
        if native_threads is None
        else limit_native_threads(native_threads, own_process=False),
        captured(lambda: len(outcomes)) as capture,  # this thread's records only
    ):
        with progress.cond:
            progress.capture = capture
        run_chunk(
            fn, calls, KEYWORDS, _Watch(token, progress, timed), in_caller=False, outcomes=outcomes
        )
    with progress.cond:
        if progress.logs is None:  # not yet reported as abandoned
            progress.logs = (capture.records, capture.dropped)
        progress.finished = True
        progress.cond.notify_all()
    return outcomes


class _Watch(ItemWatch):
    """Stops at a cancelled task; with a timeout, publishes each item's start to
    the task thread watching ``progress`` and stops once it gave the chunk up."""

    __slots__ = ("_progress", "_timed", "_token")

    def __init__(self, token: StopToken, progress: _Progress, timed: bool) -> None:
        self._token = token
        self._progress = progress
        self._timed = timed

    def started(self, position: int) -> bool:
        if self._token.is_set():
            return False  # cancelled (dask discards the result) or abandoned: skip the rest
        if self._timed:
            with self._progress.cond:
                self._progress.started = time.monotonic()
                self._progress.cond.notify_all()
        return True

    def finished(self, position: int) -> bool:
        if not self._timed:
            return True
        with self._progress.cond:
            self._progress.cond.notify_all()
            return not self._progress.abandoned


def _run_timed(
    fn: Callable[..., Any],
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    token: StopToken,
    native_threads: int | None,
    timeout_s: float,
    progress: _Progress,
) -> tuple[list[tuple[bool, Any]], int]:
    """Run the calls in a helper thread; give up on an item that runs past ``timeout_s``.

    A thread cannot be stopped from outside, so the late item's thread is
    *abandoned*: ``should_stop()`` turns true in it, it runs no further item,
    and being a daemon thread it never holds up the worker's exit. The task
    returns at once with the finished items and the late one's position, so
    dask's thread is free again; the client then restarts the worker when a
    nanny can (which also ends the abandoned thread).
    """
    thread = threading.Thread(
        target=_run_calls,
        args=(fn, calls, token, native_threads, progress),
        kwargs={"timed": True},
        name="powerpool-dask-timed-item",
        daemon=True,
    )
    thread.start()
    with progress.cond:
        while not progress.finished:
            left = progress.started + timeout_s - time.monotonic()
            if left <= 0:
                progress.abandoned = True
                token.abandon()
                # What was logged so far, the late item's records included.
                capture = progress.capture
                progress.logs = (
                    ([], 0) if capture is None else (list(capture.records), capture.dropped)
                )
                return list(progress.outcomes), len(progress.outcomes)
            progress.cond.wait(left)
        outcomes = progress.outcomes
    thread.join()
    return outcomes, -1


def _has_nanny() -> bool:
    try:
        from distributed import get_worker

        return get_worker().nanny is not None
    except Exception:
        return False


def _dump_outcomes(outcomes: list[tuple[bool, Any]]) -> bytes:
    """Pickle the outcomes so that a result that won't pickle here, or won't load
    again, fails alone (the process engine's framing, see ``_wire``)."""
    if all(ok for ok, _ in outcomes):
        return encode(VALUES, [value for _, value in outcomes])
    shipped = [
        (ok, value if ok or isinstance(value, ShippedError) else ShippedError.capture(value))
        for ok, value in outcomes
    ]
    return encode(OUTCOMES, shipped)

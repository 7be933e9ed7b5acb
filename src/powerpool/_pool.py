"""``Pool``: the one object users hold, whatever backend runs the work.

A pool owns its backends (started lazily, one per backend name and worker
count, so ``auto`` can use threads for one map and processes for the next),
its lifecycle state, the cancel epoch and the statistics ledger. The work of
a single map is done by :class:`~powerpool._run.Run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._backends import BackendConfig, load
from ._errors import PoolClosedError
from ._execute import is_coroutine_function
from ._options import (
    DASK_OPTION_NAMES,
    POOL_OPTION_NAMES,
    RUN_OPTION_NAMES,
    BackendName,
    PoolOptions,
    ReportTarget,
    RunOptionsDict,
    check_backend,
    check_backend_options,
    check_names,
    check_report,
    check_worker_limits,
    run_options,
)
from ._recorder import Recorder, RunReport, failed_items
from ._run import Attempts, Run, RunOptions
from ._stats import PoolStats, StatsLedger
from ._system import usable_cores, worker_cores
from ._task import Chunk, ChunkResult, Item, ItemLost

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ._backends import Backend
    from ._decide import Evidence
    from ._options import Unpack
    from ._plan import Plan
    from ._speculate import Steer

__all__ = ["Pool", "PoolState", "ReportTarget"]

_ASYNC_BACKENDS = ("asyncio",)

_P = ParamSpec("_P")
_R = TypeVar("_R")

MAX_LIVE_BACKENDS = 4
"""Backends kept warm per pool (auto may start one per kind of work); the
least recently used is shut down beyond this, so workers don't pile up."""


class PoolState(enum.Enum):
    """Lifecycle: OPEN --shutdown()--> CLOSING --(work drained)--> CLOSED."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def default_workers(backend: str) -> int:
    """Workers a backend gets when the user does not say."""
    if backend == "serial":
        return 1
    if backend == "asyncio":
        from ._aio import ASYNC_DEFAULT_WORKERS

        return ASYNC_DEFAULT_WORKERS
    cores = usable_cores()
    if backend == "threads":
        return min(32, cores + 4)  # ThreadPoolExecutor's default, for the same reasons
    return cores


class Pool:
    """Runs a function over many inputs on a chosen backend (``"auto"`` measures and picks).

    Options given here (every one of ``_options.PoolOptions``) are defaults;
    ``map``/``imap``/``imap_unordered`` take the per-run ones
    (``_options.RunOptionsDict``: chunksize, timeout, retries, retry_on,
    errors, progress, report, explain, max_inflight_bytes) as keyword overrides.

    Large data (see README "Large data"): ``max_inflight_bytes`` bounds the
    bytes of results in flight or waiting (default 64 MB);
    ``max_tasks_per_child`` and ``max_worker_memory`` (RSS bytes) replace
    worker processes after that many items or past that memory;
    ``writable_arguments`` maps large array arguments copy-on-write
    instead of read-only.
    """

    def __init__(self, backend: BackendName = "auto", **options: Unpack[PoolOptions]) -> None:
        check_backend(backend)
        check_names(options, POOL_OPTION_NAMES)
        workers = options.get("workers")
        initializer = options.get("initializer")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        backend_options: dict[str, Any] = {
            k: v for k, v in options.items() if k in DASK_OPTION_NAMES
        }
        if backend_options:
            check_backend_options(backend, backend_options)
        check_worker_limits(
            backend,
            options.get("max_tasks_per_child"),
            options.get("max_worker_memory"),
            backend_options,
        )
        self._backend_name = backend
        self._workers = workers
        run: dict[str, Any] = {
            k: v for k, v in options.items() if k in RUN_OPTION_NAMES and k not in _NOT_RUN
        }
        self._defaults = run_options(RunOptions(progress="auto"), **run)
        if backend != "auto":
            # Say so now: submit() never reaches the per-run check in _iterate.
            _check_timeout(backend, self._defaults)
        self._initializer = initializer
        self._initargs = tuple(options.get("initargs", ()))
        self._native_threads = options.get("native_threads")
        self._start_method = options.get("start_method")
        self._max_tasks_per_child = options.get("max_tasks_per_child")
        self._max_worker_memory = options.get("max_worker_memory")
        self._writable_arguments = bool(options.get("writable_arguments", False))
        self._explain = options.get("explain", False)
        report = options.get("report")
        check_report(report)
        self._report = report
        # One recorder for everything the pool runs (report= given here),
        # made when the first run starts (time 0 of its report): its report
        # covers all runs so far and is rewritten as each one ends.
        self._recorder: Recorder | None = None
        self._futures_recorded = False
        self.last_report: RunReport | None = None
        """What the most recent run recorded, when a report was asked for
        (``report=`` here or on the call); renders inline in notebooks."""
        self._isolate: str | None = None  # set by `powerpool run`: items never in this process
        self._backend_options = backend_options
        self._state = PoolState.OPEN
        # Invariant: _lock guards _state, _backends, _epoch, _futures and _runs.
        self._lock = threading.RLock()
        self._backends: OrderedDict[tuple[str, int], Backend] = OrderedDict()
        self._epoch = 0
        self._futures: set[Future[Any]] = set()
        self._runs: weakref.WeakSet[Run] = weakref.WeakSet()
        self._chunk_ids = itertools.count()
        self._ledger = StatsLedger()
        # Plans by function, so a later submit(fn) runs where auto measured fn
        # should run; weak, so plans don't keep functions (or closures) alive.
        self._plans: weakref.WeakKeyDictionary[Callable[..., Any], Plan] = (
            weakref.WeakKeyDictionary()
        )
        self.last_plan: Plan | None = None
        """The plan ``auto`` follows in the current run, or followed in the most recent
        one, with the workers and chunk sizes used (None before one)."""
        self.steer: Steer | None = None
        """The steer of the running (or most recent) ``auto`` run."""
        self.last_evidence: Evidence | None = None
        """What the workers measured in the most recent ``auto`` run (None before one)."""
        # A pool dropped without shutdown() must not leave workers behind until
        # exit. The finalizer holds the backends, never the pool itself.
        weakref.finalize(self, _release_backends, self._backends)

    # -- lifecycle ----------------------------------------------------------

    @property
    def state(self) -> PoolState:
        """Where the pool is in its lifecycle."""
        return self._state

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is KeyboardInterrupt:
            self.terminate()
        else:
            self.shutdown(wait=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work, then release the workers. Safe to call twice.

        ``wait`` waits for submitted futures. A map or imap already running
        (in another thread, or a generator not yet exhausted) is allowed to
        finish: the workers are released when the last one ends.
        """
        with self._lock:
            if self._state is PoolState.CLOSED:
                return
            self._state = PoolState.CLOSING
            futures = list(self._futures)
        if cancel_futures:
            for future in futures:
                future.cancel()
        if wait:
            for future in futures:
                if not future.cancelled():
                    with contextlib.suppress(CancelledError):  # cancelled while we waited
                        future.exception()
        self._write_futures_report()
        with self._lock:
            if self._runs:
                return  # the last run to end closes the backends (see _blocks)
            backends = self._close_locked()
        for backend in backends:
            backend.shutdown(wait=wait)

    def _write_futures_report(self) -> None:
        """Pool(report=...): futures have no end of their own; their report is written here."""
        if not self._futures_recorded or self._recorder is None:
            return
        self._futures_recorded = False
        self.last_report = self._recorder.snapshot()
        if self._report and not isinstance(self._report, bool):
            self.last_report.write(self._report)

    def _close_locked(self) -> list[Backend]:
        """Mark the pool closed and hand back its backends to shut down. Call under _lock."""
        backends = list(self._backends.values())
        self._backends.clear()
        self._state = PoolState.CLOSED
        return backends

    def terminate(self) -> None:
        """Stop at once: cancel everything, kill worker processes, don't wait for threads."""
        self.cancel()
        with self._lock:
            backends = self._close_locked()
        for backend in backends:
            backend.shutdown(wait=False, kill=True)

    def cancel(self) -> None:
        """Cancel all work submitted so far; the pool stays usable.

        Pending futures are cancelled, running maps raise ``CancelledError``
        in their callers, and running tasks see ``should_stop()`` turn true.
        """
        with self._lock:
            epoch = self._epoch
            self._epoch += 1
            futures = list(self._futures)
            runs = list(self._runs)
            backends = list(self._backends.values())
        for future in futures:
            future.cancel()
        for run in runs:
            run.abort()
        for backend in backends:
            backend.cancel(epoch)

    def idle(self) -> bool:
        """True when no run (map/imap) and no future of this pool is in progress."""
        with self._lock:
            return not self._runs and not self._futures

    def stats(self) -> PoolStats:
        """Counters and busy time since the pool was created."""
        return self._ledger.snapshot()

    def __repr__(self) -> str:
        return f"<powerpool.Pool backend={self._backend_name!r} state={self._state.value}>"

    # -- work -----------------------------------------------------------------

    @overload
    def submit(  # a coroutine function's future holds what it awaits
        self, fn: Callable[_P, Awaitable[_R]], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Future[_R]: ...
    @overload
    def submit(
        self, fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Future[_R]: ...
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``.

        With ``backend="auto"`` a single call cannot be measured: it runs where
        the last plan for ``fn`` ran, else on threads (asyncio for coroutines).
        """
        _check_callable(fn)
        name: str = self._backend_name
        workers = self._workers
        if name == "auto":
            plan = _lookup(self._plans, fn)
            if plan is not None:
                name, workers = plan.backend, plan.workers
            else:
                name = "asyncio" if is_coroutine_function(fn) else "threads"
        _check_fn_fits(fn, name)
        future: Future[Any] = Future()
        with self._lock:
            self._check_open()
            backend = self._backend(name, workers)
            self._futures.add(future)
            epoch = self._epoch
        self._ledger.begin(backend.name, backend.workers)
        future.add_done_callback(self._future_done)
        item: Item = (0, args, kwargs)
        claim = future.set_running_or_notify_cancel
        self._submit_one(backend, fn, item, future, epoch, Attempts(), claim)
        return future

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], **overrides: Unpack[RunOptionsDict]
    ) -> list[Any]:
        """Like the builtin ``map``, in parallel; returns a list in input order."""
        return list(
            self._iterate(fn, iterables, overrides, ordered=True, with_index=False, eager=True)
        )

    def imap(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], **overrides: Unpack[RunOptionsDict]
    ) -> Iterator[Any]:
        """Lazy ``map``: results in input order, with bounded memory for endless input."""
        return self._iterate(fn, iterables, overrides, ordered=True, with_index=False)

    def imap_unordered(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        with_index: bool = False,
        **overrides: Unpack[RunOptionsDict],
    ) -> Iterator[Any]:
        """Results as they complete; ``with_index=True`` yields ``(input_index, result)``."""
        return self._iterate(fn, iterables, overrides, ordered=False, with_index=with_index)

    async def amap(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], **overrides: Unpack[RunOptionsDict]
    ) -> list[Any]:
        """``map`` from async code: coroutine functions run on the caller's loop
        (see :func:`powerpool.amap`), plain functions on this pool's workers."""
        return [r async for r in self.aimap(fn, *iterables, **overrides)]

    def aimap(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        ordered: bool = True,
        **overrides: Unpack[RunOptionsDict],
    ) -> AsyncIterator[Any]:
        """``imap`` (or ``imap_unordered``) as an async iterator; see :meth:`amap`."""
        from ._aio import pool_aimap

        return pool_aimap(self, fn, iterables, overrides, ordered=ordered, own=False)

    # -- internals ------------------------------------------------------------

    def _recycles(self) -> bool:
        return self._max_tasks_per_child is not None or self._max_worker_memory is not None

    def _check_open(self) -> None:
        if self._state is not PoolState.OPEN:
            raise PoolClosedError(f"this pool is {self._state.value}; create a new one")

    def _backend(self, name: str, workers: int | None) -> Backend:
        """The live backend for (name, workers), started on first use. Call under _lock."""
        name, workers = nested_backend(name, workers)
        count = workers if workers is not None else default_workers(name)
        key = (name, count)
        backend = self._backends.get(key)
        if backend is not None:
            self._backends.move_to_end(key)
            return backend
        config = BackendConfig(
            workers=count,
            initializer=self._initializer,
            initargs=self._initargs,
            native_threads=self._native_threads,
            start_method=self._start_method,
            max_tasks_per_child=self._max_tasks_per_child,
            max_worker_memory=self._max_worker_memory,
            writable_arguments=self._writable_arguments,
            options=self._backend_options,
        )
        backend = load(name)(config, _route)
        self._backends[key] = backend
        if len(self._backends) > MAX_LIVE_BACKENDS and not self._runs and not self._futures:
            # Only while nothing runs: a live map may be using the oldest one.
            _, oldest = self._backends.popitem(last=False)
            oldest.shutdown(wait=False)
        return backend

    def _future_done(self, future: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)
        self._ledger.end()

    def _pool_recorder(self) -> Recorder:
        """The recorder of everything this pool runs (``Pool(report=...)``), made on first use."""
        with self._lock:
            if self._recorder is None:
                self._recorder = Recorder()
            return self._recorder

    def _submit_one(
        self,
        backend: Backend,
        fn: Callable[..., Any],
        item: Item,
        future: Future[Any],
        epoch: int,
        attempts: Attempts,
        claim: Callable[[], bool],
    ) -> None:
        recorder = self._pool_recorder() if self._report else None

        def on_done(result: ChunkResult) -> None:
            self._ledger.chunk(result.worker, result.busy_s)
            if recorder is not None:  # futures go in the pool's report (written at shutdown)
                self._futures_recorded = True
                recorder.chunk(result, failed_items(result), kind="future")
            ok, value = result.outcomes[0]
            if ok:
                self._ledger.items(done=1)
                future.set_result(value)
                return
            error = attempts.after(value, self._defaults)
            if error is None:
                if not isinstance(value, ItemLost):
                    self._ledger.items(retried=1)
                    if recorder is not None:
                        recorder.event("retry", worker=result.worker, detail=repr(value)[:200])
                again = _not_cancelled(future)
                self._submit_one(backend, fn, item, future, epoch, attempts, again)
                return
            self._ledger.items(failed=1)
            future.set_exception(error)

        chunk = Chunk(
            id=next(self._chunk_ids),
            fn=fn,
            items=[item],
            timeout_s=self._defaults.timeout_s,
            epoch=epoch,
            claim=claim,
            on_done=on_done,
        )
        chunk.recorder = recorder
        backend.submit(chunk)

    def _iterate(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        overrides: RunOptionsDict,
        *,
        ordered: bool,
        with_index: bool,
        eager: bool = False,
    ) -> Iterator[Any]:
        """Validate now (so mistakes raise at the call); run lazily unless ``eager``."""
        options, report, explain = self._checked(fn, iterables, overrides)
        if eager:
            return self._results(
                self._prepare(fn, iterables, options, report, explain), options, ordered, with_index
            )
        return self._lazy(fn, iterables, options, report, explain, ordered, with_index)

    def _checked(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        overrides: RunOptionsDict,
    ) -> tuple[RunOptions, ReportTarget, bool]:
        """A run's options, checked against this pool: (options, report=, explain=)."""
        _check_callable(fn)
        if not iterables:
            raise TypeError("map() needs at least one iterable of inputs")
        report = overrides.pop("report", None)
        check_report(report)
        # explain= is a pool option; pp.map(..., explain=True) passes it per run.
        explain = bool(overrides.pop("explain", self._explain))
        options = run_options(self._defaults, **overrides)
        self._check_open()
        if self._backend_name != "auto":
            _check_fn_fits(fn, self._backend_name)
            _check_timeout(self._backend_name, options)
        return options, report, explain

    def _lazy(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: RunOptions,
        report: ReportTarget,
        explain: bool,
        ordered: bool,
        with_index: bool,
    ) -> Iterator[Any]:
        yield from self._results(
            self._prepare(fn, iterables, options, report, explain), options, ordered, with_index
        )

    def _prepare(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: RunOptions,
        report: ReportTarget = None,
        explain: bool = False,
    ) -> _Prepared:
        """Resolve the backend; for auto, the steer that will choose it as the items run."""
        # One input: its items are the bare arguments (no tuple per item).
        star = len(iterables) > 1
        source: Iterator[Any] = zip(*iterables) if star else iter(iterables[0])
        prepared = _Prepared(
            fn, source, star, _length(iterables), self._backend_name, self._workers
        )
        if report:  # this call's own report
            prepared.recorder = Recorder()
            prepared.report_path = None if isinstance(report, bool) else report
        elif self._report:  # the pool's
            prepared.recorder = self._pool_recorder()
            prepared.report_path = None if isinstance(self._report, bool) else self._report
        if prepared.backend != "auto":
            return prepared
        if is_coroutine_function(fn) or worker_cores() is not None:
            # Coroutines need an event loop, which no worker process runs here;
            # inside a worker process, nested work stays in its share of cores.
            if worker_cores() is not None:
                plan = _nested_plan(_fixed_plan("processes", self._workers, prepared.total, ""))
            else:
                plan = _fixed_plan("asyncio", self._workers, prepared.total, _COROUTINES)
            prepared.backend, prepared.workers = plan.backend, plan.workers
            self.last_plan = prepared.plan = plan
            if explain:
                print(f"powerpool auto: decided\n{plan}", file=sys.stderr, flush=True)
            return prepared
        from ._speculate import Steer

        prepared.steer = Steer(
            fn,
            total=prepared.total,
            cores=usable_cores(),
            workers=self._workers,
            isolate=self._isolation(options),
            explain=explain,
            address=self._backend_options.get("address"),
            backend_for=self._live_backend,
            on_plan=self._set_plan,
        )
        return prepared

    def _isolation(self, options: RunOptions) -> str | None:
        """Why user code must stay in worker processes for this run (None: it need not)."""
        if self._isolate is not None:
            return self._isolate
        if self._initializer is not None:
            return "the pool has an initializer (per-worker state)"
        if self._recycles():
            return "max_tasks_per_child/max_worker_memory replace worker processes"
        faults = []
        if options.timeout_s is not None:
            faults.append("timeout=")
        if options.retries:
            faults.append("retries=")
        if options.errors != "raise":
            faults.append(f"errors={options.errors!r}")
        if faults:
            return f"{', '.join(faults)} asks for isolation, so every item runs in a worker"
        return None

    def _live_backend(self, name: str, workers: int) -> Backend:
        """The steer's way to a backend: the pool's warm one, started on first use."""
        with self._lock:
            self._check_open()
            return self._backend(name, workers)

    def _set_plan(self, plan: Plan) -> None:
        self.last_plan = plan

    def _results(
        self, prepared: _Prepared, options: RunOptions, ordered: bool, with_index: bool
    ) -> Iterator[Any]:
        blocks = self._blocks(prepared, options, ordered, with_index)
        return itertools.chain.from_iterable(blocks)

    def _finish_report(self, prepared: _Prepared) -> None:
        """End the run in its recorder; keep the report and write its file, if any."""
        recorder = prepared.recorder
        if recorder is None:
            return
        recorder.end()
        if getattr(sys, "meta_path", None) is None:
            return  # a lazy run collected at interpreter exit: nothing can be imported now
        self.last_report = recorder.snapshot()
        if prepared.report_path is not None:
            self.last_report.write(prepared.report_path)

    def _blocks(
        self, prepared: _Prepared, options: RunOptions, ordered: bool, with_index: bool
    ) -> Iterator[list[Any]]:
        with self._running(prepared, options, ordered, with_index) as run:
            yield from run

    @contextlib.contextmanager
    def _running(
        self,
        prepared: _Prepared,
        options: RunOptions,
        ordered: bool,
        with_index: bool,
        *,
        backend: Backend | None = None,
        inbox: Any = None,
    ) -> Iterator[Run]:
        """One run's life in this pool, around whoever drives it (``_blocks`` in
        a thread, ``_aio`` on an event loop with its own ``backend`` and ``inbox``)."""
        # Registered in the same critical section that checks the state, so a
        # concurrent shutdown() either refuses this run or waits for its end.
        steer = prepared.steer
        if steer is not None:
            self.steer = steer
        with self._lock:
            self._check_open()
            if steer is None and backend is None:
                backend = self._backend(prepared.backend, prepared.workers)
            run = Run(
                backend=backend,
                fn=prepared.fn,
                source=prepared.source,
                star=prepared.star,
                options=options,
                ordered=ordered,
                with_index=with_index,
                total=prepared.total,
                epoch=self._epoch,
                ledger=self._ledger,
                new_chunk_id=self._chunk_ids.__next__,
                steer=steer,
                recorder=prepared.recorder,
                inbox=inbox,
            )
            self._runs.add(run)
        if prepared.recorder is not None:
            first = run.backends[0]
            prepared.recorder.begin(
                function=_name(prepared.fn),
                backend=first.name,
                workers=first.workers,
                plan=prepared.plan if steer is None else steer.plan,
                start_method=_start_method(first),
            )
        try:
            yield run
        except KeyboardInterrupt:
            # Ctrl-C: a user wants everything to stop now, workers included.
            self.cancel()
            with self._lock:
                for used in run.backends:
                    key = next((k for k, b in self._backends.items() if b is used), None)
                    if key is not None:
                        del self._backends[key]
            for used in run.backends:
                used.shutdown(wait=False, kill=True)
            raise
        finally:
            final = None
            if steer is not None:
                self.last_evidence = steer.evidence()
                final = steer.final_plan()
                if final is not None:
                    self.last_plan = final
                    with contextlib.suppress(TypeError):  # not weak-referenceable
                        self._plans[prepared.fn] = final
            self._ledger.run_done(
                predicted=final.expected_speedup if final is not None else None,
                actual=run.speedup,
                in_caller=steer.in_process_items if steer is not None else 0,
            )
            with self._lock:
                self._runs.discard(run)
                last = self._state is PoolState.CLOSING and not self._runs
                backends = self._close_locked() if last else []
            for backend in backends:  # shutdown() left this to the last run
                backend.shutdown(wait=False)
            self._finish_report(prepared)


@dataclass
class _Prepared:
    """A run whose backend is decided but which has not started."""

    fn: Callable[..., Any]
    """The function to run."""
    source: Iterator[Any]
    """The inputs not consumed yet: argument tuples if ``star``, else single arguments."""
    star: bool
    """Whether ``source`` yields argument tuples (several iterables were given)."""
    total: int | None
    """Number of inputs, when every iterable has a length."""
    backend: str
    """The backend that will run them ("auto": the steer chooses)."""
    workers: int | None
    """Its workers (None: the backend's default)."""
    steer: Steer | None = None
    """For auto: what chooses (and changes) the backend as the items run."""
    plan: Plan | None = None
    """auto's plan for this run (None when the caller chose the backend)."""
    recorder: Recorder | None = None
    """Where this run is recorded, when a report was asked for."""
    report_path: str | os.PathLike[str] | None = None
    """Where the report is written as the run ends (None: only ``last_report``)."""


def _name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


def _start_method(backend: Backend) -> str:
    """The multiprocessing start method of a process backend ("" for the others)."""
    context = getattr(backend, "_context", None)
    return "" if context is None else str(context.get_start_method())


def nested_backend(name: str, workers: int | None) -> tuple[str, int | None]:
    """Where a map started inside a process-backend worker runs (joblib's nested rule).

    A worker may not start processes (multiprocessing refuses: "daemonic
    processes are not allowed to have children"), and the other cores are the
    other workers': the work runs on threads within this worker's share of
    the cores, or in-line when the share is one core. Never more processes
    than cores in total.
    """
    share = worker_cores()
    if share is None or name != "processes":
        return name, workers
    count = min(workers or share, share)
    return ("threads", count) if count > 1 else ("serial", 1)


def _nested_plan(plan: Plan) -> Plan:
    """auto's plan, adjusted and explained for a map inside a worker process."""
    name, workers = nested_backend(plan.backend, plan.workers)
    share = worker_cores()
    why = (
        f"inside a powerpool worker process: nested work stays within this worker's "
        f"share of the cores ({share}), on threads or in-line, never on more processes"
    )
    return dataclasses.replace(
        plan, backend=name, workers=workers or plan.workers, reasons=(*plan.reasons, why)
    )


_NOT_RUN = ("report", "explain")
"""Run options a pool keeps apart from its RunOptions defaults."""

_COROUTINES = "coroutine function: an event loop in this process runs them"


def _fixed_plan(backend: str, workers: int | None, total: int | None, reason: str) -> Plan:
    """auto's plan where nothing is measured to choose from (coroutines, nested work)."""
    from ._plan import Plan

    count = workers or default_workers(backend)
    return Plan(
        backend=backend,
        workers=count,
        chunksize=1,
        expected_speedup=float(min(count, total or count)),
        reasons=(reason,) if reason else (),
        profile=None,
        n_items=total,
        cores=usable_cores(),
    )


def _check_timeout(name: str, options: RunOptions) -> None:
    if options.timeout_s is not None and not load(name).supports_timeout:
        raise ValueError(
            f"backend {name!r} cannot enforce a per-item timeout (it has no way to stop "
            "one late item); use threads, asyncio or processes"
        )


def _release_backends(backends: OrderedDict[tuple[str, int], Backend]) -> None:
    for backend in list(backends.values()):
        backend.shutdown(wait=False)
    backends.clear()


def _route(result: ChunkResult) -> None:
    """The ``deliver`` every backend gets: hand the result to whoever made the chunk."""
    on_done = result.chunk.on_done
    if on_done is not None:
        on_done(result)


def _lookup(plans: weakref.WeakKeyDictionary[Callable[..., Any], Plan], fn: Any) -> Plan | None:
    try:
        return plans.get(fn)
    except TypeError:
        return None


def _not_cancelled(future: Future[Any]) -> Callable[[], bool]:
    return lambda: not future.done()


def _check_callable(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"expected a callable to run, got {type(fn).__name__}: {fn!r}")


def _check_fn_fits(fn: Callable[..., Any], backend: str) -> None:
    is_async = is_coroutine_function(fn)
    if is_async and backend not in _ASYNC_BACKENDS:
        raise TypeError(
            f"{getattr(fn, '__name__', fn)!r} is a coroutine function, but backend "
            f"{backend!r} runs plain functions; use backend='asyncio' (or 'auto'), "
            "or powerpool.amap from async code"
        )
    if not is_async and backend in _ASYNC_BACKENDS:
        raise TypeError(
            f"backend 'asyncio' runs coroutine functions (async def); "
            f"{getattr(fn, '__name__', fn)!r} is a plain function: use backend='threads' "
            "for blocking I/O, or 'auto'"
        )


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """len() of the zipped input when every iterable knows its length."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None

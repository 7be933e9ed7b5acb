"""``Pool``: the one object users hold, whatever backend runs the work.

A pool owns its backends (started lazily, one per backend name and worker
count, so ``auto`` can use threads for one map and processes for the next),
its lifecycle state, the cancel epoch and the statistics ledger. The work of
a single map is done by :class:`~powerpool._run.Run`.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._backends import load
from ._chunk import ChunkResult
from ._errors import PoolClosedError
from ._ledger import StatsLedger
from ._options import (
    BackendName,
    PoolOptions,
    ReportTarget,
    RunOptionsDict,
    check_report,
    run_options,
)
from ._prepare import (
    Prepared,
    check_callable,
    check_fn_fits,
    check_pool_options,
    check_timeout,
    default_workers,
    fn_name,
    input_length,
    is_coroutine_function,
    isolation_reason,
    nested_backend,
    start_method_of,
    unmeasured_auto_plan,
)
from ._run import Run, RunOptions
from ._submit import Submitter
from ._system import usable_cores

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ._backends import Backend
    from ._decide import Evidence
    from ._options import Unpack
    from ._plan import Plan
    from ._recorder import Recorder, RunReport
    from ._speculate import Steer
    from ._stats import PoolStats

__all__ = ["Pool", "PoolState", "ReportTarget"]

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
        self._config, self._defaults = check_pool_options(backend, options)
        self._backend_name = backend
        self._workers = options.get("workers")
        self._explain = options.get("explain", False)
        report = self._report = options.get("report")
        # One recorder for everything the pool runs (report= given here),
        # made when the first run starts (time 0 of its report): its report
        # covers all runs so far and is rewritten as each one ends.
        self._recorder: Recorder | None = None
        self.last_report: RunReport | None = None
        """What the most recent run recorded, when a report was asked for
        (``report=`` here or on the call); renders inline in notebooks."""
        self._isolate: str | None = None  # set by `powerpool run`: items never in this process
        self._state = PoolState.OPEN
        # Invariant: _lock guards _state, _backends, _epoch, _futures and _runs.
        self._lock = threading.RLock()
        self._backends: OrderedDict[tuple[str, int], Backend] = OrderedDict()
        self._epoch = 0
        self._futures: set[Future[Any]] = set()
        self._runs: weakref.WeakSet[Run] = weakref.WeakSet()
        self._chunk_ids = itertools.count()
        self._ledger = StatsLedger()
        self._submitter = Submitter(
            self._ledger,
            self._defaults,
            self._chunk_ids.__next__,
            self._pool_recorder if report else None,
        )
        # Plans by function, so a later submit(fn) runs where auto measured fn
        # should run; weak, so plans don't keep functions (or closures) alive.
        self._plans: weakref.WeakKeyDictionary[Callable[..., Any], Callable[[], Plan | None]] = (
            weakref.WeakKeyDictionary()
        )
        # The last plan, as a function: mid-run and after a run, auto's plan is
        # built when first read (see _decide.Decision).
        self._last_plan: Callable[[], Plan | None] = _no_plan
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
        if not self._submitter.recorded or self._recorder is None:
            return
        self._submitter.recorded = False
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
        check_callable(fn)
        name: str = self._backend_name
        workers = self._workers
        if name == "auto":
            plan = _lookup(self._plans, fn)
            if plan is not None:
                name, workers = plan.backend, plan.workers
            else:
                name = "asyncio" if is_coroutine_function(fn) else "threads"
        check_fn_fits(fn, name)
        future: Future[Any] = Future()
        with self._lock:
            self._check_open()
            backend = self._backend(name, workers)
            self._futures.add(future)
            epoch = self._epoch
        self._ledger.begin(backend.name, backend.workers)
        future.add_done_callback(self._future_done)
        self._submitter.start(backend, fn, args, kwargs, future, epoch)
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
        backend = load(name)(self._config._replace(workers=count), _route)
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
                from ._recorder import Recorder

                self._recorder = Recorder()
            return self._recorder

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
        check_callable(fn)
        if not iterables:
            raise TypeError("map() needs at least one iterable of inputs")
        report = overrides.pop("report", None)
        check_report(report)
        # explain= is a pool option; pp.map(..., explain=True) passes it per run.
        explain = bool(overrides.pop("explain", self._explain))
        options = run_options(self._defaults, **overrides)
        self._check_open()
        if self._backend_name != "auto":
            check_fn_fits(fn, self._backend_name)
            check_timeout(self._backend_name, options)
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
    ) -> Prepared:
        """Resolve the backend; for auto, the steer that will choose it as the items run."""
        # One input: its items are the bare arguments (no tuple per item).
        star = len(iterables) > 1
        source: Iterator[Any] = zip(*iterables) if star else iter(iterables[0])
        prepared = Prepared(
            fn, source, star, input_length(iterables), self._backend_name, self._workers
        )
        if report:  # this call's own report
            from ._recorder import Recorder

            prepared.recorder = Recorder()
            prepared.report_path = None if isinstance(report, bool) else report
        elif self._report:  # the pool's
            prepared.recorder = self._pool_recorder()
            prepared.report_path = None if isinstance(self._report, bool) else self._report
        if prepared.backend != "auto":
            return prepared
        plan = unmeasured_auto_plan(fn, self._workers, prepared.total)
        if plan is not None:
            prepared.backend, prepared.workers = plan.backend, plan.workers
            prepared.plan = plan
            self._last_plan = lambda: plan
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
            address=self._config.options.get("address"),
            backend_for=self._live_backend,
            on_plan=self._set_plan,
        )
        return prepared

    def _isolation(self, options: RunOptions) -> str | None:
        """Why user code must stay in worker processes for this run (None: it need not)."""
        return isolation_reason(options, forced=self._isolate, config=self._config)

    def _live_backend(self, name: str, workers: int) -> Backend:
        """The steer's way to a backend: the pool's warm one, started on first use."""
        with self._lock:
            self._check_open()
            return self._backend(name, workers)

    @property
    def last_plan(self) -> Plan | None:
        """The plan ``auto`` follows in the current run, or followed in the most recent
        one, with the workers and chunk sizes used (None before one)."""
        return self._last_plan()

    def _set_plan(self, plan_now: Callable[[], Plan | None]) -> None:
        self._last_plan = plan_now

    def _results(
        self, prepared: Prepared, options: RunOptions, ordered: bool, with_index: bool
    ) -> Iterator[Any]:
        blocks = self._blocks(prepared, options, ordered, with_index)
        return itertools.chain.from_iterable(blocks)

    def _finish_report(self, prepared: Prepared) -> None:
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
        self, prepared: Prepared, options: RunOptions, ordered: bool, with_index: bool
    ) -> Iterator[list[Any]]:
        with self._running(prepared, options, ordered, with_index) as run:
            yield from run

    @contextlib.contextmanager
    def _running(
        self,
        prepared: Prepared,
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
            if steer is not None:
                steer.begin()  # the report opens with the plan (a cold run decides later)
            first = run.backends[0]
            prepared.recorder.begin(
                function=fn_name(prepared.fn),
                backend=first.name,
                workers=first.workers,
                plan=prepared.plan if steer is None else steer.plan,
                start_method=start_method_of(first),
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
            predicted = None
            if steer is not None:
                self.last_evidence = steer.evidence()
                ran = steer.finish()  # the plan as it ran, built when read
                self._last_plan = ran
                with contextlib.suppress(TypeError):  # not weak-referenceable
                    self._plans[prepared.fn] = ran

                def predicted() -> float | None:
                    plan = ran()
                    return plan.expected_speedup if plan is not None else None

            self._ledger.run_done(
                predicted=predicted,
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


def _release_backends(backends: OrderedDict[tuple[str, int], Backend]) -> None:
    for backend in list(backends.values()):
        backend.shutdown(wait=False)
    backends.clear()


def _route(result: ChunkResult) -> None:
    """The ``deliver`` every backend gets: hand the result to whoever made the chunk."""
    on_done = result.chunk.on_done
    if on_done is not None:
        on_done(result)


def _no_plan() -> Plan | None:
    return None


def _lookup(
    plans: weakref.WeakKeyDictionary[Callable[..., Any], Callable[[], Plan | None]], fn: Any
) -> Plan | None:
    try:
        ran = plans.get(fn)
    except TypeError:
        return None
    return ran() if ran is not None else None

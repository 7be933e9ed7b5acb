"""How one call becomes a run: checks on what was given, and where the run starts.

:class:`~powerpool._pool.Pool` turns each ``map``/``imap``/``amap`` call into
a :class:`Prepared` run, and each ``submit`` into a one-item chunk; what
does not depend on the pool's own state lives here:

* the checks of ``Pool(...)``'s options, done once;
* the checks that make a mistake raise at the call (not a callable, a
  coroutine function on a backend that runs plain ones, a timeout a backend
  cannot enforce);
* the workers a backend gets by default;
* where ``auto`` starts without measuring: coroutines on the asyncio
  backend, nested maps inside a worker process within its share of cores;
* why a run must keep user code in worker processes (isolation).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from ._backends import BackendConfig, load
from ._options import (
    DASK_OPTION_NAMES,
    POOL_OPTION_NAMES,
    RUN_OPTION_NAMES,
    check_backend,
    check_backend_options,
    check_names,
    check_report,
    check_worker_limits,
    run_options,
)
from ._run import RunOptions
from ._system import usable_cores, worker_cores

if TYPE_CHECKING:
    from ._backends import Backend
    from ._plan import Plan
    from ._recorder import Recorder
    from ._speculate import Steer

__all__ = [
    "Prepared",
    "check_callable",
    "check_fn_fits",
    "check_pool_options",
    "check_timeout",
    "default_workers",
    "fn_name",
    "input_length",
    "is_coroutine_function",
    "isolation_reason",
    "nested_backend",
    "start_method_of",
    "unmeasured_auto_plan",
]

ASYNC_BACKENDS = ("asyncio",)
"""Backends that run coroutine functions (and only those)."""


def is_coroutine_function(fn: object) -> bool:
    """True for ``async def`` functions, partials of them and objects with async ``__call__``."""
    while isinstance(fn, partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the bound __call__ itself
    return call is not None and inspect.iscoroutinefunction(call)


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


class Prepared:
    """A run whose backend is decided but which has not started.

    A slotted class, not a dataclass: see "Records" in docs/architecture.md.
    """

    __slots__ = (
        "backend",
        "fn",
        "plan",
        "recorder",
        "report_path",
        "source",
        "star",
        "steer",
        "total",
        "workers",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        source: Iterator[Any],
        star: bool,
        total: int | None,
        backend: str,
        workers: int | None,
    ) -> None:
        self.fn = fn
        """The function to run."""
        self.source = source
        """The inputs not consumed yet: argument tuples if ``star``, else single arguments."""
        self.star = star
        """Whether ``source`` yields argument tuples (several iterables were given)."""
        self.total = total
        """Number of inputs, when every iterable has a length."""
        self.backend = backend
        """The backend that will run them ("auto": the steer chooses)."""
        self.workers = workers
        """Its workers (None: the backend's default)."""
        self.steer: Steer | None = None
        """For auto: what chooses (and changes) the backend as the items run."""
        self.plan: Plan | None = None
        """auto's plan for this run (None when the caller chose the backend)."""
        self.recorder: Recorder | None = None
        """Where this run is recorded, when a report was asked for."""
        self.report_path: str | os.PathLike[str] | None = None
        """Where the report is written as the run ends (None: only ``last_report``)."""


def fn_name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


def start_method_of(backend: Backend) -> str:
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
    import dataclasses  # Plan's module imported it already

    return dataclasses.replace(
        plan, backend=name, workers=workers or plan.workers, reasons=(*plan.reasons, why)
    )


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


def isolation_reason(
    options: RunOptions, *, forced: str | None, config: BackendConfig
) -> str | None:
    """Why user code must stay in worker processes for this run (None: it need not).

    ``forced`` is the pool's own reason (``powerpool run`` sets one); an
    initializer's per-worker state and recycled workers (``config``, the
    pool's) need workers; and
    each fault option asks for a worker to contain the fault.
    """
    if forced is not None:
        return forced
    if config.initializer is not None:
        return "the pool has an initializer (per-worker state)"
    if config.max_tasks_per_child is not None or config.max_worker_memory is not None:
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


def unmeasured_auto_plan(
    fn: Callable[..., Any], workers: int | None, total: int | None
) -> Plan | None:
    """auto's plan where there is nothing to measure or choose (None: measure as usual).

    Coroutines need an event loop, which no worker process runs here; inside
    a worker process, nested work stays in its share of the cores.
    """
    if worker_cores() is not None:
        return _nested_plan(_fixed_plan("processes", workers, total, ""))
    if is_coroutine_function(fn):
        return _fixed_plan("asyncio", workers, total, _COROUTINES)
    return None


def check_timeout(name: str, options: RunOptions) -> None:
    if options.timeout_s is not None and not load(name).supports_timeout:
        raise ValueError(
            f"backend {name!r} cannot enforce a per-item timeout (it has no way to stop "
            "one late item); use threads, asyncio or processes"
        )


def check_callable(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"expected a callable to run, got {type(fn).__name__}: {fn!r}")


def check_fn_fits(fn: Callable[..., Any], backend: str) -> None:
    is_async = is_coroutine_function(fn)
    if is_async and backend not in ASYNC_BACKENDS:
        raise TypeError(
            f"{getattr(fn, '__name__', fn)!r} is a coroutine function, but backend "
            f"{backend!r} runs plain functions; use backend='asyncio' (or 'auto'), "
            "or powerpool.amap from async code"
        )
    if not is_async and backend in ASYNC_BACKENDS:
        raise TypeError(
            f"backend 'asyncio' runs coroutine functions (async def); "
            f"{getattr(fn, '__name__', fn)!r} is a plain function: use backend='threads' "
            "for blocking I/O, or 'auto'"
        )


def input_length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """len() of the zipped input when every iterable knows its length."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


_NOT_RUN = ("report", "explain")
"""Run options a pool keeps apart from its RunOptions defaults."""


def check_pool_options(
    backend: str, options: Mapping[str, Any]
) -> tuple[BackendConfig, RunOptions]:
    """Check ``Pool(backend, **options)`` once; return what every backend it starts
    gets (``workers`` set per backend) and the defaults of its runs."""
    check_backend(backend)
    check_names(options, POOL_OPTION_NAMES)
    workers = options.get("workers")
    initializer = options.get("initializer")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable, got {initializer!r}")
    backend_options: dict[str, Any] = {k: v for k, v in options.items() if k in DASK_OPTION_NAMES}
    if backend_options:
        check_backend_options(backend, backend_options)
    check_worker_limits(
        backend,
        options.get("max_tasks_per_child"),
        options.get("max_worker_memory"),
        backend_options,
    )
    check_report(options.get("report"))
    run = {k: v for k, v in options.items() if k in RUN_OPTION_NAMES and k not in _NOT_RUN}
    defaults = run_options(RunOptions(progress="auto"), **run)
    if backend != "auto":
        # Say so now: submit() never reaches the per-run check.
        check_timeout(backend, defaults)
    config = BackendConfig(
        workers=0,
        initializer=initializer,
        initargs=tuple(options.get("initargs", ())),
        native_threads=options.get("native_threads"),
        start_method=options.get("start_method"),
        max_tasks_per_child=options.get("max_tasks_per_child"),
        max_worker_memory=options.get("max_worker_memory"),
        writable_arguments=bool(options.get("writable_arguments", False)),
        options=backend_options,
    )
    return config, defaults

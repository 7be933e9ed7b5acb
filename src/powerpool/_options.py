"""Every option a user can pass, written once: its name, its type, its meaning.

The public functions take options as keyword-only parameters typed by the
``TypedDict`` records below (PEP 692's ``**options: Unpack[...]``), so a
type checker flags ``chunk_size=3``, ``retires=2`` or ``backend="procesess"``
before anything runs, and editors complete the names. The same records give
the names the run-time checks use (for callers without a type checker), so
adding an option means adding one line here.

Which record a function takes::

    Pool(...), Executor(...)            PoolOptions = MapOptions
    pp.map/imap/imap_unordered, amap    MapOptions  = RunOptionsDict + WorkerOptions
                                                      + DaskOptions
    Pool.map/imap/imap_unordered        RunOptionsDict (per-run overrides)

Values are checked here too (:func:`run_options` for the run options,
:func:`check_worker_limits`, :func:`check_report`), except the dask
options' combinations, which the dask backend checks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypedDict, cast, get_args

from ._progress import ProgressMode
from ._run import ErrorPolicy, RunOptions

if TYPE_CHECKING:  # for ``**options: Unpack[PoolOptions]`` in the modules that take them
    if sys.version_info >= (3, 11):
        from typing import Unpack as Unpack  # noqa: PLC0414 (mypy: an explicit re-export)
    else:
        from typing_extensions import Unpack as Unpack  # noqa: PLC0414

__all__ = [
    "BACKEND_NAMES",
    "DASK_OPTION_NAMES",
    "ERROR_POLICIES",
    "MAP_OPTION_NAMES",
    "POOL_OPTION_NAMES",
    "RUN_OPTION_NAMES",
    "WORKER_BACKEND_NAMES",
    "BackendName",
    "DaskOptions",
    "MapOptions",
    "PoolOptions",
    "ReportTarget",
    "RunOptionsDict",
    "backend_name",
    "check_backend_options",
    "check_report",
    "check_worker_limits",
    "run_options",
    "WorkerBackendName",
    "WorkerOptions",
    "check_backend",
    "check_names",
]

WorkerBackendName = Literal["serial", "threads", "asyncio", "processes", "dask"]
"""A backend that runs work itself (each has a module under ``_backends``)."""

BackendName = Literal["auto", WorkerBackendName]
"""What ``backend=`` takes: a worker backend, or ``"auto"`` (measure, then pick)."""

WORKER_BACKEND_NAMES: tuple[WorkerBackendName, ...] = get_args(WorkerBackendName)
BACKEND_NAMES: tuple[BackendName, ...] = get_args(BackendName)  # nested Literals flatten
ERROR_POLICIES: tuple[ErrorPolicy, ...] = get_args(ErrorPolicy)

ReportTarget: TypeAlias = "str | os.PathLike[str] | bool | None"
"""What ``report=`` takes: a path (.html or .json), True (keep it in
``pool.last_report`` only), or None/False (record nothing)."""


class RunOptionsDict(TypedDict, total=False):
    """Options of one run: a pool's defaults, overridable per ``map``/``imap`` call."""

    chunksize: int | None
    """Items per chunk; None adapts it from the measured time per item."""
    timeout: float | None
    """Seconds one item may run; a late item fails with ``ItemTimeoutError``."""
    retries: int
    """How many times a failed item is run again."""
    retry_on: type[BaseException] | tuple[type[BaseException], ...]
    """Exception types that are retried (worker crashes and timeouts always are)."""
    errors: ErrorPolicy
    """What a failed item does: ``"raise"``, ``"return"`` the exception, or ``"skip"``."""
    progress: ProgressMode
    """A progress bar: True, False, or ``"auto"`` (on a terminal, after 2 s)."""
    report: ReportTarget
    """Record the run: a path (.html or .json), True (``pool.last_report`` only), or None."""
    explain: bool
    """Print auto's plan to stderr when it is decided, at each switch, and what ran."""
    max_inflight_bytes: int | None
    """Bytes of results in flight or waiting for an earlier one; chunks shrink to fit
    (default 64 MB; at least one item per worker always runs)."""


class WorkerOptions(TypedDict, total=False):
    """Options that shape a pool's workers (fixed for the pool's life)."""

    workers: int | None
    """How many workers; None: the backend's default (the usable cores for processes)."""
    initializer: Callable[..., Any] | None
    """Called once in each worker before its first item (load a model, open a file)."""
    initargs: Iterable[Any]
    """Arguments for ``initializer``."""
    native_threads: int | None
    """Threads each worker's native libraries (BLAS, OpenMP) may use; None: cores / workers."""
    start_method: str | None
    """``multiprocessing`` start method for worker processes; None: powerpool's choice."""
    max_tasks_per_child: int | None
    """Items a worker process runs before a fresh one replaces it; None: no limit."""
    max_worker_memory: int | None
    """RSS in bytes a worker process must not pass: it is replaced after the item that
    reached the limit, or would pass it on its next item (dask: its ``memory_limit``)."""
    writable_arguments: bool
    """Large array arguments arrive copy-on-write instead of read-only (processes)."""


class DaskOptions(TypedDict, total=False):
    """Where ``backend="dask"`` runs (auto hands them on if it picks dask)."""

    address: str | None
    """A running scheduler's address, ``"tcp://host:8786"``."""
    scheduler_file: str | os.PathLike[str] | None
    """A scheduler file written by ``dask scheduler --scheduler-file``."""
    client: Any
    """A ``distributed.Client`` to use as it is."""
    security: Any
    """A ``distributed.Security`` (TLS) for the new client."""
    cluster_kwargs: Mapping[str, Any] | None
    """Keyword arguments for the ``LocalCluster`` powerpool starts when given no address."""


class MapOptions(RunOptionsDict, WorkerOptions, DaskOptions, total=False):
    """Options of the module-level ``map``/``imap``/``imap_unordered``/``amap``/``aimap``."""


class PoolOptions(MapOptions, total=False):
    """Options of ``Pool(...)`` and ``Executor(...)`` (the same as ``pp.map``'s)."""


def _names(record: type) -> frozenset[str]:
    keys: frozenset[str] = record.__required_keys__ | record.__optional_keys__  # type: ignore[attr-defined]
    return keys


RUN_OPTION_NAMES = _names(RunOptionsDict)
"""Options a single run may override (the rest shape a pool's workers)."""
DASK_OPTION_NAMES = _names(DaskOptions)
"""Options only the dask backend reads."""
MAP_OPTION_NAMES = _names(MapOptions)
POOL_OPTION_NAMES = _names(PoolOptions)


def check_names(options: Mapping[str, object], allowed: frozenset[str], where: str = "") -> None:
    """Reject unknown keyword options, for callers a type checker did not see.

    A misspelt option (``retires=3``) must never be ignored silently; the
    error is a ``TypeError``, as Python's own for an unexpected keyword.
    """
    unknown = sorted(set(options) - allowed)
    if unknown:
        suffix = f" for {where}" if where else ""
        raise TypeError(f"unexpected option(s){suffix}: {', '.join(unknown)}")


def check_backend(name: object) -> None:
    """``backend=`` must name a backend (the run-time twin of :data:`BackendName`)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}")


def backend_name(name: str) -> BackendName:
    """A checked :data:`BackendName` from a plain string (the command line's, a benchmark's)."""
    check_backend(name)
    return cast("BackendName", name)


def run_options(base: RunOptions, **overrides: Any) -> RunOptions:
    """Merge keyword overrides (user-facing names) into ``base``, validating each."""
    check_names(overrides, RUN_OPTION_NAMES)
    chunksize = overrides.get("chunksize", base.chunksize)
    timeout = overrides.get("timeout", base.timeout_s)
    retries = overrides.get("retries", base.retries)
    retry_on = overrides.get("retry_on", base.retry_on)
    errors = overrides.get("errors", base.errors)
    progress = overrides.get("progress", base.progress)
    inflight = overrides.get("max_inflight_bytes")
    if inflight is None:
        inflight = base.max_inflight_bytes
    if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"chunksize must be a positive integer, got {chunksize!r}")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    if isinstance(retry_on, type):
        retry_on = (retry_on,)
    if not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
        raise TypeError(f"retry_on must be exception types, got {retry_on!r}")
    if errors not in ERROR_POLICIES:
        raise ValueError(f"errors must be one of {ERROR_POLICIES}, got {errors!r}")
    if progress not in (True, False, "auto"):
        raise ValueError(f"progress must be True, False or 'auto', got {progress!r}")
    if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight < 1:
        raise ValueError(f"max_inflight_bytes must be a positive integer, got {inflight!r}")
    return RunOptions(
        chunksize=chunksize,
        timeout_s=None if timeout is None else float(timeout),
        retries=retries,
        retry_on=tuple(retry_on),
        errors=errors,
        progress=progress,
        max_inflight_bytes=inflight,
    )


def check_report(report: object) -> None:
    """``report=`` must be a path (.html or .json) in an existing folder, True or None."""
    if report is None or isinstance(report, bool):
        return
    if not isinstance(report, (str, os.PathLike)):
        raise TypeError(f"report must be a path, True or None, got {report!r}")
    from ._recorder import report_format  # only runs asking for a report load the recorder

    report_format(os.fspath(report))
    folder = os.path.dirname(os.path.abspath(os.fspath(report)))
    if not os.path.isdir(folder):
        raise ValueError(f"report={os.fspath(report)!r}: folder {folder!r} does not exist")


def check_backend_options(backend: str, options: dict[str, Any]) -> None:
    """Only dask reads the dask options (auto hands them on if it picks dask);
    given to another backend they would be ignored, which must not pass silently."""
    if backend not in ("dask", "auto"):
        raise TypeError(
            f"unexpected option(s) for backend {backend!r}: {', '.join(sorted(options))}"
        )


RECYCLING_BACKENDS = ("auto", "processes", "dask")
"""Backends with worker processes to replace (max_tasks_per_child, max_worker_memory)."""


def check_worker_limits(
    backend: str,
    max_tasks_per_child: int | None,
    max_worker_memory: int | None,
    backend_options: dict[str, Any],
) -> None:
    """Worker recycling needs worker processes: say so at once, not mid-run."""
    for name, value in (
        ("max_tasks_per_child", max_tasks_per_child),
        ("max_worker_memory", max_worker_memory),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if backend not in RECYCLING_BACKENDS:
            raise ValueError(
                f"{name} replaces worker processes; backend {backend!r} has none "
                "(use 'processes', 'dask' or 'auto')"
            )
    if backend == "dask":
        from ._backends._dask_cluster import check_worker_limits

        check_worker_limits(max_tasks_per_child, max_worker_memory, backend_options)

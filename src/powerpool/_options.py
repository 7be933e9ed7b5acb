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

Values are checked where they are used (``_pool._run_options`` for the run
options, ``Pool.__init__`` for the workers', the dask backend for its own).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypedDict, cast, get_args

from ._progress import ProgressMode
from ._run import ErrorPolicy

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

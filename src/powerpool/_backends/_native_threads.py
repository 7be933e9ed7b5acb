"""The one limiter of native thread pools (BLAS, OpenMP) in workers.

``workers`` processes each running numpy with one BLAS thread per core
oversubscribe the machine ``workers`` times over, so every worker caps its
native pools at its share of the cores (``native_threads``). One rule,
two kinds of process:

* a powerpool worker process runs nothing but our items: the cap is set
  once, for the life of the process, in the environment variables the
  libraries read when they load (so a library the function imports later
  starts within it) and in the pools of the libraries already loaded;
* a Dask worker is shared with other tasks and clients: its environment is
  left alone (dask's nannies start workers with one thread per pool), the
  loaded pools are capped around each chunk and restored after it.

Resizing loaded pools goes through threadpoolctl, whose scan of the loaded
libraries costs 50-150 ms (a loaded 2-core machine, numpy loaded): the
scanner is kept and reused while the set of native-library modules loaded
stays the same, and the process engine builds it in the parent before
forking (:func:`prepare`), so forked workers only set the counts: OpenBLAS's
by its variable where the library exports it (:func:`_set_openblas_count`),
and the caller's own pools are then never touched; where it does not, the
caller caps that pool while it forks (:func:`capped_for_fork`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = [
    "NATIVE_LIBRARY_MODULES",
    "NATIVE_THREAD_VARS",
    "capped_for_fork",
    "limit_native_threads",
    "prepare",
]

NATIVE_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)
"""Environment variables native libraries read for their thread-pool size."""

NATIVE_LIBRARY_MODULES = ("numpy", "scipy", "torch", "sklearn")
"""Modules that load BLAS/OpenMP thread pools a worker must resize. Until one
of them is imported, nothing is scanned (threadpoolctl is not even imported)."""

_scanner: Any = None
"""A ``threadpoolctl.ThreadpoolController`` for the libraries loaded when it
was built, or None; replaced when ``_scanned_for`` no longer matches."""
_scanned_for: tuple[str, ...] = ()


def _loaded() -> tuple[str, ...]:
    return tuple(name for name in NATIVE_LIBRARY_MODULES if name in sys.modules)


def prepare() -> None:
    """Build the scanner now (the process engine's parent, before forking workers)."""
    global _scanner, _scanned_for
    key = _loaded()
    if not key or key == _scanned_for:
        return
    try:
        from threadpoolctl import ThreadpoolController

        _scanner, _scanned_for = ThreadpoolController(), key
    except Exception:  # threadpoolctl missing or a library it cannot read
        _scanner, _scanned_for = None, ()


_forked_capped: tuple[str, ...] = ()
"""Files of the libraries this process's parent capped while it forked it (see
:func:`capped_for_fork`), at ``_forked_with`` threads."""
_forked_with: int | None = None


@contextlib.contextmanager
def capped_for_fork(threads: int) -> Iterator[None]:
    """Around forking workers: the pools a worker could resize only by re-creating
    them are capped here at ``threads``, then restored; the workers inherit the cap.

    That is a pthreads OpenBLAS that does not export its count variable (numpy
    2.5's does not; see :func:`_set_openblas_count` for the others). Resized
    in a fresh fork through its API, it re-creates its whole pool, whose
    threads spin ~0.1 s: in every worker (up to 15 threads each on 16 cores).
    The restore here re-creates this process's pool the same way (the fork
    shut it down), so the spin is paid once per cold start instead (~110 ms
    of CPU on 2 cores).
    """
    global _forked_capped, _forked_with
    ready = _scanner is not None and _loaded() == _scanned_for
    libraries = [lib for lib in _scanner.lib_controllers if _respawns(lib)] if ready else []
    saved: list[tuple[Any, int]] = []
    try:
        for library in libraries:
            saved.append((library, library.get_num_threads()))
            library.set_num_threads(threads)
    except Exception:  # a library that will not be resized here: workers try themselves
        libraries = []
    if libraries:
        _forked_capped, _forked_with = tuple(lib.filepath for lib in libraries), threads
    try:
        yield
    finally:
        _forked_capped, _forked_with = (), None
        for library, count in saved:
            with contextlib.suppress(Exception):
                library.set_num_threads(count)


def limit_native_threads(
    threads: int, *, own_process: bool
) -> contextlib.AbstractContextManager[object]:
    """Cap native thread pools at ``threads``; leaving the returned context restores them.

    ``own_process``: a powerpool worker process, capped for good (the
    environment too; callers need not leave the context). Otherwise only the
    pools loaded so far are capped, until the context is left.
    """
    if own_process:
        for name in NATIVE_THREAD_VARS:
            os.environ[name] = str(threads)
    if not _loaded():
        return contextlib.nullcontext()
    if _loaded() != _scanned_for:
        prepare()
    if _scanner is None:  # threadpoolctl could not read them: the environment is all we did
        return contextlib.nullcontext()
    if own_process:
        for library in _scanner.lib_controllers:
            if _forked_with == threads and library.filepath in _forked_capped:
                continue  # forked with the parent's pool capped (capped_for_fork)
            if not _set_openblas_count(library, threads):
                library.set_num_threads(threads)
        return contextlib.nullcontext()
    limiter: contextlib.AbstractContextManager[object] = _scanner.limit(limits=threads)
    return limiter


def _pthreads_openblas(library: Any) -> bool:
    return (
        getattr(library, "internal_api", None) == "openblas"
        and getattr(library, "threading_layer", None) == "pthreads"
    )


def _count_variable(library: Any) -> ctypes.c_int | None:
    """A pthreads OpenBLAS's ``blas_cpu_number``, where the library exports it and
    it reads back what the API reports; None otherwise."""
    if not _pthreads_openblas(library):
        return None
    try:
        count = ctypes.c_int.in_dll(library.dynlib, "blas_cpu_number")
        if count.value != library.get_num_threads():
            return None
    except (AttributeError, ValueError, OSError):
        return None
    return count


def _respawns(library: Any) -> bool:
    """Whether a forked worker could resize ``library`` only by re-creating its pool."""
    return _pthreads_openblas(library) and _count_variable(library) is None


def _set_openblas_count(library: Any, threads: int) -> bool:
    """Set a pthreads OpenBLAS's thread count by its variable; False where that cannot be done.

    Why not its API: a fork leaves OpenBLAS's thread pool shut down (its
    atfork handler), and ``openblas_set_num_threads`` first re-creates the
    whole pool, one thread per core, whose threads then spin for ~0.1 s
    before they sleep: 15 threads per worker on 16 cores, ~110 ms of CPU per
    worker measured on 2 cores, taken from the items and counted as theirs
    (it made 20 ms sleeps look CPU-bound to auto). Capping the parent's pool
    around the fork instead moves the same spin into the caller, on every
    cold start (~130 ms of CPU on 2 cores, measured): what
    :func:`capped_for_fork` still does where the variable is not exported.
    Writing ``blas_cpu_number``, the count OpenBLAS reads before each call,
    starts no thread: at one thread no pool is ever made; at more, the first
    threaded call makes it, as in any fresh process.
    """
    count = _count_variable(library)
    if count is None:
        return False
    count.value = threads
    return bool(library.get_num_threads() == threads)

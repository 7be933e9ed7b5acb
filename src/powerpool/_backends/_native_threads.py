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
forking (:func:`prepare`), so forked workers only set the counts (OpenBLAS's
by its variable: see :func:`_set_openblas_count`). The caller's own pools
are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from typing import Any

__all__ = [
    "NATIVE_LIBRARY_MODULES",
    "NATIVE_THREAD_VARS",
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
            if not _set_openblas_count(library, threads):
                library.set_num_threads(threads)
        return contextlib.nullcontext()
    limiter: contextlib.AbstractContextManager[object] = _scanner.limit(limits=threads)
    return limiter


def _set_openblas_count(library: Any, threads: int) -> bool:
    """Set a pthreads OpenBLAS's thread count by its variable; False where that cannot be done.

    Why not its API: a fork leaves OpenBLAS's thread pool shut down (its
    atfork handler), and ``openblas_set_num_threads`` first re-creates the
    whole pool, one thread per core, whose threads then spin for ~0.1 s
    before they sleep: 15 threads per worker on 16 cores, ~110 ms of CPU per
    worker measured on 2 cores, taken from the items and counted as theirs
    (it made 20 ms sleeps look CPU-bound to auto). Capping the parent's pool
    around the fork instead moved the same spin into the caller, on every
    cold start (~130 ms of CPU on 2 cores, measured). Writing
    ``blas_cpu_number``, the count OpenBLAS reads before each call, starts
    no thread: at one thread no pool is ever made; at more, the first
    threaded call makes it, as in any fresh process. Only for the pthreads
    build, and only where the variable reads back what the API reports.
    """
    if getattr(library, "internal_api", None) != "openblas":
        return False
    if getattr(library, "threading_layer", None) != "pthreads":
        return False
    try:
        count = ctypes.c_int.in_dll(library.dynlib, "blas_cpu_number")
        if count.value != library.get_num_threads():
            return False
        count.value = threads
    except (AttributeError, ValueError, OSError):
        return False
    return bool(library.get_num_threads() == threads)

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
forking (:func:`prepare`), so forked workers only call the libraries'
set-threads functions.
"""

from __future__ import annotations

import contextlib
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


_forked_with: int | None = None
"""The cap the parent had set on its own pools while it forked this process
(see :func:`capped_for_fork`), or None."""


@contextlib.contextmanager
def capped_for_fork(threads: int) -> Iterator[None]:
    """Around forking workers: this process's pools capped at ``threads``, then restored.

    Workers forked meanwhile inherit the capped pools and leave them alone.
    Resizing OpenBLAS in a fresh fork instead re-creates its thread pool,
    whose threads then spin for ~0.1 s: CPU taken from the first items of
    every cold start (15 spinning threads per worker on 16 cores), and, in
    a worker measuring its process's CPU, counted as the items' (4-19 ms
    per 20 ms sleep, which made waiting work look CPU-bound to auto).
    """
    global _forked_with
    if _scanner is None or _loaded() != _scanned_for:
        yield
        return
    try:
        limiter = _scanner.limit(limits=threads)
    except Exception:  # a library that cannot be resized here: workers try themselves
        yield
        return
    _forked_with = threads
    try:
        yield
    finally:
        _forked_with = None
        with contextlib.suppress(Exception):
            limiter.restore_original_limits()


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
    if own_process and _forked_with == threads and _loaded() == _scanned_for:
        return contextlib.nullcontext()  # forked with the parent's pools capped (capped_for_fork)
    if _loaded() != _scanned_for:
        prepare()
    if _scanner is None:  # threadpoolctl could not read them: the environment is all we did
        return contextlib.nullcontext()
    limiter: contextlib.AbstractContextManager[object] = _scanner.limit(limits=threads)
    return limiter

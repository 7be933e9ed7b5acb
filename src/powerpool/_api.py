"""Module-level ``map``/``imap``/``imap_unordered`` over warm, shared pools.

The second ``powerpool.map`` must not pay start-up again, so pools created
here are kept (keyed by the options that shape their workers) and reused,
and all of them are shut down at interpreter exit.
"""

from __future__ import annotations

import atexit
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from ._pool import Pool

__all__ = ["imap", "imap_unordered", "map", "shutdown_warm_pools"]

_POOL_OPTIONS = ("workers", "initializer", "initargs", "native_threads", "start_method")
_RUN_OPTIONS = ("chunksize", "timeout", "retries", "retry_on", "errors", "progress")

MAX_WARM_POOLS = 4
"""Warm pools kept at once; the least recently used is shut down beyond it
(each may hold worker processes and the memory their initializers loaded)."""

_lock = threading.Lock()
_warm: OrderedDict[Hashable, Pool] = OrderedDict()


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    run = {k: options.pop(k) for k in _RUN_OPTIONS if k in options}
    return options, run


def _warm_pool(backend: str, pool_options: dict[str, Any]) -> tuple[Pool, bool]:
    """The shared pool for these options, and whether it is shared (kept warm).

    Options that cannot be hashed (a client object, a dict of cluster
    settings) get a pool of their own, which the caller must shut down.
    """
    try:
        key: Hashable = (backend, tuple(sorted(pool_options.items())))
        hash(key)
    except TypeError:
        return Pool(backend, progress=False, **pool_options), False
    with _lock:
        pool = _warm.get(key)
        if pool is not None and pool.state.value == "open":
            _warm.move_to_end(key)
            return pool, True
        pool = Pool(backend, progress=False, **pool_options)
        _warm[key] = pool
        if len(_warm) > MAX_WARM_POOLS:
            # Evict the least recently used pool that is idle: one with a live
            # imap or pending futures stays (over the limit) until it is done.
            idle = next((k for k, p in _warm.items() if p is not pool and p.idle()), None)
            if idle is not None:
                _warm.pop(idle).shutdown(wait=False)
        return pool, True


def _closing(pool: Pool, results: Iterator[Any]) -> Iterator[Any]:
    """Iterate ``results``, then shut down the private ``pool`` they come from."""
    try:
        yield from results
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def map(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    backend: str = "auto",
    explain: bool = False,
    **options: Any,
) -> list[Any]:
    """Apply ``fn`` to every input, as fast as this machine allows; a list in input order.

    >>> import powerpool
    >>> powerpool.map(abs, [-1, -2, 3])
    [1, 2, 3]
    """
    pool_options, run_options = _split(options)
    pool, shared = _warm_pool(backend, pool_options)
    try:
        result = pool.map(fn, *iterables, **run_options)
    finally:
        if not shared:
            pool.shutdown()
    if explain and pool.last_plan is not None:
        print(pool.last_plan)
    return result


def imap(
    fn: Callable[..., Any], *iterables: Iterable[Any], backend: str = "auto", **options: Any
) -> Iterator[Any]:
    """Lazy :func:`map`: results in input order, bounded memory for endless input."""
    pool_options, run_options = _split(options)
    pool, shared = _warm_pool(backend, pool_options)
    results = pool.imap(fn, *iterables, **run_options)
    return results if shared else _closing(pool, results)


def imap_unordered(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    backend: str = "auto",
    with_index: bool = False,
    **options: Any,
) -> Iterator[Any]:
    """Results as they complete; ``with_index=True`` yields ``(input_index, result)``."""
    pool_options, run_options = _split(options)
    pool, shared = _warm_pool(backend, pool_options)
    results = pool.imap_unordered(fn, *iterables, with_index=with_index, **run_options)
    return results if shared else _closing(pool, results)


def shutdown_warm_pools() -> None:
    """Shut down the pools kept warm by the module-level functions (runs at exit too)."""
    with _lock:
        pools = list(_warm.values())
        _warm.clear()
    for pool in pools:
        pool.shutdown(wait=True)


atexit.register(shutdown_warm_pools)

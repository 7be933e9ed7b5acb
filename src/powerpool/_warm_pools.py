"""Module-level ``map``/``imap``/``imap_unordered`` over warm, shared pools.

The second ``powerpool.map`` must not pay start-up again, so pools created
here are kept (keyed by the options that shape their workers) and reused,
and all of them are shut down at interpreter exit.
"""

from __future__ import annotations

import atexit
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._options import (
    MAP_OPTION_NAMES,
    RUN_OPTION_NAMES,
    BackendName,
    MapOptions,
    check_backend,
    check_names,
)
from ._pool import Pool

if TYPE_CHECKING:
    from ._options import Unpack

__all__ = ["imap", "imap_unordered", "map", "shutdown_warm_pools"]

MAX_WARM_POOLS = 4
"""Warm pools kept at once; the least recently used is shut down beyond it
(each may hold worker processes and the memory their initializers loaded)."""

_lock = threading.Lock()
_warm: OrderedDict[Hashable, Pool] = OrderedDict()
_leases: Counter[Pool] = Counter()  # callers holding each warm pool right now


def _split(backend: str, options: MapOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the options, then split them: (the pool's, the run's)."""
    check_backend(backend)
    check_names(options, MAP_OPTION_NAMES)
    pool: dict[str, Any] = {k: v for k, v in options.items() if k not in RUN_OPTION_NAMES}
    run: dict[str, Any] = {k: v for k, v in options.items() if k in RUN_OPTION_NAMES}
    return pool, run


def _lease(backend: BackendName, pool_options: dict[str, Any]) -> tuple[Pool, bool]:
    """A pool for these options, leased to the caller, and whether it is shared.

    Shared pools stay warm for the next call; a leased one is never evicted
    (a lazy imap may not have started yet). Options that cannot be hashed
    (a client object, a dict of cluster settings) get a private pool, shut
    down when the caller is done. Pair every call with :func:`_release`.
    """
    try:
        key: Hashable = (backend, tuple(sorted(pool_options.items())))
        hash(key)
    except TypeError:
        return Pool(backend, progress=False, **pool_options), False
    with _lock:
        pool = _warm.get(key)
        if pool is None or pool.state.value != "open":
            pool = Pool(backend, progress=False, **pool_options)
            _warm[key] = pool
        _warm.move_to_end(key)
        _leases[pool] += 1
        if len(_warm) > MAX_WARM_POOLS:
            # Evict the least recently used pool nobody holds; if all are
            # held, stay over the limit until one is released.
            spare = next((k for k, p in _warm.items() if not _leases[p] and p.idle()), None)
            if spare is not None:
                _warm.pop(spare).shutdown(wait=False)
        return pool, True


def _release(pool: Pool, shared: bool) -> None:
    if not shared:
        pool.shutdown(wait=False, cancel_futures=True)
        return
    with _lock:
        _leases[pool] -= 1
        if not _leases[pool]:
            del _leases[pool]


def _leased(pool: Pool, shared: bool, results: Iterator[Any]) -> Iterator[Any]:
    """Iterate ``results``, then give the pool they come from back."""
    try:
        yield from results
    finally:
        _release(pool, shared)


def map(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    backend: BackendName = "auto",
    **options: Unpack[MapOptions],
) -> list[Any]:
    """Apply ``fn`` to every input, as fast as this machine allows; a list in input order.

    ``explain=True`` prints auto's plan to stderr when it is decided, at each
    switch, and what ran.

    >>> import powerpool
    >>> powerpool.map(abs, [-1, -2, 3])
    [1, 2, 3]
    """
    pool_options, run_options = _split(backend, options)  # explain= is a run option
    pool, shared = _lease(backend, pool_options)
    try:
        return pool.map(fn, *iterables, **run_options)
    finally:
        _release(pool, shared)


def imap(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    backend: BackendName = "auto",
    **options: Unpack[MapOptions],
) -> Iterator[Any]:
    """Lazy :func:`map`: results in input order, bounded memory for endless input."""
    pool_options, run_options = _split(backend, options)
    pool, shared = _lease(backend, pool_options)
    try:
        results = pool.imap(fn, *iterables, **run_options)
    except BaseException:
        _release(pool, shared)
        raise
    return _leased(pool, shared, results)


def imap_unordered(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    backend: BackendName = "auto",
    with_index: bool = False,
    **options: Unpack[MapOptions],
) -> Iterator[Any]:
    """Results as they complete; ``with_index=True`` yields ``(input_index, result)``."""
    pool_options, run_options = _split(backend, options)
    pool, shared = _lease(backend, pool_options)
    try:
        results = pool.imap_unordered(fn, *iterables, with_index=with_index, **run_options)
    except BaseException:
        _release(pool, shared)
        raise
    return _leased(pool, shared, results)


def shutdown_warm_pools() -> None:
    """Shut down the pools kept warm by the module-level functions (runs at exit too)."""
    with _lock:
        pools = list(_warm.values())
        _warm.clear()
    for pool in pools:
        pool.shutdown(wait=True)


atexit.register(shutdown_warm_pools)

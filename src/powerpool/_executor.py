"""``Executor``: powerpool behind the standard ``concurrent.futures`` interface.

Code written for ``ThreadPoolExecutor``/``ProcessPoolExecutor`` (``submit``,
``map``, ``shutdown``, ``as_completed``, ``wait``, ``asyncio.wrap_future``)
works unchanged, with powerpool's backends, crash handling and retries.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from ._pool import Pool
from ._stats import PoolStats

__all__ = ["Executor"]


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` backed by a :class:`Pool`.

    ``max_workers`` is accepted for drop-in compatibility (same as ``workers``).
    ``map`` keeps the standard semantics (eager submission, ``timeout``); use
    :meth:`Pool.map` for chunked, adaptive throughput.
    """

    def __init__(
        self, max_workers: int | None = None, *, backend: str = "auto", **options: Any
    ) -> None:
        if max_workers is not None:
            options.setdefault("workers", max_workers)
        options.setdefault("progress", False)
        self._pool = Pool(backend, **options)

    @property
    def pool(self) -> Pool:
        """The pool underneath (for ``stats()``, ``cancel()``, ``imap``...)."""
        return self._pool

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait, cancel_futures=cancel_futures)

    def stats(self) -> PoolStats:
        """The pool's statistics."""
        return self._pool.stats()

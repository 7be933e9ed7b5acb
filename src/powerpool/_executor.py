"""``Executor``: powerpool behind the standard ``concurrent.futures`` interface.

Code written for ``ThreadPoolExecutor``/``ProcessPoolExecutor`` (``submit``,
``map``, ``shutdown``, ``as_completed``, ``wait``, ``asyncio.wrap_future``)
works unchanged, with powerpool's backends, crash handling and retries,
including what Python 3.14 added (``map(..., buffersize=)``,
``terminate_workers()``, ``kill_workers()``), on every supported Python.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._options import BackendName, PoolOptions
from ._pool import Pool
from ._stats import PoolStats

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ._options import Unpack

__all__ = ["Executor"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` backed by a :class:`Pool`.

    ``max_workers`` is accepted for drop-in compatibility (same as ``workers``).
    ``map`` keeps the standard semantics (eager submission, ``timeout``); use
    :meth:`Pool.map` for chunked, adaptive throughput.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        backend: BackendName = "auto",
        **options: Unpack[PoolOptions],
    ) -> None:
        if max_workers is not None:
            if not isinstance(max_workers, int) or max_workers <= 0:
                # The standard library's words, for the standard library's name.
                raise ValueError(f"max_workers must be greater than 0, got {max_workers!r}")
            options.setdefault("workers", max_workers)
        options.setdefault("progress", False)
        self._pool = Pool(backend, **options)

    @property
    def pool(self) -> Pool:
        """The pool underneath (for ``stats()``, ``cancel()``, ``imap``...)."""
        return self._pool

    @overload
    def submit(  # a coroutine function's future holds what it awaits
        self, fn: Callable[_P, Awaitable[_R]], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_R]: ...
    @overload
    def submit(
        self, fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_R]: ...
    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        return self._pool.submit(fn, *args, **kwargs)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """``Executor.map`` as in Python 3.14: ``buffersize`` bounds the tasks
        submitted ahead of the results taken (None: all at once, eagerly), so an
        endless input works. ``chunksize`` is accepted and ignored, as the base
        class does."""
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        end = None if timeout is None else timeout + time.monotonic()
        inputs = zip(*iterables)
        futures = collections.deque(
            self.submit(fn, *args) for args in itertools.islice(inputs, buffersize)
        )
        # Weak, as in CPython: an abandoned iterator must not keep the executor alive.
        owner = weakref.ref(self)
        return _results(futures, inputs if buffersize else None, owner, fn, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait, cancel_futures=cancel_futures)

    def terminate_workers(self) -> None:
        """Stop every worker at once and shut down (Python 3.14's method).

        Pending futures are cancelled; running ones end with an error. Worker
        processes are killed rather than sent SIGTERM: powerpool's workers
        hold nothing that needs a clean exit, and SIGTERM can be ignored.
        """
        self._pool.terminate()

    def kill_workers(self) -> None:
        """Kill every worker at once and shut down (Python 3.14's method)."""
        self._pool.terminate()

    def stats(self) -> PoolStats:
        """The pool's statistics."""
        return self._pool.stats()


def _results(
    futures: collections.deque[concurrent.futures.Future[Any]],
    more: Iterator[tuple[Any, ...]] | None,
    owner: weakref.ref[Executor],
    fn: Callable[..., Any],
    end: float | None,
) -> Iterator[Any]:
    """Yield results in order; with ``more``, submit one new task per result taken."""
    try:
        while futures:
            executor = owner() if more is not None else None
            if executor is not None and more is not None:
                args = next(more, None)
                if args is not None:
                    futures.append(executor.submit(fn, *args))
            del executor
            future = futures.popleft()
            try:
                value = future.result(None if end is None else end - time.monotonic())
            finally:
                future.cancel()  # timed out: it will not be waited for again
            yield value
    finally:
        for future in futures:
            future.cancel()

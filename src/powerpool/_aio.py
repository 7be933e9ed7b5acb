"""The async face: ``await amap(...)`` and ``async for r in aimap(...)``.

Neither ever blocks the caller's event loop:

* **Coroutine functions** run on the caller's own loop (so they can use the
  caller's sessions and connections), at most ``workers`` at a time. This is
  a small loop of its own rather than the pool core because the core blocks a
  thread on its inbox, which an event loop must never do.
* **Plain functions** run in a :class:`Pool` (any backend, ``auto`` by
  default) driven from a helper thread; results cross to the loop with
  ``call_soon_threadsafe``, with backpressure so memory stays bounded.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._errors import ItemTimeoutError
from ._execute import is_coroutine_function
from ._options import (
    ERROR_POLICIES,
    MAP_OPTION_NAMES,
    BackendName,
    MapOptions,
    check_backend,
    check_names,
)

if TYPE_CHECKING:
    import asyncio

    from ._options import Unpack
    from ._run import ErrorPolicy

__all__ = ["aimap", "amap"]

ASYNC_DEFAULT_WORKERS = 100
"""Coroutines in flight by default: enough to overlap network waits, few
enough not to exhaust sockets or a server's patience."""

_BRIDGE_BUFFER = 64
"""Results a helper thread may get ahead of the async consumer."""

_DONE = object()

_COROUTINE_OPTIONS = frozenset({"workers", "timeout", "errors"})
"""What coroutines running on the caller's loop can honour (see aimap)."""


async def amap(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    backend: BackendName = "auto",
    **options: Unpack[MapOptions],
) -> list[Any]:
    """Await all results, in input order.

    Plain functions take every option of :func:`powerpool.map`. Coroutine
    functions run on this loop and take ``workers`` (how many in flight),
    ``timeout`` (per item) and ``errors``.
    """
    return [result async for result in aimap(fn, *iterables, backend=backend, **options)]


async def aimap(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    ordered: bool = True,
    backend: BackendName = "auto",
    **options: Unpack[MapOptions],
) -> AsyncIterator[Any]:
    """Results as an async iterator (input order unless ``ordered=False``)."""
    if not callable(fn):
        raise TypeError(f"expected a callable to run, got {type(fn).__name__}: {fn!r}")
    check_backend(backend)
    check_names(options, MAP_OPTION_NAMES)
    workers = options.get("workers")
    timeout = options.get("timeout")
    errors = options.get("errors", "raise")
    if is_coroutine_function(fn) and backend in ("auto", "asyncio"):
        check_names(options, _COROUTINE_OPTIONS, "coroutines")
        # Checked here because no Pool does it on this path (workers=-1 used to yield nothing).
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        gen = _on_this_loop(
            fn, iterables, ordered, workers or ASYNC_DEFAULT_WORKERS, timeout, errors
        )
    else:
        gen = _bridged(fn, iterables, ordered, backend, options)
    async for result in gen:
        yield result


async def _on_this_loop(
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    ordered: bool,
    workers: int,
    timeout: float | None,
    errors: ErrorPolicy,
) -> AsyncIterator[Any]:
    import asyncio  # here, not at the top: `import powerpool` must stay fast

    if errors not in ERROR_POLICIES:
        raise ValueError(f"errors must be 'raise', 'return' or 'skip', got {errors!r}")
    calls = enumerate(zip(*iterables))
    running: dict[asyncio.Task[Any], int] = {}
    waiting: dict[int, tuple[bool, Any]] = {}
    next_index = 0
    exhausted = False

    async def call(index: int, args: tuple[Any, ...]) -> Any:
        if timeout is None:
            return await fn(*args)
        try:
            return await asyncio.wait_for(fn(*args), timeout)
        except asyncio.TimeoutError:
            raise ItemTimeoutError(
                f"item {index} ran longer than its {timeout:g} s timeout"
            ) from None

    try:
        while True:
            # At most `workers` in flight, and (ordered) at most that many waiting.
            while not exhausted and len(running) + len(waiting) < workers:
                try:
                    index, args = next(calls)
                except StopIteration:
                    exhausted = True
                    break
                running[asyncio.ensure_future(call(index, args))] = index
            if not running and not waiting:
                return
            if running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = running.pop(task)
                    exc = task.exception()
                    waiting[index] = (exc is None, task.result() if exc is None else exc)
            order = [next_index] if ordered else sorted(waiting)
            while order and order[0] in waiting:
                index = order.pop(0)
                ok, value = waiting.pop(index)
                if ok or errors == "return":
                    yield value
                elif errors == "raise":
                    raise value
                if ordered:
                    next_index += 1
                    order = [next_index]
    finally:
        for task in running:
            task.cancel()


async def _bridged(
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    ordered: bool,
    backend: BackendName,
    options: MapOptions,
) -> AsyncIterator[Any]:
    import asyncio

    from ._pool import Pool

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    room = threading.Semaphore(_BRIDGE_BUFFER)
    stop = threading.Event()
    # A pool of its own, not a warm shared one: cancelling the awaiting task
    # cancels this pool's work (should_stop() turns true in running tasks),
    # which must not touch anybody else's. The price is a pool start per call.
    settings: MapOptions = {"progress": False, **options}  # a bar only if asked for
    pool = Pool(backend, **settings)
    results = (pool.imap if ordered else pool.imap_unordered)(fn, *iterables)

    def produce() -> None:
        try:
            for result in results:
                room.acquire()
                if stop.is_set():
                    return
                loop.call_soon_threadsafe(queue.put_nowait, (True, result))
            loop.call_soon_threadsafe(queue.put_nowait, (True, _DONE))
        except BaseException as exc:
            if not stop.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, (False, exc))
        finally:
            results.close()  # type: ignore[attr-defined]
            pool.shutdown(wait=not stop.is_set())

    thread = threading.Thread(target=produce, name="powerpool-aimap", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = await queue.get()
            room.release()
            if not ok:
                raise value
            if value is _DONE:
                return
            yield value
    finally:
        stop.set()
        room.release()
        pool.cancel()
        await loop.run_in_executor(None, thread.join)

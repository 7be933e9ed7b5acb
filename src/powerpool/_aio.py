"""The async face: ``await amap(...)`` and ``async for r in aimap(...)``, on the pool core.

Neither ever blocks the caller's event loop, and both are one
:class:`~powerpool._run.Run` of a :class:`Pool` (order, window, retries,
``errors=``, progress, ``pool.stats()``, ``report=``), driven one of two ways:

* **Coroutine functions** run on the caller's own loop (so they can use the
  caller's sessions and connections; no thread hop): the run is driven from
  that loop (``Run.ablocks``, awaiting its inbox) and its chunks go to a
  :class:`~powerpool._coroutines.CoroutineEngine` on the same loop, at most
  ``workers`` coroutines at a time.
* **Plain functions** run on the pool's workers (any backend, ``auto`` by
  default), the run driven from a helper thread (auto may run tiny items in
  the thread that drives it, which must not be the loop's); results cross to
  the loop with ``call_soon_threadsafe``, with backpressure so memory stays
  bounded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._options import (
    MAP_OPTION_NAMES,
    RUN_OPTION_NAMES,
    BackendName,
    MapOptions,
    check_backend,
    check_names,
)
from ._prepare import is_coroutine_function

if TYPE_CHECKING:
    from ._chunk import ChunkResult
    from ._options import RunOptionsDict, Unpack
    from ._pool import Pool

__all__ = ["aimap", "amap", "pool_aimap"]

ASYNC_DEFAULT_WORKERS = 100
"""Coroutines in flight by default: enough to overlap network waits, few
enough not to exhaust sockets or a server's patience."""

_BRIDGE_BUFFER = 64
"""Results a helper thread may get ahead of the async consumer."""

_DONE = object()

_COROUTINE_POOL_OPTIONS = frozenset({"workers", "initializer", "initargs"})
"""Worker options that mean something for coroutines on the caller's loop."""


async def amap(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    backend: BackendName = "auto",
    **options: Unpack[MapOptions],
) -> list[Any]:
    """Await all results, in input order.

    Takes every option of :func:`powerpool.map`. Coroutine functions run on
    this loop, ``workers`` at a time (100 by default); worker options other
    than ``workers``, ``initializer`` and ``initargs`` are for plain functions.
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
    from ._pool import Pool

    if not callable(fn):
        raise TypeError(f"expected a callable to run, got {type(fn).__name__}: {fn!r}")
    check_backend(backend)
    check_names(options, MAP_OPTION_NAMES)
    pool_options: Any = {k: v for k, v in options.items() if k not in RUN_OPTION_NAMES}
    run_options: Any = {k: v for k, v in options.items() if k in RUN_OPTION_NAMES}
    if is_coroutine_function(fn) and backend in ("auto", "asyncio"):
        check_names(pool_options, _COROUTINE_POOL_OPTIONS, "coroutines")
    # A pool of its own, not a warm shared one: cancelling the awaiting task
    # cancels this pool's work (should_stop() turns true in running tasks),
    # which must not touch anybody else's. Coroutines start no workers, so
    # it costs them nothing; plain functions pay a pool start per call.
    pool = Pool(backend, progress=False, **pool_options)  # a bar only if asked for
    try:
        # aclosing: an exception here (or this generator closed) must close the
        # run's generator now, not whenever the loop finalizes it.
        run = pool_aimap(pool, fn, iterables, run_options, ordered=ordered, own=True)
        async with contextlib.aclosing(run) as results:
            async for result in results:
                yield result
    finally:
        pool.shutdown(wait=False)


async def pool_aimap(
    pool: Pool,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    overrides: RunOptionsDict,
    *,
    ordered: bool,
    own: bool,
) -> AsyncGenerator[Any, None]:
    """One run of ``pool`` from async code (``Pool.aimap``); ``own``: nobody else uses ``pool``."""
    options, report, explain = pool._checked(fn, iterables, dict(overrides))  # type: ignore[arg-type]
    prepared = pool._prepare(fn, iterables, options, report, explain)
    if prepared.backend == "asyncio":
        gen = _on_this_loop(pool, prepared, options, ordered)
    else:
        gen = _bridged(pool, prepared, options, ordered, own)
    async with contextlib.aclosing(gen) as results:
        async for result in results:
            yield result


async def _on_this_loop(
    pool: Pool, prepared: Any, options: Any, ordered: bool
) -> AsyncGenerator[Any, None]:
    # Imported here, not at the top: `import powerpool` must not import asyncio.
    from ._coroutines import CoroutineEngine, LoopInbox
    from ._prepare import default_workers

    def deliver(result: ChunkResult) -> None:
        on_done = result.chunk.on_done
        if on_done is not None:
            on_done(result)

    engine = CoroutineEngine(prepared.workers or default_workers("asyncio"), deliver)
    if pool._config.initializer is not None:
        await engine.initialize(pool._config.initializer, pool._config.initargs)
    try:
        with pool._running(
            prepared, options, ordered, False, backend=engine, inbox=LoopInbox()
        ) as run:
            async with contextlib.aclosing(run.ablocks()) as blocks:
                async for block in blocks:
                    for value in block:
                        yield value
    finally:
        # Cancelled, broken out of, or failed: the items still in flight are
        # cancelled, and awaited, so no task of this run outlives it.
        engine.shutdown(kill=True)
        await engine.drain()


async def _bridged(
    pool: Pool, prepared: Any, options: Any, ordered: bool, own: bool
) -> AsyncGenerator[Any, None]:
    import asyncio

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    room = threading.Semaphore(_BRIDGE_BUFFER)
    stop = threading.Event()
    runs: list[Any] = []

    def produce() -> None:
        try:
            with pool._running(prepared, options, ordered, False) as run:
                runs.append(run)
                if stop.is_set():  # cancelled before the run existed
                    run.abort()
                for block in run:
                    for result in block:
                        room.acquire()
                        if stop.is_set():
                            return
                        loop.call_soon_threadsafe(queue.put_nowait, (True, result))
            loop.call_soon_threadsafe(queue.put_nowait, (True, _DONE))
        except BaseException as exc:
            if not stop.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, (False, exc))

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
        if own:
            pool.cancel()  # running tasks see should_stop(); nobody else's work is touched
        else:
            # The caller's pool may run other work: only this run stops
            # (its running items finish, their results are dropped).
            for run in runs:
                run.abort()
        await loop.run_in_executor(None, thread.join)

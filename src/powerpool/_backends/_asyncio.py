"""The asyncio backend: coroutine functions on one event loop, bounded in flight.

The loop runs in a private thread so the blocking API (``map``, ``imap``) can
drive coroutines without the caller owning a loop. ``workers`` bounds how many
coroutines are awaited at once (a semaphore), which is what keeps 10 000 URL
fetches from opening 10 000 sockets. Timeouts are exact (``asyncio.wait_for``)
and cancellation really cancels: the running coroutines get ``CancelledError``.

From async code, prefer ``powerpool.amap``/``aimap``, which run coroutines on
the caller's own loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError
from typing import Any, ClassVar

from .._errors import InitializerError, ItemTimeoutError
from .._stop import CancelFlag, StopToken, running
from .._task import Chunk, ChunkResult, Item, Outcome
from ._base import BackendConfig, Deliver

__all__ = ["AsyncioBackend"]


class AsyncioBackend:
    name: ClassVar[str] = "asyncio"
    chunk_target_s: ClassVar[float] = 0.0  # chunks of one: every item is its own task
    supports_timeout: ClassVar[bool] = True

    def __init__(self, config: BackendConfig, deliver: Deliver) -> None:
        self.workers = config.workers
        self._deliver = deliver
        self._flag = CancelFlag()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="powerpool-asyncio", daemon=True)
        # Invariant: _tasks maps each chunk being run to its asyncio task; only
        # touched on the loop thread.
        self._tasks: dict[Chunk, asyncio.Task[None]] = {}
        self._init_error: BaseException | None = None
        self._semaphore = asyncio.Semaphore(self.workers)
        # Invariant: once _closed is set (under _submit_lock), no callback is
        # added to the loop; submit() then fails the chunk instead.
        self._submit_lock = threading.Lock()
        self._closed = False
        self._thread.start()
        self._ready.wait()
        if config.initializer is not None:
            future = asyncio.run_coroutine_threadsafe(self._initialize(config), self._loop)
            future.result()

    async def _initialize(self, config: BackendConfig) -> None:
        assert config.initializer is not None
        try:
            result = config.initializer(*config.initargs)
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:
            self._init_error = exc

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    # -- protocol -------------------------------------------------------------

    def submit(self, chunk: Chunk) -> None:
        with self._submit_lock:
            if not self._closed:
                self._loop.call_soon_threadsafe(self._start, chunk)
                return
        if chunk.claim():
            error = CancelledError("the pool was shut down")
            self._deliver(ChunkResult(chunk, [(False, error)] * len(chunk), "asyncio", 0.0))

    def cancel(self, epoch: int) -> None:
        self._flag.value = max(self._flag.value, epoch)

        def cancel_tasks() -> None:
            for chunk, task in self._tasks.items():
                if chunk.epoch <= epoch:
                    task.cancel()

        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(cancel_tasks)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        def stop() -> None:
            for task in self._tasks.values():
                task.cancel()
            if not self._tasks:
                self._loop.stop()

        with self._submit_lock:  # no submit slips in between: it would never run
            if self._closed:
                return
            self._closed = True
            self._loop.call_soon_threadsafe(stop if kill else self._stop_when_idle)
        if wait or kill:
            self._thread.join()

    def _stop_when_idle(self) -> None:
        # Otherwise the last running chunk stops the loop (see _run_chunk).
        if not self._tasks:
            self._loop.stop()

    # -- on the loop thread ----------------------------------------------------

    def _start(self, chunk: Chunk) -> None:
        if not chunk.claim():
            return
        task = self._loop.create_task(self._run_chunk(chunk))
        self._tasks[chunk] = task

    async def _run_chunk(self, chunk: Chunk) -> None:
        started = time.perf_counter()
        try:
            if self._init_error is not None:
                error = InitializerError.wrap(self._init_error)
                outcomes: list[Outcome] = [(False, error)] * len(chunk)
            else:
                token = StopToken(self._flag, chunk.epoch)
                outcomes = list(
                    await asyncio.gather(
                        *(self._run_item(chunk, item, token) for item in chunk.items)
                    )
                )
        except asyncio.CancelledError:
            outcomes = [(False, CancelledError())] * len(chunk)
        finally:
            self._tasks.pop(chunk, None)
            if self._closed and not self._tasks:
                self._loop.stop()
        busy_s = time.perf_counter() - started
        self._deliver(ChunkResult.of(chunk, outcomes, "asyncio", busy_s, started))

    async def _run_item(self, chunk: Chunk, item: Item, token: StopToken) -> Outcome:
        _, args, kwargs = item
        async with self._semaphore:
            with running(token):
                try:
                    call: Any = chunk.fn(*args, **kwargs)
                    if chunk.timeout_s is None:
                        return True, await call
                    try:
                        return True, await asyncio.wait_for(call, chunk.timeout_s)
                    except asyncio.TimeoutError:
                        return False, ItemTimeoutError(
                            f"item {item[0]} ran longer than its {chunk.timeout_s:g} s timeout"
                        )
                except asyncio.CancelledError:
                    raise  # the chunk's task was cancelled: _run_chunk reports it
                except BaseException as exc:
                    return False, exc  # SystemExit too: it must not stop the loop

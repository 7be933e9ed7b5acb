"""The asyncio backend: the event-loop engine on a private loop, for the blocking API.

The loop runs in a private thread so the blocking API (``map``, ``imap``) can
drive coroutines without the caller owning a loop; chunks hop onto it with
``call_soon_threadsafe`` and everything else (the ``workers`` bound, exact
timeouts, real cancellation) is :class:`~powerpool._coroutines.CoroutineEngine`,
the same engine ``amap`` uses on the caller's own loop.

From async code, prefer ``powerpool.amap``/``aimap``, which run coroutines on
the caller's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import CancelledError
from typing import ClassVar

from .._chunk import Chunk, ChunkResult
from .._coroutines import CoroutineEngine, close_loop
from ._base import BackendConfig, Deliver

__all__ = ["AsyncioBackend"]


class AsyncioBackend:
    name: ClassVar[str] = "asyncio"
    chunk_target_s: ClassVar[float] = CoroutineEngine.chunk_target_s
    supports_timeout: ClassVar[bool] = True

    def __init__(self, config: BackendConfig, deliver: Deliver) -> None:
        self.workers = config.workers
        self._deliver = deliver
        self._loop = asyncio.new_event_loop()
        self._engine = CoroutineEngine(config.workers, deliver, on_idle=self._on_idle)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="powerpool-asyncio", daemon=True)
        # Invariant: once _closed is set (under _submit_lock), no chunk is
        # added to the loop; submit() then fails the chunk instead.
        self._submit_lock = threading.Lock()
        self._closed = False
        self._thread.start()
        self._ready.wait()
        if config.initializer is not None:
            init = self._engine.initialize(config.initializer, config.initargs)
            asyncio.run_coroutine_threadsafe(init, self._loop).result()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            close_loop(self._loop)

    # -- protocol -------------------------------------------------------------

    def submit(self, chunk: Chunk) -> None:
        with self._submit_lock:
            if not self._closed:
                self._loop.call_soon_threadsafe(self._engine.submit, chunk)
                return
        if chunk.claim():
            error = CancelledError("the pool was shut down")
            self._deliver(ChunkResult(chunk, [(False, error)] * len(chunk), self.name, 0.0))

    def cancel(self, epoch: int) -> None:
        self._engine.cancel_epoch(epoch)  # should_stop() turns true at once, from this thread
        # A closed loop has nothing left to cancel (it may close between check and call).
        with self._submit_lock, contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._engine.cancel, epoch)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        with self._submit_lock:  # no submit slips in between: it would never run
            if self._closed:
                return
            self._closed = True
            self._loop.call_soon_threadsafe(self._stop, kill)
        if wait or kill:
            self._thread.join()

    # -- on the loop thread ----------------------------------------------------

    def _stop(self, kill: bool) -> None:
        self._engine.shutdown(kill=kill)
        self._on_idle()

    def _on_idle(self) -> None:
        # Once closed, the last chunk to end stops the loop (chunks still
        # running at shutdown(wait=False) finish first, unless killed).
        if self._closed and self._engine.idle:
            self._loop.stop()

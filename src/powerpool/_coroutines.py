"""The one event-loop engine: coroutine calls on an event loop, a bounded number at a time.

Every place where powerpool awaits the user's coroutines goes through here:

* ``amap``/``aimap`` (:mod:`powerpool._aio`): on the *caller's* running loop,
  driven by the pool core (:class:`~powerpool._run.Run`) from that same loop;
* ``backend="asyncio"`` (:mod:`powerpool._backends._asyncio`): on a private
  loop in a helper thread, for the blocking API;
* the profiler's async sample: :func:`call` and :func:`run_private`.

So one coroutine item behaves the same wherever it runs (:func:`call`):

* its exception becomes its outcome (``SystemExit`` too: it must not stop
  the loop), so the core's policies (retries, ``errors=``) apply unchanged;
  ``KeyboardInterrupt`` too, except in the main thread, where it is the
  user's Ctrl-C (on Python 3.10, or a loop not run by ``asyncio.run``) and
  stops the run, as the sync item loop does in the caller's thread;
* a timeout is ``asyncio.wait_for``: the late coroutine is really cancelled
  (it sees ``CancelledError`` at its ``await``) and the item fails with
  :class:`~powerpool.ItemTimeoutError`;
* cancelling the task that runs it (a cancelled run, a closed pool) is not an
  outcome: it propagates, and :class:`CoroutineEngine` reports the chunk as
  cancelled;
* :func:`~powerpool.should_stop` answers for the item's own task.

The engine only runs chunks and reports them, like any backend (it
implements the protocol of :mod:`powerpool._backends._base`): ordering,
windows, retries and counting stay in the pool core, written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any, ClassVar, TypeVar

from ._chunk import NO_KWARGS, Chunk, ChunkResult, Outcome
from ._errors import InitializerError, ItemTimeoutError
from ._stop import CancelFlag, StopToken, use

__all__ = ["CoroutineEngine", "LoopInbox", "call", "close_loop", "run_private"]

_T = TypeVar("_T")

CHUNK_TARGET_S = 0.001
"""Wall seconds a chunk of coroutines should take. Each item is still its own
task (they overlap, ``workers`` at a time); the chunk only batches the pool
core's bookkeeping, ~100 us per chunk. 1 ms groups trivial coroutines by the
dozen (the core then costs a few us per item instead of ~100 us) while any
coroutine that really waits (>= 1 ms) gets a chunk of its own, so its result
is never held back by a slower neighbour."""


async def call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout_s: float | None = None,
    index: int = 0,
) -> Outcome:
    """Await one call of ``fn`` and turn it into an outcome (the one policy, see above).

    ``fn`` may also be a plain function that returns an awaitable (the
    profiler meets those); a plain value is its own result.
    """
    try:
        result: Any = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await (result if timeout_s is None else _limited(result, timeout_s, index))
        return True, result
    except asyncio.CancelledError as exc:
        # Task.cancelling() (3.11+) tells a cancel of this task (not an outcome)
        # from a CancelledError the coroutine let out of something of its own;
        # without it, assume the former.
        cancelling = getattr(asyncio.current_task(), "cancelling", None)
        if cancelling is None or cancelling():
            raise
        return False, exc
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            raise  # the user's Ctrl-C (signals arrive in the main thread only): stop
        return False, KeyboardInterrupt()  # raised by the item itself, on a helper loop
    except BaseException as exc:
        # SystemExit included: on an event loop it would stop the loop (and
        # every other item); a task is not the program.
        return False, exc


async def _limited(awaitable: Any, timeout_s: float, index: int) -> Any:
    """``awaitable`` within ``timeout_s``; when late, it is cancelled and the item
    fails with ItemTimeoutError (its own TimeoutError, raised sooner, stays its own)."""
    started = time.perf_counter()
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError:
        if time.perf_counter() - started < timeout_s:
            raise
        raise ItemTimeoutError(
            f"item {index} ran longer than its {timeout_s:g} s timeout"
        ) from None


class _Running:
    """One chunk in the engine: its items' tasks and outcomes, filled as they end."""

    __slots__ = ("cancelled", "chunk", "left", "outcomes", "spent", "started", "tasks", "token")

    def __init__(self, chunk: Chunk, token: StopToken) -> None:
        self.chunk = chunk
        self.token = token
        self.started = 0.0
        """When its first item started (0.0: none yet)."""
        self.outcomes: list[Outcome] = [(True, None)] * len(chunk)  # each set as it ends
        self.left = len(chunk)
        self.spent = 0.0
        """The items' own seconds, added up (see CoroutineEngine._run_item)."""
        self.tasks: set[asyncio.Task[Outcome]] = set()
        self.cancelled = False


class CoroutineEngine:
    """Runs chunks of coroutine calls on one event loop, ``workers`` at a time.

    Every method except :meth:`cancel_epoch` and the ``workers`` attribute is
    called on the loop's own thread: ``submit`` (from the pool core running
    on that loop, or hopped there by the asyncio backend) queues the chunk's
    items; each starts as a task of its own when one of ``workers`` places
    is free, in input order. The last item of a chunk to end delivers the
    chunk's result to ``deliver``, on the loop's thread.

    Items wait in a queue of the engine's, not as tasks blocked on a
    semaphore: the pool core keeps two chunks per worker in flight, and a
    thousand tasks queued on one semaphore cost a future and an extra
    wake-up each (on trivial coroutines that was most of the time).

    Invariant: ``_running`` holds every chunk submitted and not yet
    delivered; ``_active`` counts started item tasks not yet ended (at most
    ``workers``); ``on_idle`` (if given) is called each time ``_running``
    becomes empty.
    """

    name: ClassVar[str] = "asyncio"
    chunk_target_s: ClassVar[float] = CHUNK_TARGET_S
    supports_timeout: ClassVar[bool] = True

    def __init__(
        self,
        workers: int,
        deliver: Callable[[ChunkResult], None],
        *,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.workers = workers
        self._deliver = deliver
        self._on_idle = on_idle
        self._flag = CancelFlag()
        self._running: dict[Chunk, _Running] = {}
        self._queue: deque[tuple[_Running, int]] = deque()  # items not started yet
        self._active = 0
        self._init_error: BaseException | None = None

    async def initialize(self, initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> None:
        """Run the pool's initializer once, on this loop; a failure fails every item."""
        try:
            result = initializer(*initargs)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self._init_error = exc

    # -- the backend protocol (on the loop's thread) ------------------------------

    def submit(self, chunk: Chunk) -> None:
        if not chunk.claim():
            return
        if self._init_error is not None:
            error = InitializerError.wrap(self._init_error)
            self._deliver(ChunkResult.failed(chunk, error, self.name))
            return
        state = _Running(chunk, StopToken(self._flag, chunk.epoch))
        self._running[chunk] = state
        self._queue.extend((state, i) for i in range(len(chunk)))
        self._start()

    def cancel(self, epoch: int) -> None:
        """Cancel the chunks of epochs <= ``epoch``: their coroutines see ``CancelledError``."""
        self.cancel_epoch(epoch)
        self._cancel([s for s in self._running.values() if s.chunk.epoch <= epoch])

    def cancel_epoch(self, epoch: int) -> None:
        """Make ``should_stop()`` true for epochs <= ``epoch`` (any thread)."""
        self._flag.value = max(self._flag.value, epoch)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        """``kill`` cancels every chunk; otherwise they finish (see :meth:`drain`)."""
        if kill:
            self._cancel(list(self._running.values()))

    async def drain(self) -> None:
        """Wait until every chunk submitted has ended (delivered or cancelled)."""
        while self._running:
            tasks = [task for state in self._running.values() for task in state.tasks]
            if not tasks:  # only queued items of chunks not cancelled: cannot happen
                break
            await asyncio.wait(tasks)

    @property
    def idle(self) -> bool:
        """True when no chunk is running or queued."""
        return not self._running

    # -- running ------------------------------------------------------------------

    def _cancel(self, states: list[_Running]) -> None:
        for state in states:
            state.cancelled = True
            for task in state.tasks:
                task.cancel()
        # Their queued items never start: they end here, as cancelled.
        kept: deque[tuple[_Running, int]] = deque()
        for state, position in self._queue:
            if state.cancelled:
                self._ended(state, position, (False, CancelledError()))
            else:
                kept.append((state, position))
        self._queue = kept

    def _start(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while queue and self._active < self.workers:
            state, position = queue.popleft()
            task = loop.create_task(self._run_item(state, position))
            self._active += 1
            state.tasks.add(task)
            task.add_done_callback(functools.partial(self._task_done, state, position))

    def _task_done(self, state: _Running, position: int, task: asyncio.Task[Outcome]) -> None:
        self._active -= 1
        state.tasks.discard(task)
        self._ended(state, position, _outcome(task))
        self._start()

    def _ended(self, state: _Running, position: int, outcome: Outcome) -> None:
        state.outcomes[position] = outcome
        state.left -= 1
        if state.left:
            return
        chunk = state.chunk
        del self._running[chunk]
        # Items of one chunk that overlapped (a fixed chunksize of waiting
        # coroutines) count no more than the chunk's own span, so a report's
        # timeline never draws a chunk past its end.
        span_s = time.perf_counter() - state.started if state.started else 0.0
        busy_s = min(state.spent, span_s)
        self._deliver(ChunkResult.of(chunk, state.outcomes, self.name, busy_s, state.started))
        if not self._running and self._on_idle is not None:
            self._on_idle()

    async def _run_item(self, state: _Running, position: int) -> Outcome:
        """One item; its seconds go to its chunk's ``spent``.

        A chunk's busy time is the sum of its items' own seconds (from their
        start, not the chunk's submission: chunks queued in the engine would
        otherwise each seem to take the whole queue's time). Summed over
        chunks of overlapping coroutines it exceeds the wall time: that
        ratio is how many waited at once (``actual_speedup`` in
        ``pool.stats()``), and per item it tells the chunk sizer which
        coroutines are trivial enough to group.
        """
        chunk = state.chunk
        args = chunk.args[position]
        if not chunk.star:
            args = (args,)
        kwargs = chunk.kwargs[position] if chunk.kwargs else NO_KWARGS
        t0 = time.perf_counter()
        if not state.started:
            state.started = t0
        use(state.token)  # this task's own context (see _stop.use)
        try:
            return await call(chunk.fn, args, kwargs, chunk.timeout_s, chunk.indices[position])
        finally:
            state.spent += time.perf_counter() - t0


def _outcome(task: asyncio.Task[Outcome]) -> Outcome:
    """A finished item task's outcome; a cancelled one's is ``CancelledError``."""
    if task.cancelled():
        return False, CancelledError()
    error = task.exception()  # only a Ctrl-C that call() let through
    return (False, error) if error is not None else task.result()


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close a private loop cleanly: leftover tasks cancelled, async generators
    finalized, the default executor's threads joined (none outlive the loop)."""
    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:  # only left over after KeyboardInterrupt or a kill
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


def run_private(main: Callable[[asyncio.AbstractEventLoop], _T]) -> _T:
    """``main(loop)`` with a new private loop, closed afterwards.

    Runs in this thread, or, when this thread already runs a loop (called
    from async code, where a second loop cannot run), in a short-lived
    helper thread that this call waits for.
    """

    def body() -> _T:
        loop = asyncio.new_event_loop()
        try:
            return main(loop)
        finally:
            close_loop(loop)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return body()
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, body()))
        except BaseException as exc:  # handed to the caller's thread below
            box.append((False, exc))

    helper = threading.Thread(target=target, name="powerpool-private-loop", daemon=True)
    helper.start()
    helper.join()
    ok, value = box[0]
    if not ok:
        raise value
    result: _T = value
    return result


class LoopInbox:
    """A run's inbox on an event loop: ``put`` from any thread, ``get`` awaited on the loop.

    Results from the engine arrive on the loop's own thread and go straight
    in; anything else (``Pool.cancel()`` from another thread) hops over with
    ``call_soon_threadsafe``.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        if threading.get_ident() == self._thread:
            self._queue.put_nowait(item)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> Any:
        return await self._queue.get()

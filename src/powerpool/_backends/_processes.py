"""The process backend: powerpool's own engine, for CPU-bound Python.

Data flow::

    caller thread                      dispatcher thread                 worker i
    ─────────────                      ─────────────────                 ────────
    submit(chunk) ─ pickle args ─► pending ─► idle worker? ─ pipe i ─►  run items
         │                          ▲   wait(wake pipe, every pipe,        │
         └── 1 byte on wake pipe ───┘        every process sentinel,       │
                                             next item deadline) ◄─ pipe i ┘
                                        │
                                        ├─ result   → ledger[i] = idle → deliver
                                        ├─ sentinel → worker died: blame the item
                                        │             it was running (shared status),
                                        │             re-queue the rest, replace it
                                        └─ deadline → kill + replace worker i,
                                                      that item fails with a timeout

One pipe and one chunk per worker (work is pulled by idle workers, so skewed
durations balance), and one ``multiprocessing.connection.wait`` over all pipes
and sentinels: a death is seen the moment it happens, with no polling.

This module holds :class:`ProcessBackend` and its dispatcher; starting and
stopping worker processes is in :mod:`._proc_workers`, the pickled-function
cache in :mod:`._proc_functions`, a chunk's header fields and outcomes in
:mod:`._proc_chunks`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from multiprocessing.process import BaseProcess
from typing import Any, ClassVar

from .._chunk import Chunk, ChunkResult, Item, Measures, Outcome, WorkerTiming
from .._errors import (
    InitializerError,
    ItemTimeoutError,
    SerializationError,
    WorkerCrashedError,
)
from .._mainfn import WORKER_NAME_PREFIX
from .._system import usable_cores
from . import _proc_workers
from ._base import BackendConfig, Deliver
from ._native_threads import capped_for_fork
from ._native_threads import prepare as prepare_native_limits
from ._proc_chunks import (
    Pending,
    blame,
    calling_convention,
    decoder,
    merge_parts,
    sort_picklable,
    trace_level,
)
from ._proc_functions import FunctionCache, dumps_function
from ._proc_workers import Watch, Worker, choose_context, live, stop_workers
from ._recycle import Limits, Throttle, oom_error
from ._shm import (
    COPY,
    OWN,
    READ,
    ScopeCache,
    pack,
)
from ._transfer import open_buffers, receive_buffers, send_buffers
from ._wire import dumps
from ._worker import (
    LOADING,
    STARTING,
    worker_main,
)
from ._worker_logs import deliver, logger_levels

__all__ = ["ProcessBackend"]

_NOT_TIMED = (STARTING, LOADING)

_PICKLE = pickle.HIGHEST_PROTOCOL

MAX_START_DEATHS = 3
"""Workers that die while starting, in a row, before the pool is declared
broken: one may be bad luck (the OOM killer); three mean no worker can start
here, and replacing them forever would only burn CPU."""


class ProcessBackend:
    name: ClassVar[str] = "processes"
    # ~0.1 s of work per chunk: a pipe round trip plus the dispatcher's turn
    # costs ~0.1-1 ms, so this keeps overhead under 1%; the chunk sizer's
    # guided cap still cuts small chunks near the end for balance.
    chunk_target_s: ClassVar[float] = 0.1
    supports_timeout: ClassVar[bool] = True

    def __init__(self, config: BackendConfig, deliver: Deliver) -> None:
        self.workers = config.workers
        self._deliver_to = deliver
        self._context = choose_context(config.start_method)
        cores = usable_cores()
        self._native_threads = config.native_threads or max(1, cores // self.workers)
        self._init_blob = (
            None
            if config.initializer is None
            # The initializer by the same rule as functions (by value when it
            # lives in __main__), so forkserver/spawn workers can load it.
            else dumps((dumps_function(config.initializer), tuple(config.initargs)))
        )
        # Shared with workers: per-slot (position, started) and the cancel epoch.
        self._status = self._context.RawArray("d", 2 * self.workers)
        # Per slot: the worker's last RSS in bytes (written by the worker).
        self._rss = self._context.RawArray("q", self.workers)
        self._limits = Limits(config.max_tasks_per_child, config.max_worker_memory)
        self._throttle = Throttle(self.workers)
        self._cancel_flag = self._context.RawValue("q", -1)
        # Invariant: _lock guards _pending, _closing and _functions; everything
        # else below is owned by the dispatcher thread alone.
        self._lock = threading.Lock()
        self._pending: deque[Pending] = deque()
        self._closing = False
        self._kill = False
        self._functions = FunctionCache(self._lock)
        # Set when workers cannot run anything (initializer raised, or no
        # worker can be started): every chunk then fails with a fresh error.
        self._broken: Callable[[], BaseException] | None = None
        # Chunks that _submit_isolating split: the part sent -> (the chunk it
        # stands for, items already failed here). Merged back on delivery, so
        # the core gets exactly one result per chunk it submitted.
        self._partials: dict[Chunk, tuple[Chunk, list[tuple[Item, Outcome]]]] = {}
        self._start_deaths = 0
        # Large arguments in shared memory, once per run (see _shm).
        self._shared = ScopeCache()
        self._arg_access = COPY if config.writable_arguments else READ
        # Nobody writes to this pipe; workers see EOF once this process (the
        # only holder of the write end) is gone, even under forkserver.
        self._alive = self._context.Pipe(duplex=False)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        forking = self._context.get_start_method() == "fork"
        if forking:
            prepare_native_limits()  # once here, not in every forked worker
        capped = capped_for_fork(self._native_threads) if forking else contextlib.nullcontext()
        with capped:
            self._workers: list[Worker] = [self._start_worker(s) for s in range(self.workers)]
        self._watch = Watch(self._wake_r)
        for worker in self._workers:
            self._watch.add(worker)
        # Started after the workers so that a fork above saw a single thread.
        self._dispatcher = threading.Thread(
            target=self._dispatch_forever, name="powerpool-dispatcher", daemon=True
        )
        self._dispatcher.start()
        live.add(self)

    # -- protocol (any thread) --------------------------------------------------

    def submit(self, chunk: Chunk) -> None:
        try:
            payload = pack(
                list(zip(chunk.args, chunk.kwargs)) if chunk.kwargs else chunk.args,
                items=len(chunk),
                cache=self._shared,
                scope=chunk.scope,
            )
        except Exception:
            self._submit_isolating(chunk)
            return
        with self._lock:
            if self._closing:
                closed = True
            else:
                closed = False
                self._pending.append(Pending(chunk, payload))
        if closed:
            self._deliver(
                ChunkResult.failed(chunk, CancelledError("the pool was shut down"), "parent")
            )
            return
        self._wake()

    def release(self, scope: object) -> None:
        """The run ``scope`` has ended: free the shared copies of its arguments."""
        self._shared.release(scope)

    def cancel(self, epoch: int) -> None:
        self._cancel_flag.value = max(self._cancel_flag.value, epoch)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        with self._lock:
            self._closing = True
            self._kill = self._kill or kill
        live.discard(self)
        self._wake()
        if (wait or kill) and threading.current_thread() is not self._dispatcher:
            self._dispatcher.join()

    # -- submission helpers -----------------------------------------------------

    def _submit_isolating(self, chunk: Chunk, worker_problem: str | None = None) -> None:
        """Fail only the items whose arguments cannot be pickled; send the rest.

        With ``worker_problem`` (the worker could not unpickle the payload),
        the test is a round trip instead; if no item fails it here, the
        culprit is unknown (e.g. a class only this process can import) and
        every item fails with the worker's reason.
        """
        good, bad = sort_picklable(chunk, worker_problem)
        if worker_problem is not None and not bad:
            error = SerializationError(
                f"the arguments could not be unpickled in a worker process: {worker_problem}"
            )
            self._deliver(ChunkResult.failed(chunk, error, "parent"))
            return
        if not good:
            self._deliver(ChunkResult(chunk, [outcome for _, outcome in bad], "parent", 0.0))
            return
        sent = Chunk(
            chunk.id, chunk.fn, good, chunk.timeout_s, chunk.epoch, chunk.claim, chunk.on_done
        )
        sent.recorder = chunk.recorder
        with self._lock:
            self._partials[sent] = (chunk, bad)
        self.submit(sent)

    def _deliver(self, result: ChunkResult) -> None:
        """Hand a result to the core, first merging a split chunk's parts back together."""
        while True:
            with self._lock:
                split = self._partials.pop(result.chunk, None)
            if split is None:
                break
            result = merge_parts(result, *split)
        self._deliver_to(result)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the dispatcher will look
        except OSError:
            pass  # closed during shutdown

    # -- workers (dispatcher thread, and __init__) -------------------------------

    def _start_worker(self, slot: int) -> Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        self._status[2 * slot] = STARTING  # no item is blamed until it has started
        self._status[2 * slot + 1] = 0.0
        self._rss[slot] = 0
        process: BaseProcess = self._context.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(
                child_end,
                slot,
                self._status,
                self._cancel_flag,
                self._init_blob,
                self._native_threads,
                self._alive,
                logger_levels(),
                self._rss,
                self._limits if self._limits else None,
            ),
            name=f"{WORKER_NAME_PREFIX}{slot}",
            daemon=True,
        )
        process.start()
        child_end.close()
        return Worker(process, parent_end, slot)

    def _replace(self, worker: Worker) -> None:
        """Start a new worker in a dead or killed one's slot (unless closing or broken)."""
        self._watch.remove(worker)
        worker.conn.close()
        worker.process.join()
        index = self._workers.index(worker)
        if self._closing or self._broken is not None or _proc_workers.exiting:
            del self._workers[index]
        else:
            if self._context.get_start_method() == "fork":
                # This is the dispatcher thread: forking now is unsafe.
                self._context = choose_context(None)
            try:
                self._workers[index] = self._start_worker(worker.slot)
                self._watch.add(self._workers[index])
            except Exception as exc:
                del self._workers[index]
                if not self._workers:
                    message = f"no worker process could be started: {type(exc).__name__}: {exc}"
                    self._broken = lambda: WorkerCrashedError(message)
        if not self._workers and self._broken is not None:
            self._fail_pending(self._broken)

    # -- the dispatcher -----------------------------------------------------------

    def _dispatch_forever(self) -> None:
        try:
            self._dispatch_loop()
        except BaseException as exc:
            self._fail_everything(exc)
            raise
        finally:
            stop_workers(self._workers, kill=self._kill)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for end in self._alive:
                end.close()

    def _dispatch_loop(self) -> None:
        while True:
            if self._kill:
                self._fail_everything(CancelledError("the pool was terminated"))
                return
            self._send_pending()
            busy = [w for w in self._workers if w.chunk is not None]
            if self._closing and not busy and not self._pending:
                return
            woken, talking, ended = self._watch.wait(self._next_deadline(busy))
            if woken:
                os.read(self._wake_r, 65536)
            for worker in talking:
                if not self._receive(worker) and worker in self._workers:
                    self._watch.remove(worker, pipe_only=True)  # at EOF: ready forever
            for worker in ended:
                if worker in self._workers and not worker.process.is_alive():
                    self._on_death(worker)
            self._expire_late(time.monotonic())

    def _send_pending(self) -> None:
        if self._broken is not None:
            self._fail_pending(self._broken)
            return
        idle = [w for w in self._workers if w.chunk is None and not w.retiring and not w.hung_up]
        busy = sum(1 for w in self._workers if w.chunk is not None)
        del idle[self._throttle.room(busy, len(idle)) :]  # fewer at once after an OOM death
        while idle:
            # Liveness is asked of the one worker about to get a chunk (a waitpid),
            # not of every worker each time this runs (once or twice per chunk).
            if not idle[-1].process.is_alive():
                idle.pop()  # dead, its sentinel not handled yet: _on_death will
                continue
            with self._lock:
                if not self._pending:
                    return
                pending = self._pending.popleft()
            chunk, payload = pending.chunk, pending.payload
            del pending  # its segments close once sent (see _shm.Segment)
            if not chunk.claim():
                with self._lock:
                    self._partials.pop(chunk, None)
                continue
            try:
                fn_id, blob = self._functions.pickled(chunk)
            except Exception as exc:
                error = SerializationError(
                    f"the function {getattr(chunk.fn, '__qualname__', chunk.fn)!r} could not "
                    f"be pickled to send it to a worker process: {type(exc).__name__}: {exc}"
                )
                self._deliver(ChunkResult.failed(chunk, error, "parent"))
                continue
            worker = idle.pop()
            first = worker.remember(fn_id)
            header = pickle.dumps(
                (
                    chunk.id,
                    fn_id,
                    blob if first else None,
                    chunk.epoch,
                    calling_convention(chunk),
                    chunk.timeout_s is not None,
                    trace_level(chunk),
                    None if payload.table is None else (self._arg_access, payload.table),
                    chunk.probe,
                ),
                _PICKLE,
            )
            worker.chunk = chunk
            worker.sent_bytes = len(payload.inband) + sum(
                nbytes for _, nbytes in payload.table or ()
            )
            worker.sent_at = time.monotonic()
            if self._status[2 * worker.slot] >= 0:
                # A position left from its last chunk: the worker sent those results
                # and was stopped (or descheduled) before it cleared the slot. A
                # death before it reads this chunk then blames no item, and a
                # timeout names the chunk's first item, as for any chunk not started.
                self._status[2 * worker.slot] = -1
            try:
                worker.conn.send_bytes(header)
                if payload.table is not None:
                    send_buffers(worker.conn, payload)
                worker.conn.send_bytes(payload.inband)
            except OSError:
                pass  # it just died: its sentinel fires and _on_death blames the chunk

    def _receive(self, worker: Worker) -> bool:
        """Handle one message from ``worker``; False when its pipe is closed."""
        body = b""
        try:
            header = pickle.loads(worker.conn.recv_bytes())
            if header[0] == "ready":  # started: a chunk's timeout runs from now on
                self._start_deaths = 0
                return True
            if header[0] == "log":
                self._forward_logs(worker, header[1], header[2])
                return True
            info: dict[str, Any] = header[2] if len(header) > 2 else {}
            views: list[Any] = []
            if header[0] != "init-error":
                table = info.get("table")
                if table is not None:
                    views = open_buffers(table, receive_buffers(worker.conn, table), OWN)
                body = worker.conn.recv_bytes()
        except (EOFError, OSError):
            worker.hung_up = True
            return False  # died or exiting; handled by its sentinel
        self._handle(worker, header, info, views, body)
        return True

    def _handle(
        self,
        worker: Worker,
        header: tuple[Any, ...],
        info: dict[str, Any],
        views: list[Any],
        body: bytes,
    ) -> None:
        """Act on a chunk's results (or an initializer's failure) read by _receive."""
        chunk, worker.chunk = worker.chunk, None
        worker.retiring = worker.retiring or "retire" in info  # it exits after this message
        if header[0] == "init-error":
            cause = header[1]
            self._broken = lambda: InitializerError.wrap(cause)
            if chunk is not None:
                self._deliver(ChunkResult.failed(chunk, self._broken(), worker.name))
            return
        if chunk is None or chunk.id != header[0]:
            return
        if "problem" in info:  # the worker could not unpickle the arguments
            self._submit_isolating(chunk, worker_problem=info["problem"])
            return
        self._throttle.chunk_done()
        # The worker is idle: give it its next chunk before the core hears of
        # this one. Delivering wakes the caller's thread, which then holds the
        # GIL for its bookkeeping (and auto's steering) while this thread waits
        # for it: 0.3-2.5 ms per chunk on 2 cores, all of it the worker's idle
        # time (the message is read to its end, so neither side can block).
        self._send_pending()
        ran = info.get("ran", len(chunk))
        decode = decoder(body, info.get("table"), views, ran)
        nbytes = len(body) + sum(n for _, n in info.get("table") or ())
        if ran < len(chunk):
            self._resend_rest(chunk, ran, ChunkResult(chunk, None, decode=decode).outcomes)
            return
        timing = WorkerTiming(*info["timing"]) if "timing" in info else None
        measures = None
        if "measures" in info:
            cpu_s, first, gil, queued_s, blocks = info["measures"]
            measures = Measures(cpu_s, first, gil, worker.sent_bytes + nbytes, queued_s, blocks)
        self._deliver(
            ChunkResult(
                chunk,
                None,
                worker.name,
                header[1],
                decode=decode,
                started_s=0.0 if timing is None else timing.started_s,
                timing=timing,
                nbytes=nbytes,
                measures=measures,
            )
        )

    def _forward_logs(self, worker: Worker, entries: list[Any], dropped: int) -> None:
        """Hand a worker's log records to this process's loggers (dispatcher thread)."""
        chunk = worker.chunk
        indices = None if chunk is None else chunk.indices
        recorder = None if chunk is None else chunk.recorder
        deliver(entries, dropped, indices, worker.name, recorder)

    def _resend_rest(self, chunk: Chunk, ran: int, outcomes: list[Outcome]) -> None:
        """A retiring worker ran only the first ``ran`` items: send the rest to
        another worker; the whole chunk is delivered when they are done."""
        items = chunk.items
        rest = Chunk(
            chunk.id,
            chunk.fn,
            items[ran:],
            chunk.timeout_s,
            chunk.epoch,
            chunk.claim,
            chunk.on_done,
            scope=chunk.scope,
        )
        rest.recorder = chunk.recorder
        with self._lock:
            self._partials[rest] = (chunk, list(zip(items[:ran], outcomes)))
        self.submit(rest)

    def _on_death(self, worker: Worker) -> None:
        # A worker that exits on purpose (retiring) may have sent its results
        # behind another message in the same instant: read all it sent first.
        while worker.chunk is not None and worker.conn.poll() and self._receive(worker):
            pass
        chunk, worker.chunk = worker.chunk, None
        position = int(self._status[2 * worker.slot])
        if position == STARTING and self._broken is None:
            self._died_starting(worker)
        if chunk is not None:
            if self._broken is not None:
                outcomes = [(False, self._broken())] * len(chunk)
            else:
                exitcode, pid = worker.process.exitcode, worker.process.pid
                error = oom_error(exitcode, pid, self._rss[worker.slot], self._limits.max_memory)
                if error is not None:
                    busy = sum(1 for w in self._workers if w.chunk is not None) + 1
                    self._throttle.oom(busy)
                else:
                    error = WorkerCrashedError.from_exitcode(exitcode, pid=pid)
                outcomes = blame(chunk, position, error)
            self._deliver(ChunkResult(chunk, outcomes, worker.name, 0.0))
        self._replace(worker)

    def _died_starting(self, worker: Worker) -> None:
        """A worker died before it could run anything: in its initializer, or at start."""
        crash = WorkerCrashedError.from_exitcode(worker.process.exitcode, pid=worker.process.pid)
        how = str(crash).removesuffix(" while running this item")
        if self._init_blob is not None:
            message = f"{how} while running the pool's initializer"

            def broken() -> BaseException:
                error = InitializerError(message)
                error.__cause__ = crash
                return error

            self._broken = broken
            return
        self._start_deaths += 1
        if self._start_deaths >= MAX_START_DEATHS:
            message = f"worker processes die while starting; the last one: {how}"
            self._broken = lambda: WorkerCrashedError(message, exitcode=crash.exitcode)

    def _next_deadline(self, busy: list[Worker]) -> float | None:
        deadlines: list[float] = []
        for worker in busy:
            assert worker.chunk is not None
            if worker.chunk.timeout_s is None or self._status[2 * worker.slot] in _NOT_TIMED:
                continue  # no item has started yet: its time does not run
            started = max(float(self._status[2 * worker.slot + 1]), worker.sent_at)
            deadlines.append(started + worker.chunk.timeout_s)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire_late(self, now: float) -> None:
        for worker in list(self._workers):
            chunk = worker.chunk
            if chunk is None or chunk.timeout_s is None:
                continue
            if self._status[2 * worker.slot] in _NOT_TIMED:
                continue  # in its initializer or loading the function: no item has started
            started = max(self._status[2 * worker.slot + 1], worker.sent_at)
            if now < started + chunk.timeout_s or worker.conn.poll():
                continue  # in time, or its results are waiting to be read
            position = max(0, int(self._status[2 * worker.slot]))
            worker.chunk = None
            worker.process.kill()
            error = ItemTimeoutError(
                f"item {chunk.indices[position]} ran longer than its {chunk.timeout_s:g} s "
                f"timeout; its worker process {worker.process.pid} was killed and replaced"
            )
            self._deliver(
                ChunkResult(chunk, blame(chunk, position, error), worker.name, chunk.timeout_s)
            )
            self._replace(worker)

    # -- endings ------------------------------------------------------------------

    def _fail_pending(self, error: Callable[[], BaseException]) -> None:
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for entry in pending:
            if entry.chunk.claim():
                self._deliver(ChunkResult.failed(entry.chunk, error(), "parent"))

    def _fail_everything(self, error: BaseException) -> None:
        with self._lock:
            self._closing = True
        for worker in self._workers:
            if worker.chunk is not None:
                chunk, worker.chunk = worker.chunk, None
                worker.process.kill()
                self._deliver(ChunkResult.failed(chunk, error, worker.name))
        self._fail_pending(lambda: error)

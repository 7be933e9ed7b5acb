"""The main loop of a worker process (kept small: it is imported in every worker).

Protocol on the worker's pipe (parent -> worker), one chunk per two messages::

    header  = pickle((chunk_id, fn_digest, fn_blob | None, epoch, convention, timed, traced,
                      shared, probe))     shared: None, or (access, table) of _shm segments;
                                          probe: run auto's GIL heartbeat (see _chunk.Measures)
    [out-of-band buffers, when shared: segments' descriptors (SCM_RIGHTS), then
     piped buffers as raw bytes (see _transfer)]
    payload = pickle([x, ...])                  convention BARE:     fn(x)
              pickle([args, ...])               convention STAR:     fn(*args)
              pickle([(args, kwargs), ...])     convention KEYWORDS: fn(*args, **kwargs)
    b""     (an empty message) asks the worker to exit

worker -> parent, two messages per chunk (the parent's dispatcher reads only
the small first one; the results are unpickled by the consumer's thread)::

    pickle((chunk_id, busy_s, info))   info["measures"]: auto's evidence (_chunk.Measures)
    [out-of-band buffers, when info["table"] is given, as above]
    pickle(("values", [result, ...]))                 every item succeeded, or
    pickle(("outcomes", [(ok, value | ShippedError)])), or
    pickle(("framed", ...))                           one pickle per item, when the one
                                                      pickle failed (see _wire)

``info`` is a dict: "table" (large result buffers in shared memory, see
_shm), "timing" (when ``traced``: see _chunk.WorkerTiming), "retire" and
"ran" (this worker reached its limits after running the first "ran" items,
and exits: see _recycle), or "problem" (the payload would not unpickle
here; the second message is empty and the parent finds the culprit items).

``traced`` is 0 (no report asked for: nothing is measured beyond busy_s),
TRACE_CHUNKS (time the chunk's phases) or TRACE_ITEMS (also each item's end).
At any time, ``logging`` records go to the parent as
pickle(("log", [record dict, ...], dropped)) (see _worker_logs.py).

and, once, before any of those: pickle(("ready",)) when the initializer (if
any) has run, or instead pickle(("init-error", ShippedError)) when it raised;
the worker then exits.

Shared memory, written by this worker (by the parent only where said), read
by the parent's dispatcher:
``status[2*slot]`` is the position in the chunk of the item now running
(-1 while the chunk is being unpacked; STARTING, set by the parent, until the
initializer has run; the parent also resets a position this worker left
from its previous chunk to -1 when it sends the next) and ``status[2*slot+1]`` the
``time.monotonic()`` at which it started (0 when idle). That lets the parent
blame exactly the right item when this process dies or runs late, without a
message per item.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import pickle
import resource
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .._errors import SerializationError
from .._mainfn import Install, load, refresh
from .._probes import SchedClock
from .._stop import StopToken, running
from .._system import set_worker_cores
from ._itemloop import BARE, KEYWORDS, STAR, ItemWatch, run_chunk
from ._native_threads import limit_native_threads
from ._recycle import Budget, Limits, rss_reader
from ._shm import (
    Packed,
    keep_freed_memory,
    pack,
    unpack,
)
from ._transfer import open_buffers, receive_buffers, send_buffers
from ._wire import ShippedError, dumps, encode
from ._worker_logs import forward_to_parent

__all__ = [
    "BARE",
    "KEYWORDS",
    "LOADING",
    "STAR",
    "STARTING",
    "TRACE_CHUNKS",
    "TRACE_ITEMS",
    "WORKER_FN_CACHE",
    "worker_main",
]

ORPHAN_CHECK_S = 0.5
"""How often a worker checks that its parent is alive. Off the hot path (a
daemon thread); bounds how long workers outlive a SIGKILLed parent."""

WORKER_FN_CACHE = 64
"""Functions a worker keeps unpickled, by content digest, least recently used
dropped first; the parent mirrors this cache to know when it must send a
function again (a changed function has a new digest: it is sent again)."""

RUSAGE_THREAD: int = getattr(resource, "RUSAGE_THREAD", -1)
"""getrusage() of the calling thread (Linux); -1 elsewhere, which fails (blocks unknown)."""

PROBE_MAX_TICKS = 16
"""Heartbeat ticks per probe chunk: a score on 16 ticks tells pure Python (~1)
from GIL-free code (~0) well, and stopping there spares the rest of a long
chunk the GIL hand-offs each tick forces (~100 ms of ticks against pure
Python, instead of the whole chunk: 20-40% slower 0.25 s items under gVisor)."""

GIL_MIN_TICKS = 2
"""Heartbeat ticks a GIL score must rest on: one tick can be off by one switch
at the chunk's boundary (chunks under ~2 ms report no score)."""

_PICKLE = pickle.HIGHEST_PROTOCOL

STARTING = -2
"""``status[2*slot]`` of a worker that has not finished starting (its
initializer is running): no item of a chunk sent to it has started."""

TRACE_CHUNKS, TRACE_ITEMS = 1, 2
"""Values of a chunk header's ``traced``: what the worker measures for a report."""

LOADING = -3
"""``status[2*slot]`` while a worker unpickles a new function for a chunk with
a timeout: that may import the function's module (numpy, torch...), which is
not the item's time. A ("ready",) message follows, re-arming the deadline."""


def worker_main(  # noqa: PLR0911 - each return is one way a worker's life ends
    conn: Connection,
    slot: int,
    status: Any,
    cancel_flag: Any,
    init_blob: bytes | None,
    native_threads: int,
    alive: tuple[Connection, Connection],
    log_levels: dict[str, int] | None = None,
    rss: Any = None,
    limits: Limits | None = None,
) -> None:
    """Entry point of every worker process.

    ``rss[slot]`` is where this worker records its RSS for the parent;
    ``limits`` retire it after some items or past some memory (_recycle).
    """
    # Ctrl-C goes to the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    rss_now = rss_reader()  # before the watch thread, which reads it too

    def record_rss() -> None:
        if rss is not None:
            rss[slot] = rss_now()

    _watch_parent(*alive, record_rss)
    if init_blob is None:
        # Set up only once there is something to do. The parent forks its
        # workers one after the other and sends nothing before the last one is
        # forked: a worker that set up meanwhile (native thread limits, logging,
        # every page it writes copied from the parent) slowed the next forks.
        # 16 workers took 115-175 ms to start on a 16-core machine, against
        # 15-18 ms for multiprocessing.Pool, whose workers block at once.
        # (With an initializer, it runs at start-up, as users expect.)
        try:
            conn.poll(None)
        except (EOFError, OSError):
            return
    limit_native_threads(native_threads, own_process=True)  # for good: the process is ours
    set_worker_cores(native_threads)  # nested maps stay within this share
    keep_freed_memory()  # big results and arguments reuse pages (see _shm)
    budget = Budget(limits, rss_now) if limits else None
    # A typed view of the shared status array: item assignment through it
    # costs ~30 ns, a third of ctypes' own __setitem__ (paid once per item).
    view: Any = memoryview(status).cast("B").cast("d")
    base = 2 * slot
    logs = forward_to_parent(conn, lambda: int(view[base]), log_levels or {})
    if init_blob is not None:
        try:
            initializer_blob, initargs = pickle.loads(init_blob)
            pickle.loads(initializer_blob)(*initargs)
        except Exception as exc:
            logs.flush()
            with contextlib.suppress(OSError):  # the parent may be gone already
                conn.send_bytes(dumps(("init-error", ShippedError.capture(exc))))
            return
        logs.flush()
    functions: OrderedDict[bytes, tuple[Callable[..., Any], list[Install]]] = OrderedDict()
    # Run-queue time per chunk: on a loaded machine a computing chunk waits
    # for a CPU, which must not pass for waiting on I/O (auto's evidence).
    sched = SchedClock()
    # Started: a chunk sent meanwhile has been waiting since now (time first:
    # the parent reads the position, then trusts the time). The message wakes
    # the parent, which does not run a chunk's timeout while we are STARTING.
    view[base + 1] = time.monotonic()
    view[base] = -1
    try:
        conn.send_bytes(pickle.dumps(("ready",), _PICKLE))
    except OSError:
        return  # the pool was shut down while we started
    while True:
        try:
            header = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent is gone
        if not header:
            logs.flush()
            return
        received = time.perf_counter()
        view[base] = -1
        view[base + 1] = time.monotonic()
        chunk_id, fn_id, fn_blob, epoch, convention, timed, traced, shared, probe = pickle.loads(
            header
        )
        try:
            incoming = None if shared is None else receive_buffers(conn, shared[1])
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        unpacking = time.perf_counter()
        if fn_blob is not None:
            if timed:
                view[base] = LOADING
            # Cached even when it fails to load, so the parent's mirror of this
            # cache stays exact; the stand-in fails every item with the reason.
            functions[fn_id] = _load_function(fn_blob)
            if len(functions) > WORKER_FN_CACHE:
                functions.popitem(last=False)
            if timed:
                view[base + 1] = time.monotonic()  # time first, as at start-up
                view[base] = -1
                conn.send_bytes(pickle.dumps(("ready",), _PICKLE))
        else:
            functions.move_to_end(fn_id)
            refresh(functions[fn_id][1])  # __main__ globals another function replaced
        try:
            if shared is None:
                payload = pickle.loads(raw)
            else:
                access, table = shared
                assert incoming is not None
                payload = unpack(raw, table, open_buffers(table, incoming, access))
        except Exception as exc:
            view[base + 1] = 0.0
            problem = {"problem": f"{type(exc).__name__}: {exc}"}
            conn.send_bytes(pickle.dumps((chunk_id, 0.0, problem), _PICKLE))
            conn.send_bytes(b"")
            continue
        beat = _start_heartbeat() if probe else None
        blocks_started = _voluntary_switches()
        queued_started = sched.waited_s()
        # CPU of the whole process (native thread pools count), except while
        # the heartbeat runs (its own ticks would pass for the items' work) and
        # when native pools are capped at one thread (the items' native code
        # then runs in this thread, and OpenBLAS's idle pool, re-created after
        # the fork, spins for ~0.1 s: 4-19 ms of CPU per 20 ms sleep, taken for
        # the items', made waiting work look CPU-bound).
        single = beat is not None or native_threads == 1
        cpu_clock = time.thread_time if single else time.process_time
        cpu_started = cpu_clock()
        started = time.perf_counter()
        ends: list[float] | None = [] if traced == TRACE_ITEMS else None
        # The fast branch (no per-item work but the position, for crash blame)
        # unless keywords, a timeout or worker limits need each item watched.
        watched = convention == KEYWORDS or timed or budget is not None
        with running(StopToken(cancel_flag, epoch)):
            kind, results = run_chunk(
                functions[fn_id][0],
                payload,
                convention,
                _Watch(view, base, timed, budget) if watched else None,
                in_caller=False,  # SIGINT is ignored here: a KeyboardInterrupt is the item's
                positions=view,
                slot=base,
                ends=ends,
            )
        ended = time.perf_counter()
        busy_s = ended - started
        cpu_s = cpu_clock() - cpu_started
        queued_s = sched.waited_s() - queued_started
        blocks = (
            -1 if beat is not None or blocks_started < 0 else _voluntary_switches() - blocks_started
        )
        gil = None if beat is None else _gil_score(beat, started, ended)
        del payload  # the arguments' shared memory is unmapped now, not at the next chunk
        record_rss()
        dumping = time.perf_counter()
        packed = _pack_results(kind, results, len(results))
        pickle_s = time.perf_counter() - dumping
        logs.flush()  # before the results: the parent still knows the chunk's items
        info: dict[str, Any] = {"measures": (cpu_s, fn_blob is not None, gil, queued_s, blocks)}
        if packed.table is not None:
            info["table"] = packed.table
        if budget is not None and budget.retire is not None:
            info["retire"], info["ran"] = budget.retire, len(results)
        if traced:
            # (received, receive_s, unpack_s, started, item ends, pickle_s): see WorkerTiming
            info["timing"] = (
                received,
                unpacking - received,
                started - unpacking,
                started,
                ends,
                pickle_s,
            )
        del results
        conn.send_bytes(pickle.dumps((chunk_id, busy_s, info)))
        if packed.table is not None:
            send_buffers(conn, packed)
        conn.send_bytes(packed.inband)
        del packed  # closes this side of the result segments
        if "retire" in info:
            return  # the parent saw why, and starts a fresh worker in this slot
        # Only now: until the results are in the pipe, the parent must still
        # see the last item's start (its deadline) and whom to blame.
        view[base] = -1  # a death from now on is no item's fault
        view[base + 1] = 0.0


def _voluntary_switches() -> int:
    """This thread's voluntary context switches so far (-1 where unknown).

    A thread that waits (I/O, sleep, a lock) switches voluntarily; one that
    computes is only preempted. So waiting is told from a starved CPU (a
    loaded or throttled machine, where wall time far exceeds CPU time too).
    """
    try:
        return resource.getrusage(RUSAGE_THREAD).ru_nvcsw
    except (OSError, ValueError):
        return -1


def _start_heartbeat() -> Any:
    """A GIL heartbeat for a probe chunk (see ``_probes.Heartbeat``), or None if none starts.

    In a worker process the only other Python threads are idle (the orphan
    watch sleeps in ``poll``), so a heartbeat that waits for the GIL waits
    for the chunk's own code: pure Python scores ~1, code that releases the
    GIL (numpy, hashlib, zlib) ~0. Imported only when asked for.
    """
    try:
        from .._probes import Heartbeat

        beat = Heartbeat(max_ticks=PROBE_MAX_TICKS)
    except RuntimeError:
        return None
    beat.begin()
    return beat


def _gil_score(beat: Any, started: float, ended: float) -> float | None:
    """Stop the heartbeat; its GIL-held score, or None when too few ticks fell in the chunk."""
    beat.end(started, ended)
    beat.stop()
    estimate, _ = beat.gil_estimate()
    if estimate is None or estimate[1] < GIL_MIN_TICKS:
        return None
    return float(estimate[0])


class _Watch(ItemWatch):
    """The slow path's per-item bookkeeping: each item's start time (for the
    parent's timeout) and the worker's budget (``max_tasks_per_child``...)."""

    __slots__ = ("_budget", "_started")

    def __init__(self, view: Any, base: int, timed: bool, budget: Budget | None) -> None:
        self._started = (view, base + 1) if timed else None
        self._budget = budget

    def started(self, position: int) -> bool:
        if self._started is not None:
            view, index = self._started
            view[index] = time.monotonic()  # after the position: see the protocol
        return True

    def finished(self, position: int) -> bool:
        # Spent: fewer results than items go back; the parent sends the rest elsewhere.
        return self._budget is None or not self._budget.spent()


def _pack_results(kind: str, results: list[Any], items: int) -> Packed:
    """The results as one pickle, large buffers in shared memory; if that fails,
    in-band only, framed so that an item that won't pickle fails alone (see
    _wire: one that won't load in the caller is found there)."""
    shipped = results
    if kind == "outcomes":
        shipped = [(ok, value if ok else ShippedError.capture(value)) for ok, value in results]
    try:
        # Big bytes go as pipe messages the caller reads straight into the
        # result (see _shm.pack); arrays, which it maps, in segments.
        return pack((kind, shipped), items=items, pipe_bytes=True, pipe_below=0)
    except Exception:  # an item's result won't pickle: find it, fail it alone
        return Packed(encode(kind, shipped), None, [])


def _load_function(blob: bytes) -> tuple[Callable[..., Any], list[Install]]:
    """The pickled function (and the ``__main__`` globals it brought), or a
    stand-in that fails each item saying why it won't load."""
    try:
        return load(blob)
    except Exception as exc:
        message = (
            f"the function could not be unpickled in the worker process: "
            f"{type(exc).__name__}: {exc}"
        )

        def unloadable(*args: Any, **kwargs: Any) -> Any:
            raise SerializationError(message)

        return unloadable, []


def _watch_parent(
    alive_r: Connection, alive_w: Connection, tick: Callable[[], None] = lambda: None
) -> None:
    """Exit when orphaned, so a SIGKILLed parent leaves no workers behind.

    ``alive_r`` is the read end of a pipe nobody writes to, whose write end
    only the powerpool process keeps (we close our inherited or passed copy
    here): it turns readable (EOF) the moment that process is gone, however
    it died. A changed parent id is checked too, for fork-started workers
    whose parent let other forked children inherit the write end. (Under
    forkserver our parent is the fork server, which outlives the powerpool
    process while any worker lives: the pipe is what tells us.)
    """
    alive_w.close()
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            tick()  # records this worker's RSS for OOM diagnoses (see _recycle)
            try:
                if alive_r.poll(ORPHAN_CHECK_S):
                    break
            except (EOFError, OSError):
                break
        os._exit(1)

    # The low-level start: threading.Thread.start() waits until the new thread
    # has run, which on a busy machine held every fresh worker's first item
    # back by milliseconds (up to 80 ms seen on the loaded 2-core VM).
    _thread.start_new_thread(watch, ())

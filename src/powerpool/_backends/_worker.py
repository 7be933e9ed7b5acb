"""The main loop of a worker process (kept small: it is imported in every worker).

Protocol on the worker's pipe (parent -> worker), one chunk per two messages::

    header  = pickle((chunk_id, fn_id, fn_blob | None, epoch, convention, timed))
    payload = pickle([x, ...])                  convention BARE:     fn(x)
              pickle([args, ...])               convention STAR:     fn(*args)
              pickle([(args, kwargs), ...])     convention KEYWORDS: fn(*args, **kwargs)
    b""     (an empty message) asks the worker to exit

worker -> parent, two messages per chunk (the parent's dispatcher reads only
the small first one; the results are unpickled by the consumer's thread)::

    pickle((chunk_id, busy_s))
    pickle(("values", [result, ...]))                 every item succeeded, or
    pickle(("outcomes", [(ok, value | ShippedError)]))

and, instead, once: pickle(("init-error", ShippedError)) when the initializer
raised; the worker then exits.

Shared memory, written only by this worker, read by the parent's dispatcher:
``status[2*slot]`` is the position in the chunk of the item now running
(-1 while the chunk is being unpacked) and ``status[2*slot+1]`` the
``time.monotonic()`` at which it started (0 when idle). That lets the parent
blame exactly the right item when this process dies or runs late, without a
message per item.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .._errors import SerializationError
from .._execute import ShippedError
from .._stop import StopToken, running
from .._task import Outcome

__all__ = ["BARE", "KEYWORDS", "NATIVE_THREAD_VARS", "STAR", "WORKER_FN_CACHE", "worker_main"]

NATIVE_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)
"""Environment variables native libraries read for their thread-pool size."""

ORPHAN_CHECK_S = 0.5
"""How often a worker checks that its parent is alive. Off the hot path (a
daemon thread); bounds how long workers outlive a SIGKILLed parent."""

WORKER_FN_CACHE = 64
"""Functions a worker keeps unpickled, least recently used dropped first; the
parent mirrors this cache to know when it must send a function again."""

_PICKLE = pickle.HIGHEST_PROTOCOL
_NO_KWARGS: dict[str, Any] = {}

BARE, STAR, KEYWORDS = 0, 1, 2
"""Calling conventions of a chunk's payload entries (see the protocol above)."""


def worker_main(
    conn: Connection,
    slot: int,
    status: Any,
    cancel_flag: Any,
    init_blob: bytes | None,
    native_threads: int,
) -> None:
    """Entry point of every worker process."""
    # Ctrl-C goes to the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_native_threads(native_threads)
    _watch_parent()
    if init_blob is not None:
        try:
            initializer, initargs = pickle.loads(init_blob)
            initializer(*initargs)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the items
            conn.send_bytes(pickle.dumps(("init-error", _shippable(exc)), _PICKLE))
            return
    functions: OrderedDict[int, Callable[..., Any]] = OrderedDict()
    # A typed view of the shared status array: item assignment through it
    # costs ~30 ns, a third of ctypes' own __setitem__ (paid once per item).
    view = memoryview(status).cast("B").cast("d")  # type: ignore[arg-type]
    base = 2 * slot
    while True:
        try:
            header = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent is gone
        if not header:
            return
        view[base] = -1
        view[base + 1] = time.monotonic()
        chunk_id, fn_id, fn_blob, epoch, convention, timed = pickle.loads(header)
        payload = pickle.loads(conn.recv_bytes())
        if fn_blob is not None:
            functions[fn_id] = pickle.loads(fn_blob)
            if len(functions) > WORKER_FN_CACHE:
                functions.popitem(last=False)
        else:
            functions.move_to_end(fn_id)
        started = time.perf_counter()
        with running(StopToken(cancel_flag, epoch)):
            kind, results = _run_chunk(functions[fn_id], payload, convention, timed, view, base)
        busy_s = time.perf_counter() - started
        view[base + 1] = 0.0
        conn.send_bytes(pickle.dumps((chunk_id, busy_s), _PICKLE))
        conn.send_bytes(_dump_results(kind, results))


def _run_chunk(
    fn: Callable[..., Any],
    payload: list[Any],
    convention: int,
    timed: bool,
    view: memoryview,
    base: int,
) -> tuple[str, list[Any]]:
    """Run every item; ("values", results) if all succeeded, else ("outcomes", [(ok, value)]).

    The common case (no keywords, no timeout, no error) is a tight loop that
    only records the item's position for crash blame.
    """
    values: list[Any] = []
    append = values.append
    outcomes: list[Outcome] = []
    if convention != KEYWORDS and not timed:
        try:
            if convention == BARE:
                for position, arg in enumerate(payload):
                    view[base] = position
                    append(fn(arg))
            else:
                for position, args in enumerate(payload):
                    view[base] = position
                    append(fn(*args))
            return "values", values
        except Exception as exc:  # noqa: BLE001 - this item fails; the rest go below
            outcomes = [(True, value) for value in values]
            outcomes.append((False, exc))
    for position in range(len(outcomes), len(payload)):
        view[base] = position
        if timed:
            view[base + 1] = time.monotonic()
        entry = payload[position]
        if convention == KEYWORDS:
            args, kwargs = entry
        else:
            args, kwargs = (entry,) if convention == BARE else entry, _NO_KWARGS
        try:
            outcomes.append((True, fn(*args, **kwargs)))
        except Exception as exc:  # noqa: BLE001 - every failure is that item's outcome
            outcomes.append((False, exc))
    if all(ok for ok, _ in outcomes):
        return "values", [value for _, value in outcomes]
    return "outcomes", outcomes


def _dump_results(kind: str, results: list[Any]) -> bytes:
    """Pickle the results; an item whose result or error won't pickle fails alone."""
    if kind == "outcomes":
        results = [(ok, value if ok else _shippable(value)) for ok, value in results]
    try:
        return pickle.dumps((kind, results), _PICKLE)
    except Exception:  # noqa: BLE001 - find the culprit(s) below
        pass
    outcomes = results if kind == "outcomes" else [(True, value) for value in results]
    for i, (ok, value) in enumerate(outcomes):
        try:
            pickle.dumps(value, _PICKLE)
        except Exception as exc:  # noqa: BLE001
            what = "result" if ok else "exception"
            error = SerializationError(
                f"the {what} of this item could not be pickled to send it back: "
                f"{type(exc).__name__}: {exc}"
            )
            outcomes[i] = (False, ShippedError(error))
    return pickle.dumps(("outcomes", outcomes), _PICKLE)


def _shippable(exc: BaseException) -> ShippedError:
    """The exception with its traceback, or a stand-in if it would not survive pickling."""
    shipped = ShippedError(exc)
    try:
        pickle.loads(pickle.dumps(exc, _PICKLE))  # errors are rare: checking is cheap
    except Exception as problem:  # noqa: BLE001
        stand_in = SerializationError(
            f"{type(exc).__name__}: {exc} (the original exception could not be "
            f"pickled: {type(problem).__name__}: {problem})"
        )
        fallback = ShippedError(stand_in)
        fallback.tb = shipped.tb
        return fallback
    return shipped


def _limit_native_threads(threads: int) -> None:
    """Keep workers x BLAS/OpenMP threads within the cores (no oversubscription)."""
    for name in NATIVE_THREAD_VARS:
        os.environ[name] = str(threads)
    # Libraries loaded before the fork already sized their pools: resize them.
    if any(name in sys.modules for name in ("numpy", "scipy", "torch", "sklearn")):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)


def _watch_parent() -> None:
    """Exit when orphaned, so a SIGKILLed parent leaves no workers behind.

    The kernel re-parents orphans at once, so a changed parent id is the
    signal. (Under forkserver our parent is the fork server, which itself
    exits when the powerpool process dies.)
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="powerpool-orphan-watch", daemon=True).start()

"""The unit of work that travels between the pool core and a backend.

The pool core (``_run.py``, ``_pool.py``) cuts the caller's items into
:class:`Chunk` s; a backend runs each chunk somewhere and hands back one
:class:`ChunkResult` holding one outcome per item, in the chunk's order.
Backends never retry, reorder or count: that is the core's job, written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "IN_CALLER_WORKER",
    "NO_KWARGS",
    "Chunk",
    "ChunkResult",
    "Item",
    "ItemLost",
    "Measures",
    "Outcome",
    "WorkerTiming",
]

IN_CALLER_WORKER = "serial"
"""``ChunkResult.worker`` of chunks run in the caller's own thread (the serial
backend): reports draw them apart from work done in a pool."""

Item = tuple[int, tuple[Any, ...], dict[str, Any]]
"""One call: (index in the caller's input, positional args, keyword args)."""

Outcome = tuple[bool, Any]
"""(True, result) or (False, exception) for one item."""


class WorkerTiming(NamedTuple):
    """A chunk's phases as its worker process measured them (``perf_counter`` clock)."""

    received_s: float
    """When the chunk's header arrived in the worker."""
    receive_s: float
    """Seconds spent receiving the arguments from the pipe (transfer)."""
    unpack_s: float
    """Seconds unpickling the arguments (and the function, the first time)."""
    started_s: float
    """When the first item started."""
    item_ends_s: list[float] | None
    """When each item ended (small chunks only, see ITEM_TRACE_MAX_ITEMS)."""
    pickle_s: float
    """Seconds pickling the results."""


class Measures(NamedTuple):
    """What the worker measured while it ran one chunk (the evidence ``auto`` decides on).

    Measured where the items ran, never in the caller's thread: a worker
    process reports its whole-process CPU time (native thread pools
    included), a worker thread its own thread's CPU time.
    """

    cpu_s: float
    """CPU seconds spent while the chunk ran."""
    first: bool
    """The function was loaded for this chunk (its first call in this worker):
    the time may include warm-up such as imports and caches filling."""
    gil: float | None = None
    """Heartbeat score of GIL holding, 0..1 (only for chunks sent with ``probe``;
    None when not asked for or too short to tell)."""
    wire_bytes: int = 0
    """Pickled arguments plus results that crossed a process boundary (0 in-process)."""
    queued_s: float = 0.0
    """Seconds the running thread was ready but waited for a CPU (a loaded machine;
    Linux schedstat, else 0): neither computing nor waiting."""
    blocks: int = -1
    """Times the running thread blocked (voluntary context switches: I/O, sleep,
    locks) while the chunk ran; -1 when not measured (not Linux, or a GIL
    heartbeat ran alongside and caused switches of its own)."""


class ItemLost(Exception):
    """Outcome for an item that never ran because its worker died on another item.

    The core re-queues such items without counting a retry: they did nothing wrong.
    """


def _always() -> bool:
    return True


NO_KWARGS: dict[str, Any] = {}
"""Shared empty keyword arguments (never mutated)."""


class Chunk:
    """A batch of calls of one function, sent to one worker in one message.

    Stored as columns: ``args`` (one tuple per call, or, when ``star`` is
    False, the single bare argument of each call), ``indices`` (a ``range``
    for fresh input, a list for re-queued items) and ``kwargs`` (None when no
    call has any). Fresh chunks are cut from the input with ``islice``, so the
    core does no Python work per item, and ``map(fn, xs)`` never even wraps
    each x in a tuple (allocating, tracking and pickling a million 1-tuples is
    most of the cost of a pool over trivial items). ``items`` builds per-item
    tuples only for the slow paths (errors, retries, timeouts).
    """

    __slots__ = (
        "args",
        "claim",
        "epoch",
        "fn",
        "id",
        "indices",
        "kwargs",
        "on_done",
        "probe",
        "recorder",
        "scope",
        "star",
        "timeout_s",
    )

    def __init__(
        self,
        id: int,
        fn: Callable[..., Any],
        items: list[Item] | None = None,
        timeout_s: float | None = None,
        epoch: int = 0,
        claim: Callable[[], bool] = _always,
        on_done: Callable[[ChunkResult], None] | None = None,
        *,
        star: bool = True,
        scope: object | None = None,
    ) -> None:
        self.id = id
        """Unique within the pool; used by backends' ledgers."""
        self.fn = fn
        """The function to call for every item."""
        self.timeout_s = timeout_s
        """Per-item time limit in seconds, or None for none."""
        self.epoch = epoch
        """Cancel epoch at submission; ``should_stop()`` turns true once the
        pool's cancelled epoch reaches it."""
        self.claim = claim
        """Called by the backend just before it starts the chunk; False means the
        chunk was cancelled meanwhile and must be dropped without a result."""
        self.on_done = on_done
        """Where the pool core wants this chunk's result; backends call the
        ``deliver`` they were given, which routes here."""
        self.indices: range | list[int]
        """Input index of each call."""
        self.args: list[Any]
        """Positional arguments of each call: a tuple, or the bare argument if not ``star``."""
        self.scope = scope
        """What the chunk belongs to (its run), or None. Backends that copy large
        arguments into shared memory copy an object once per scope; the copy
        goes when the scope object does."""
        self.star = star
        """Whether ``args`` holds argument tuples (True) or single bare arguments."""
        self.recorder: Any = None
        """The run's :class:`~powerpool._recorder.Recorder` when a report was asked
        for (backends then measure more, e.g. each item's time); None otherwise."""
        self.probe = False
        """Ask the worker to measure GIL holding while it runs this chunk (auto's evidence)."""
        self.kwargs: list[dict[str, Any]] | None
        """Keyword arguments of each call, or None when every call has none."""
        if items is not None:
            self.items = items
        else:  # filled in by the core as it cuts fresh input (see Run._take)
            self.args = []
            self.indices = range(0)
            self.kwargs = None

    @property
    def items(self) -> list[Item]:
        """The calls as (index, args, kwargs) tuples (built on demand)."""
        kwargs = self.kwargs or [NO_KWARGS] * len(self.args)
        args = self.args if self.star else [(arg,) for arg in self.args]
        return list(zip(self.indices, args, kwargs))

    @items.setter
    def items(self, items: list[Item]) -> None:
        self.indices = [index for index, _, _ in items]
        self.args = [args for _, args, _ in items]
        self.star = True
        kwargs = [kw for _, _, kw in items]
        self.kwargs = kwargs if any(kwargs) else None

    def __len__(self) -> int:
        return len(self.args)


class ChunkResult:
    """What a backend reports for a finished (or failed) chunk.

    A backend gives either ``outcomes`` (one ``(ok, value)`` per item) or, on
    the hot path where every item succeeded, just ``values``; the process
    backend may give ``decode``, a function producing either, so that
    unpickling happens in the thread that consumes the results rather than in
    its dispatcher (two threads contending for the GIL is what makes
    pipelines of trivial items slow).
    """

    __slots__ = (
        "_decode",
        "_outcomes",
        "_values",
        "busy_s",
        "chunk",
        "measures",
        "nbytes",
        "started_s",
        "timing",
        "worker",
    )

    def __init__(
        self,
        chunk: Chunk,
        outcomes: list[Outcome] | None = None,
        worker: str = "",
        busy_s: float = 0.0,
        *,
        values: list[Any] | None = None,
        decode: Callable[[], tuple[list[Outcome] | None, list[Any] | None]] | None = None,
        started_s: float = 0.0,
        timing: Any = None,
        nbytes: int | None = None,
        measures: Measures | None = None,
    ) -> None:
        self.chunk = chunk
        """The chunk this result belongs to."""
        self.worker = worker
        """Name of the worker that ran it (for statistics)."""
        self.busy_s = busy_s
        """Seconds the worker spent computing the chunk (excludes queueing and IPC)."""
        self.started_s = started_s
        """``time.perf_counter()`` in the worker when it began computing (one
        clock for every process of a machine: CLOCK_MONOTONIC on Linux); 0.0
        when the backend does not say."""
        self.timing = timing
        """What a backend measured for the run recorder (a
        :class:`WorkerTiming`), only for chunks with a
        recorder; None otherwise."""
        self.nbytes = nbytes
        """Bytes the chunk's results took in transit (pickled, shared memory
        included), when the backend measured it; None otherwise."""
        self.measures = measures
        """CPU time and the like, when the backend measured them (None: not measured)."""
        self._outcomes = outcomes
        self._values = values
        self._decode = decode

    def _resolve(self) -> None:
        if self._decode is not None:
            self._outcomes, self._values = self._decode()
            self._decode = None

    @classmethod
    def failed(cls, chunk: Chunk, error: BaseException, worker: str) -> ChunkResult:
        """Every item of ``chunk`` failed with ``error`` before any ran (no compute time)."""
        return cls(chunk, [(False, error)] * len(chunk), worker, 0.0)

    @classmethod
    def of(
        cls,
        chunk: Chunk,
        outcomes: list[Outcome],
        worker: str,
        busy_s: float,
        started_s: float = 0.0,
        measures: Measures | None = None,
    ) -> ChunkResult:
        """The result of ``outcomes``, as plain values when all succeeded (the core's fast path)."""
        if all(ok for ok, _ in outcomes):
            values = [value for _, value in outcomes]
            return cls(
                chunk,
                None,
                worker,
                busy_s,
                values=values,
                started_s=started_s,
                measures=measures,
            )
        return cls(chunk, outcomes, worker, busy_s, started_s=started_s, measures=measures)

    @property
    def values(self) -> list[Any] | None:
        """The results, in item order, if every item succeeded; else None."""
        self._resolve()
        return self._values

    @property
    def outcomes(self) -> list[Outcome]:
        """One ``(ok, value)`` per item of ``chunk.items``, same order."""
        self._resolve()
        if self._outcomes is None:
            self._outcomes = [(True, value) for value in self._values or ()]
        return self._outcomes

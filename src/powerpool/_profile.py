"""Measure a sample of the real work, and say what kind of work it is.

:func:`profile` (public) and :func:`profile_calls` (used by ``backend="auto"``)
run the caller's function on a few real items in the calling thread and
return a frozen :class:`Profile`: time per item (wall, calling-thread CPU,
whole-process CPU), how much of that time the GIL was held, how big and how
slow the arguments and results are to pickle, memory, optional cProfile hot
spots, and a :class:`Workload` class with the evidence for it. On request,
line timings (``lines=``, :mod:`~powerpool._lineprof`) and memory per item
(``memory=True``, :mod:`~powerpool._memprof`) are taken by item probes that
bracket each sampled item.

How the GIL is measured: while the items run, a heartbeat thread sleeps
1 ms again and again (:class:`~powerpool._probes.Heartbeat`). Waking needs
the GIL: if the function holds it (pure Python), every tick must block until
the interpreter forces a switch (5 ms later); if it releases it (sleeping,
hashlib on big buffers, zlib, most numpy loops), ticks never block. On Linux
the heartbeat's voluntary context switches are counted (a tick that only
slept costs one; a tick that also waited for the GIL, two or more), which
a loaded machine does not disturb: waiting for a CPU is not voluntary. The
score is near 1 for GIL-holding code and near 0 for GIL-releasing code.

How computing is told from waiting: CPU time against the time the calling
thread was blocked, leaving out the time it was queued for a CPU (Linux
schedstat), so a CPU-bound item on a busy machine does not look like waiting.

Cost discipline (``auto`` profiles every run): the first call is timed bare.
Only if an item takes at least ``HEAVY_CALL_S`` does the profiler start the
heartbeat thread and read memory; sampling 8 trivial calls costs about
0.1 ms. With ``stop_early`` (the default of :func:`profile_calls`) one slow
waiting item is enough evidence and sampling stops after it; slow computing
items get one more item with the heartbeat, more only while its evidence is
thin or mixed (at most ``SLOW_MAX_ITEMS``).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _probes
from ._decide import IO_MAX_BUSY, TINY_S  # one threshold for the profiler and auto
from ._probes import Heartbeat, SchedClock, pickle_cost

if TYPE_CHECKING:
    from ._itemprobe import ItemProbe
    from ._lineprof import LineTiming
    from ._memprof import ItemMemory

__all__ = [
    "Hotspot",
    "Profile",
    "Workload",
    "format_bytes",
    "format_seconds",
    "profile",
    "profile_calls",
]

Call = tuple[tuple[Any, ...], dict[str, Any]]
"""One call of the function: (positional args, keyword args)."""
Outcome = tuple[bool, Any]
"""(True, result) or (False, exception) for one call."""

HEAVY_CALL_S = 200e-6
"""An item at least this slow turns on the heartbeat thread and memory readings.
Starting and joining the thread costs ~0.2 ms; below this the work is too light
for the GIL measurement to pay for itself (or to matter)."""
SLOW_ITEM_S = 5e-3
"""With ``stop_early``, a first item at least this slow that waits ends sampling
at once: 400 x 20 ms sleeps are profiled in ~20 ms. One that computes gets one
more item with the heartbeat running, because telling GIL-holding from
GIL-releasing work needs the heartbeat, and threads versus processes hangs on it."""
NATIVE_THREADS_RATIO = 1.2
"""Process CPU above this multiple of wall time proves code ran outside the GIL
in several threads at once (BLAS, OpenMP): one Python thread cannot do that."""
GIL_HELD_MIN = 0.5
"""Heartbeat score from which the GIL counts as held. GIL-holding code scores
~1, GIL-releasing code ~0 (up to ~0.4 when it also runs some Python), so the
midpoint leaves margin both ways."""
GIL_UNCLEAR = (0.15, 0.85)
"""With ``stop_early``, a GIL score in this band after the slow items sampled so
far buys one more item (within the budget). Idle machines score ~0 or ~1; on a
heavily loaded one a single item can land in between."""
SLOW_MAX_ITEMS = 4
"""...but, with ``stop_early``, no more than this many slow items in all: past
that, the score is judged at ``GIL_HELD_MIN`` whatever it is."""
GIL_MIN_TICKS = 2
"""...and so does a score resting on fewer heartbeat ticks than this: one tick
can be off by one switch at an item's boundary, or stuck in a run queue."""
WARMUP_FACTOR = 3.0
"""A first call slower than this multiple of the median of the others (a cold
cache, a lazy import) is left out of the per-item means."""
PICKLE_SAMPLES = 3
"""How many sampled arguments and results are pickled to estimate IPC cost."""
HOTSPOT_LIMIT = 8
"""How many hot spots a profile keeps."""
ASYNC_BATCH = 4
"""Coroutines run concurrently when profiling a coroutine function."""

_OWN_FILES = frozenset(os.path.normcase(os.path.abspath(f)) for f in (__file__, _probes.__file__))
"""The profiler's own source files: their frames never count as hot spots."""


class Workload(str, enum.Enum):
    """What limits the work, as measured.

    * ``io``: the item mostly waits (network, disk, sleep): threads overlap it.
    * ``cpu-gil``: it computes in Python and holds the GIL: processes parallelize it.
    * ``cpu-native``: it computes in native code that releases the GIL (numpy,
      hashlib on big buffers, zlib) or in native threads: threads parallelize it.
    * ``async``: a coroutine function: an event loop overlaps it.
    * ``tiny``: each item is cheaper than any pool's per-item overhead: run a loop.
    """

    IO = "io"
    CPU_GIL = "cpu-gil"
    CPU_NATIVE = "cpu-native"
    ASYNC = "async"
    TINY = "tiny"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Hotspot:
    """One function from the cProfile run (``hotspots=True``)."""

    function: str
    """``name (file:line)``, or the built-in's name."""
    calls: int
    """How many times it was called during the sample."""
    cumulative_s: float
    """Seconds spent in it and its callees, summed over the whole sample."""
    own_s: float = 0.0
    """Seconds spent in its own code, callees excluded."""

    def __str__(self) -> str:
        return (
            f"{self.function}: {format_seconds(self.cumulative_s)} cumulative, "
            f"{format_seconds(self.own_s)} own, {self.calls} calls"
        )


@dataclass(frozen=True, repr=False)
class Profile:
    """What running the function on a sample of real items showed.

    Times are means per item; a first call much slower than the rest (cold
    cache, lazy import) is left out of the means and noted in ``evidence``.
    With ``hotspots=True`` the times include cProfile's own overhead.
    """

    items: int
    """Number of items that ran (every one exactly once)."""
    wall_per_item_s: float
    """Wall-clock seconds per item (for coroutines: latency of one coroutine)."""
    cpu_per_item_s: float
    """Process CPU seconds per item: every thread, native thread pools included."""
    thread_cpu_per_item_s: float
    """CPU seconds per item spent in the calling thread only."""
    gil_held_fraction: float
    """0..1, the heartbeat's score: GIL waits per heartbeat tick (Linux) or its
    lateness over the switch interval (elsewhere); ~1: the function holds the
    GIL, ~0: it releases it. 0.0 when not measured, see ``gil_measured``."""
    arg_pickle_bytes: int
    """Mean pickled size of one item's arguments, bytes (0: not measured)."""
    result_pickle_bytes: int
    """Mean pickled size of one result, bytes (0: not measured)."""
    pickle_per_item_s: float
    """Seconds to pickle and unpickle one item's arguments and result."""
    peak_rss_bytes: int
    """Highest resident memory of this process seen while sampling, bytes: read
    around each item, plus getrusage's lifetime peak if it rose meanwhile
    (0: not measured, items lighter than ``HEAVY_CALL_S``)."""
    workload: Workload
    """The classification (see :class:`Workload`)."""
    evidence: tuple[str, ...]
    """Measurements behind ``workload``, in plain words."""
    hotspots: tuple[Hotspot, ...]
    """Top functions by cumulative time (empty unless ``hotspots=True``)."""
    profiling_s: float
    """Total seconds the profile took, running the items included."""
    function: str = ""
    """Qualified name of the profiled function."""
    max_wall_s: float = 0.0
    """Wall-clock seconds of the slowest item."""
    errors: int = 0
    """How many of the sampled items raised."""
    gil_measured: bool = False
    """Whether the heartbeat measured the GIL (items long enough, GIL enabled);
    when not, CPU-bound work is assumed to hold it."""
    gil_disabled: bool = False
    """True on a free-threaded build running with the GIL off: threads run
    Python code in parallel."""
    fn_pickle_bytes: int = 0
    """Pickled size of the function itself, sent once per worker (0: not measured)."""
    needs_cloudpickle: bool = False
    """Plain pickle failed on the function, an argument or a result; cloudpickle worked."""
    unpicklable: str | None = None
    """Why the function, an argument or a result cannot be pickled at all
    (so it cannot go to another process), or None."""
    rss_growth_bytes: int = 0
    """How far resident memory rose above its level before the sampled items."""
    overhead_s: float = 0.0
    """Seconds the profiler added on top of running the items (``profiling_s``
    minus their wall time)."""
    runqueue_per_item_s: float = 0.0
    """Seconds per item the calling thread was ready but waited for a CPU (a
    loaded machine); left out when judging computing against waiting. Linux
    only, else 0."""
    line_timings: tuple[LineTiming, ...] = ()
    """Slowest source lines, slowest first (empty unless ``lines=``)."""
    memory_items: tuple[ItemMemory, ...] = ()
    """Memory peak and top allocation sites of each sampled item (empty unless
    ``memory=True``)."""
    peak_alloc_bytes: int = 0
    """The largest memory peak one item allocated, bytes, from tracemalloc
    (0: not measured, see ``memory_items``)."""

    @property
    def cpu_ratio(self) -> float:
        """Process CPU / wall time per item (0: waiting, 1: one busy core, >1: several)."""
        return self.cpu_per_item_s / self.wall_per_item_s if self.wall_per_item_s > 0 else 0.0

    @property
    def uses_native_threads(self) -> bool:
        """Whether the item kept more than one core busy through native threads."""
        return self.cpu_ratio > NATIVE_THREADS_RATIO

    def __str__(self) -> str:
        name = self.function or "function"
        lines = [
            f"{name}: {self.workload.value} ({self.items} items sampled in "
            f"{format_seconds(self.profiling_s)})"
        ]
        gil = (
            f"GIL held {self.gil_held_fraction:.0%}"
            if self.gil_measured
            else "GIL off"
            if self.gil_disabled
            else "GIL not measured"
        )
        lines.append(
            f"  per item  {format_seconds(self.wall_per_item_s)} wall, "
            f"{format_seconds(self.cpu_per_item_s)} CPU (calling thread "
            f"{format_seconds(self.thread_cpu_per_item_s)}), {gil}"
        )
        if self.unpicklable:
            lines.append(f"  pickling  impossible: {self.unpicklable}")
        elif not (self.arg_pickle_bytes or self.result_pickle_bytes or self.fn_pickle_bytes):
            lines.append("  pickling  not measured (only CPU work could go to processes)")
        else:
            fn_size = (
                f", function {format_bytes(self.fn_pickle_bytes)}" if self.fn_pickle_bytes else ""
            )
            lines.append(
                f"  pickling  args {format_bytes(self.arg_pickle_bytes)}, result "
                f"{format_bytes(self.result_pickle_bytes)}, "
                f"{format_seconds(self.pickle_per_item_s)} per item{fn_size}"
                + (" (cloudpickle)" if self.needs_cloudpickle else "")
            )
        if self.peak_rss_bytes:
            lines.append(
                f"  memory    peak RSS {format_bytes(self.peak_rss_bytes)} "
                f"(+{format_bytes(self.rss_growth_bytes)} while sampling)"
            )
        if self.errors:
            lines.append(f"  errors    {self.errors} of {self.items} items raised")
        lines.extend(f"  - {line}" for line in self.evidence)
        if self.hotspots:
            lines.append("  hot spots")
            lines.extend(f"    {i}. {spot}" for i, spot in enumerate(self.hotspots, 1))
        if self.line_timings:
            from ._lineprof import format_lines

            lines.extend(format_lines(self.line_timings))
        if self.memory_items:
            from ._memprof import format_memory

            lines.extend(format_memory(self.memory_items, self.peak_alloc_bytes))
        return "\n".join(lines)

    def __repr__(self) -> str:
        # What a REPL or a notebook shows for a bare ``prof``: the readable
        # report that print() gives, not the dataclass's wall of fields.
        return str(self)

    def _repr_html_(self) -> str:
        from ._report_html import text_html

        return text_html(str(self))


def format_seconds(seconds: float) -> str:
    """``0.0000012`` -> ``"1.2 us"``; ``0.25`` -> ``"250 ms"``."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def format_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- public entry points


def profile(
    fn: Callable[..., Any],
    sample: Iterable[Any],
    *,
    max_items: int = 8,
    max_seconds: float = 0.5,
    hotspots: bool = False,
    lines: bool | str = False,
    memory: bool = False,
    star: bool = False,
) -> Profile:
    """Run ``fn`` on up to ``max_items`` items of ``sample`` and describe the work.

    Each element of ``sample`` is one argument (``star=True``: a tuple of
    arguments). Items run one at a time in the calling thread, until
    ``max_items`` ran or the next one would overrun ``max_seconds``.
    Exceptions from ``fn`` are counted in ``errors``, not raised.
    ``hotspots=True`` also runs cProfile (slows pure Python ~2x).
    ``lines=True`` times each line of ``fn`` with line_profiler
    (``pip install "powerpool[profile]"``); ``lines="file"`` also the lines
    of every function and method defined in ``fn``'s source file.
    ``memory=True`` records each item's memory peak and the lines that
    allocated it, with tracemalloc. Both slow the items and show in
    ``line_timings``, ``memory_items`` and the printed report.
    """
    from ._itemprobe import item_probes

    probes = item_probes(fn, lines=lines, memory=memory)
    calls: Iterator[Call] = ((tuple(x), {}) if star else ((x,), {}) for x in sample)
    prof, _ = profile_calls(
        fn,
        calls,
        max_items=max_items,
        max_seconds=max_seconds,
        hotspots=hotspots,
        stop_early=False,
        thorough=True,
        probes=probes,
    )
    if prof.items == 0:
        raise ValueError("profile() needs a sample with at least one item")
    return prof


def profile_calls(
    fn: Callable[..., Any],
    calls: Iterable[Call],
    *,
    max_items: int = 8,
    max_seconds: float = 0.3,
    hotspots: bool = False,
    stop_early: bool = True,
    thorough: bool = False,
    probes: Sequence[ItemProbe] = (),
) -> tuple[Profile, list[Outcome]]:
    """Profile ``fn`` on calls pulled one at a time from ``calls``; keep the outcomes.

    Each consumed call runs exactly once in the calling thread (a coroutine
    function's coroutines on a private event loop, in a helper thread if this
    thread already runs a loop). Returns the profile and the outcomes, in
    order, of exactly the calls consumed: ``(True, result)`` or
    ``(False, exception)`` with its traceback; exceptions are never raised
    (an exception raised by ``calls`` itself propagates).

    Sampling stops after ``max_items`` calls, when the next call would overrun
    ``max_seconds``, and with ``stop_early`` after one slow (>= 5 ms) waiting
    item, or 2 to 4 slow computing ones (more while the heartbeat's evidence
    is thin or mixed). ``thorough`` (used by :func:`profile`)
    measures pickling even for work that no process pool would get.
    ``probes`` (see :func:`~powerpool._itemprobe.item_probes`) bracket each item.
    An empty ``calls`` gives a profile with ``items == 0``.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    budget = _Budget(max_items, max_seconds, hotspots, stop_early, time.perf_counter(), probes)
    it = iter(calls)
    if _is_coroutine_function(fn):
        raw = _sample_async(fn, it, None, budget)
    else:
        raw = _sample_sync(fn, it, budget)
    prof = _build_profile(fn, raw, budget.t_start, thorough)
    if probes:
        fields: dict[str, Any] = {}
        notes: list[str] = []
        for probe in probes:
            fields.update(probe.fields(sum(raw.walls)))
            notes.extend(probe.notes)
        prof = dataclasses.replace(prof, evidence=(*prof.evidence, *notes), **fields)
    return prof, raw.outcomes


# --------------------------------------------------------------------------- sampling


# The two private records below are plain classes, not dataclasses: building a
# dataclass costs ~1 ms at import, and this module is imported on the first
# ``auto`` run, whose budget on tiny work is a fraction of a list comprehension.


class _Budget:
    """How much sampling a call of :func:`profile_calls` may do."""

    __slots__ = ("hotspots", "max_items", "max_seconds", "probes", "stop_early", "t_start")

    def __init__(
        self,
        max_items: int,
        max_seconds: float,
        hotspots: bool,
        stop_early: bool,
        t_start: float,
        probes: Sequence[ItemProbe] = (),
    ) -> None:
        self.max_items = max_items
        self.max_seconds = max_seconds
        self.hotspots = hotspots
        self.stop_early = stop_early
        self.t_start = t_start
        self.probes = probes


class _Raw:
    """Measurements collected while sampling, one list entry per item."""

    __slots__ = (
        "calls",
        "gil",
        "gil_window_s",
        "hotspots",
        "is_async",
        "notes",
        "outcomes",
        "peak_rss",
        "process_cpus",
        "rss_growth",
        "runqueues",
        "thread_cpus",
        "walls",
    )

    def __init__(self, *, is_async: bool = False) -> None:
        self.outcomes: list[Outcome] = []
        self.calls: list[Call] = []  # the first PICKLE_SAMPLES calls
        self.walls: list[float] = []
        self.thread_cpus: list[float] = []
        self.process_cpus: list[float] = []
        self.runqueues: list[float] = []  # wait for a CPU, first and heavy items only
        self.is_async = is_async
        self.gil: tuple[float, int, float] | None = None  # score, ticks, median lateness
        self.gil_window_s = 0.0
        self.peak_rss = 0
        self.rss_growth = 0
        self.hotspots: tuple[Hotspot, ...] = ()
        self.notes: list[str] = []


def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
    # A separate frame so that hot-spot filtering can tell the user's function
    # (called from here) from the profiler's own bookkeeping.
    try:
        return True, fn(*args, **kwargs)
    except Exception as exc:
        return False, exc


def _sample_sync(fn: Callable[..., Any], it: Iterator[Call], budget: _Budget) -> _Raw:
    raw = _Raw()
    perf, thread_time, process_time = time.perf_counter, time.thread_time, time.process_time
    prof = _start_cprofile(raw) if budget.hotspots else None
    beat: Heartbeat | None = None
    sched = SchedClock()
    heavy = False
    limit = max_items = budget.max_items
    total_wall = 0.0
    gil_disabled = _gil_disabled()  # then there is no GIL to measure
    beat_failed = False
    max_seconds, t_start = budget.max_seconds, budget.t_start
    try:
        for call in it:
            if heavy and beat is None and not beat_failed:
                try:
                    beat = Heartbeat()
                except RuntimeError as exc:  # "can't start new thread": measure without it
                    beat_failed = True
                    raw.notes.append(f"heartbeat thread unavailable ({exc}): GIL not measured")
            args, kwargs = call
            if beat is not None:
                beat.begin()
            # The run-queue clock costs a microsecond or two: read around the
            # first item and heavy ones only, where a loaded machine matters.
            queued = sched.waited_s() if heavy or not raw.outcomes else None
            for probe in budget.probes:
                probe.before()
            c0, p0 = thread_time(), process_time()
            w0 = perf()  # innermost, so the CPU clocks' own cost is not wall time
            outcome = _invoke(fn, args, kwargs)
            w1 = perf()
            p1, c1 = process_time(), thread_time()
            for probe in reversed(budget.probes):  # nested: line_profiler wraps the tracer
                probe.after(len(raw.outcomes), 1)
            if beat is not None:
                beat.end(w0, w1)
            if queued is not None:
                raw.runqueues.append(sched.waited_s() - queued)
            wall = w1 - w0
            total_wall += wall
            raw.outcomes.append(outcome)
            raw.walls.append(wall)
            raw.thread_cpus.append(c1 - c0)
            raw.process_cpus.append(p1 - p0)
            if len(raw.calls) < PICKLE_SAMPLES:
                raw.calls.append(call)
            n = len(raw.outcomes)
            if n == 1 and outcome[0] and inspect.iscoroutine(outcome[1]):
                # A plain function that returns coroutines: profile it as async.
                if prof is not None:
                    prof.disable()
                    prof = None
                return _sample_async(fn, it, (call, outcome[1]), budget)
            if beat is not None and n == 2 and wall < HEAVY_CALL_S:
                # Only the first item was heavy (warm-up): a heartbeat
                # contending for the GIL would distort these light items.
                beat.stop()
                beat = None
                heavy = False
            heavy = heavy or wall >= HEAVY_CALL_S
            spent = w1 - t_start
            if (
                n == 2
                and limit == 2 < max_items
                and wall < SLOW_ITEM_S
                and wall * WARMUP_FACTOR < raw.walls[0]
            ):
                # The slow first item was warm-up (a lazy import, a cold cache)
                # and the real items are light: sample them as light items.
                limit = max_items
            if (
                n >= limit
                and limit < min(max_items, SLOW_MAX_ITEMS)
                and beat is not None
                and not gil_disabled
                and spent + wall <= max_seconds
                and _unclear(beat)
            ):
                limit += 1  # the GIL evidence is mixed (a loaded machine): one more item
            if n >= limit:
                raw.notes.append(
                    f"stopped after {n} items (max_items)"
                    if n == max_items
                    else f"stopped after {n} items: the first was slow and busy, "
                    f"the others ran with the heartbeat to measure the GIL"
                )
                break
            if spent + total_wall / n > max_seconds:
                raw.notes.append(
                    f"stopped after {n} items: time budget {format_seconds(max_seconds)} spent"
                )
                break
            if n == 1 and budget.stop_early and wall >= SLOW_ITEM_S:
                busy = _busy(wall, c1 - c0, p1 - p0, raw.runqueues[0])
                if busy < IO_MAX_BUSY or gil_disabled:
                    raw.notes.append(
                        f"stopped after 1 item: one slow item "
                        f"({format_seconds(wall)}) is enough evidence"
                    )
                    break
                if spent + wall > max_seconds:
                    raw.notes.append("stopped after 1 item: a second would overrun the time budget")
                    break
                limit = 2
    finally:
        for probe in reversed(budget.probes):  # an item interrupted (Ctrl-C) leaves none on
            probe.after(len(raw.outcomes), 1)
        if prof is not None:
            prof.disable()
        if beat is not None:
            beat.stop()
        sched.close()
    if beat is not None:
        raw.gil, raw.gil_window_s = beat.gil_estimate()
        raw.peak_rss, raw.rss_growth = beat.peak_rss, beat.rss_growth
    if prof is not None:
        raw.hotspots = _hotspots(prof)
    return raw


def _unclear(beat: Heartbeat) -> bool:
    """Whether the heartbeat's GIL score so far is too mixed to classify on."""
    estimate, _ = beat.gil_estimate()
    if estimate is None or estimate[1] < GIL_MIN_TICKS:
        return True
    return GIL_UNCLEAR[0] < estimate[0] < GIL_UNCLEAR[1]


def _sample_async(
    fn: Callable[..., Any], it: Iterator[Call], first: tuple[Call, Any] | None, budget: _Budget
) -> _Raw:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_async_sample(fn, it, first, budget)
    # This thread already runs an event loop (we were called from async code):
    # a second loop cannot run here, so ours runs in a short-lived helper thread.
    box: list[_Raw | BaseException] = []

    def target() -> None:
        try:
            box.append(_run_async_sample(fn, it, first, budget))
        except BaseException as exc:  # handed to the caller's thread below
            box.append(exc)

    helper = threading.Thread(target=target, name="powerpool-profile-loop", daemon=True)
    helper.start()
    helper.join()
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _run_async_sample(
    fn: Callable[..., Any], it: Iterator[Call], first: tuple[Call, Any] | None, budget: _Budget
) -> _Raw:
    import asyncio

    perf = time.perf_counter
    raw = _Raw(is_async=True)

    async def timed(call: Call, made: Any) -> tuple[Outcome, float, float]:
        t0, c0 = perf(), time.thread_time()
        try:
            if made is None:
                made = fn(*call[0], **call[1])
            result = (await made) if inspect.isawaitable(made) else made
            outcome: Outcome = (True, result)
        except (Exception, asyncio.CancelledError) as exc:
            outcome = (False, exc)
        return outcome, perf() - t0, time.thread_time() - c0

    async def gather(batch: list[tuple[Call, Any]]) -> list[tuple[Outcome, float, float]]:
        return await asyncio.gather(*(timed(c, m) for c, m in batch))

    loop = asyncio.new_event_loop()
    prof = _start_cprofile(raw) if budget.hotspots else None
    max_items = budget.max_items
    try:
        pending: list[tuple[Call, Any]] = [first] if first is not None else []
        batch_size = 1  # the first coroutine runs alone: its latency is undisturbed
        while len(raw.outcomes) < max_items:
            room = min(batch_size, max_items - len(raw.outcomes))
            while len(pending) < room:
                call = next(it, None)
                if call is None:
                    break
                pending.append((call, None))
            if not pending:
                break
            for probe in budget.probes:
                probe.before()
            c0, p0 = time.thread_time(), time.process_time()
            done = loop.run_until_complete(gather(pending))
            c1, p1 = time.thread_time(), time.process_time()
            for probe in reversed(budget.probes):
                probe.after(len(raw.outcomes), len(pending))
            for (call, _), (outcome, wall, own_cpu) in zip(pending, done, strict=True):
                raw.outcomes.append(outcome)
                raw.walls.append(wall)
                # Alone, a coroutine's own CPU clock excludes the loop's start-up;
                # together, each clock also sees the others, so share the total.
                alone = len(done) == 1
                raw.thread_cpus.append(own_cpu if alone else (c1 - c0) / len(done))
                raw.process_cpus.append(own_cpu if alone else (p1 - p0) / len(done))
                if len(raw.calls) < PICKLE_SAMPLES:
                    raw.calls.append(call)
            pending = []
            n = len(raw.outcomes)
            if budget.stop_early and n == 1 and raw.walls[0] >= SLOW_ITEM_S:
                raw.notes.append("stopped after 1 coroutine: one slow item is enough evidence")
                break
            if perf() - budget.t_start + max(raw.walls) > budget.max_seconds:
                raw.notes.append(f"stopped after {n} coroutine(s): time budget spent")
                break
            batch_size = ASYNC_BATCH
        raw.notes.append(
            f"coroutine function: ran {len(raw.outcomes)} coroutine(s) on a "
            f"private event loop, up to {ASYNC_BATCH} at a time"
        )
    finally:
        for probe in reversed(budget.probes):
            probe.after(len(raw.outcomes), 1)
        if prof is not None:
            prof.disable()
        _close_loop(loop)
    if prof is not None:
        raw.hotspots = _hotspots(prof)
    return raw


def _close_loop(loop: Any) -> None:
    import asyncio

    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:  # only left over after KeyboardInterrupt
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        # Joins threads that run_in_executor started, so none outlive the profile.
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


def _is_coroutine_function(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):  # unwraps functools.partial
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - looking for ``async def __call__``
    return call is not None and inspect.iscoroutinefunction(call)


def _gil_disabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is not None and not is_enabled()


# --------------------------------------------------------------------------- cProfile


def _start_cprofile(raw: _Raw) -> Any:
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.enable()
    except ValueError as exc:  # 3.12+: another profiler or coverage tool is active
        raw.notes.append(f"hot spots unavailable: {exc}")
        return None
    raw.notes.append("timed under cProfile (hotspots=True): pure Python runs up to ~2x slower")
    return prof


def _hotspots(prof: Any) -> tuple[Hotspot, ...]:
    import pstats

    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def ours(key: tuple[str, int, str]) -> bool:
        return os.path.normcase(os.path.abspath(key[0])) in _OWN_FILES

    # Leave out the profiler's own frames and everything only they called
    # (timers, the event loop's machinery, the heartbeat), but never what its
    # entry points called: that is the user's function. Calls from frames that
    # were already running when cProfile started have no recorded caller.
    entries = {key for key in stats if ours(key) and key[2] in ("_invoke", "timed")}
    excluded = {key for key in stats if ours(key)}
    changed = True
    while changed:
        changed = False
        for key, entry in stats.items():
            callers = entry[4]
            if (
                key not in excluded
                and not any(c in entries for c in callers)
                and all(c in excluded or ours(c) for c in callers)
            ):
                excluded.add(key)
                changed = True
    ranked = sorted(
        (item for item in stats.items() if item[0] not in excluded),
        key=lambda item: item[1][3],
        reverse=True,
    )
    spots = []
    for (filename, line, name), (_cc, calls, own, cumulative, _callers) in ranked[:HOTSPOT_LIMIT]:
        label = name if filename == "~" else f"{name} ({os.path.basename(filename)}:{line})"
        spots.append(
            Hotspot(
                function=label, calls=int(calls), cumulative_s=float(cumulative), own_s=float(own)
            )
        )
    return tuple(spots)


# --------------------------------------------------------------------------- building the record


def _build_profile(fn: Callable[..., Any], raw: _Raw, t_start: float, thorough: bool) -> Profile:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    n = len(raw.outcomes)
    gil_disabled = _gil_disabled()
    if n == 0:
        return Profile(
            items=0,
            wall_per_item_s=0.0,
            cpu_per_item_s=0.0,
            thread_cpu_per_item_s=0.0,
            gil_held_fraction=0.0,
            arg_pickle_bytes=0,
            result_pickle_bytes=0,
            pickle_per_item_s=0.0,
            peak_rss_bytes=0,
            workload=Workload.ASYNC if raw.is_async else Workload.TINY,
            evidence=("no items to sample",),
            hotspots=(),
            profiling_s=time.perf_counter() - t_start,
            function=name,
            gil_disabled=gil_disabled,
        )
    evidence: list[str] = []
    walls, tcpu, pcpu = raw.walls, raw.thread_cpus, raw.process_cpus
    if n >= 2 and not raw.is_async:
        rest = sorted(walls[1:])
        median = rest[len(rest) // 2]
        if walls[0] > WARMUP_FACTOR * median and walls[0] - median > 1e-4:
            evidence.append(
                f"first call took {format_seconds(walls[0])}, the others "
                f"~{format_seconds(median)}: treated as warm-up, left out of "
                f"the means"
            )
            walls, tcpu, pcpu = walls[1:], tcpu[1:], pcpu[1:]
    runqueues = raw.runqueues[1:] if len(walls) < n else raw.runqueues
    queued = sum(runqueues) / len(walls)
    wall = sum(walls) / len(walls)
    thread_cpu = sum(tcpu) / len(tcpu)
    process_cpu = sum(pcpu) / len(pcpu)
    if raw.gil is not None and not gil_disabled:
        gil_fraction, gil_measured = raw.gil[0], True
    else:
        gil_fraction, gil_measured = 0.0, False

    workload = _classify(
        raw, (wall, thread_cpu, process_cpu, max(0.0, queued)), gil_disabled, evidence
    )

    # Pickling only decides between processes and threads for CPU work, so it
    # is skipped for other work unless asked (``thorough``).
    unmeasured: tuple[int, float, str | None, bool] = (0, 0.0, None, False)
    args_cost = result_cost = fn_cost = unmeasured
    if workload in (Workload.CPU_GIL, Workload.CPU_NATIVE) or thorough:
        args_cost = pickle_cost(raw.calls)
        result_cost = pickle_cost([value for ok, value in raw.outcomes[:PICKLE_SAMPLES] if ok])
        fn_cost = pickle_cost([fn])
    unpicklable = None
    for what, cost in (("function", fn_cost), ("argument", args_cost), ("result", result_cost)):
        if cost[2] is not None:
            unpicklable = f"{what}: {cost[2]}"
            evidence.append(f"the {what} cannot be pickled ({cost[2]}): no process pool")
            break
    errors = sum(1 for ok, _ in raw.outcomes if not ok)
    if errors:
        first_error = next(value for ok, value in raw.outcomes if not ok)
        evidence.append(
            f"{errors} of {n} items raised, e.g. {type(first_error).__name__}: {first_error}"
        )
    evidence.extend(raw.notes)
    elapsed = time.perf_counter() - t_start
    return Profile(
        items=n,
        wall_per_item_s=wall,
        cpu_per_item_s=process_cpu,
        thread_cpu_per_item_s=thread_cpu,
        gil_held_fraction=gil_fraction,
        arg_pickle_bytes=args_cost[0],
        result_pickle_bytes=result_cost[0],
        pickle_per_item_s=args_cost[1] + result_cost[1],
        peak_rss_bytes=raw.peak_rss,
        workload=workload,
        evidence=tuple(evidence),
        hotspots=raw.hotspots,
        profiling_s=elapsed,
        function=name,
        max_wall_s=max(raw.walls),
        errors=errors,
        gil_measured=gil_measured,
        gil_disabled=gil_disabled,
        fn_pickle_bytes=fn_cost[0],
        needs_cloudpickle=args_cost[3] or result_cost[3] or fn_cost[3],
        unpicklable=unpicklable,
        rss_growth_bytes=raw.rss_growth,
        overhead_s=max(0.0, elapsed - sum(raw.walls)),
        runqueue_per_item_s=max(0.0, queued),
    )


def _classify(  # noqa: PLR0911 - a decision ladder reads best as early returns
    raw: _Raw, means: tuple[float, float, float, float], gil_disabled: bool, evidence: list[str]
) -> Workload:
    wall, thread_cpu, process_cpu, queued = means
    per_item = (
        f"{format_seconds(wall)} wall, {format_seconds(thread_cpu)} CPU in the "
        f"calling thread, {format_seconds(process_cpu)} in the whole process per item"
    )
    if queued > 0.1 * wall:
        per_item += (
            f"; the calling thread also waited {format_seconds(queued)} for a CPU "
            f"(a busy machine), which is neither computing nor waiting"
        )
    busy = _busy(wall, thread_cpu, process_cpu, queued)
    if raw.is_async:
        evidence.append(per_item)
        if busy >= IO_MAX_BUSY:
            evidence.append(
                f"the coroutines compute {busy:.0%} of the time: an event loop "
                f"overlaps only their waiting"
            )
        return Workload.ASYNC
    typical = sorted(raw.walls)[len(raw.walls) // 2]  # a preempted item cannot move a median
    if min(wall, typical) < TINY_S:
        evidence.append(
            f"{format_seconds(typical)} per item (median) is below "
            f"{format_seconds(TINY_S)}: cheaper than any pool's per-item overhead"
        )
        return Workload.TINY
    evidence.append(per_item)
    if busy < IO_MAX_BUSY:
        evidence.append(f"it computes {busy:.0%} of the time and waits the rest: it mostly waits")
        return Workload.IO
    evidence.append(f"it computes {busy:.0%} of the time: it mostly computes")
    if gil_disabled:
        evidence.append(
            "the GIL is disabled (free-threaded build): threads run Python code in parallel"
        )
        return Workload.CPU_GIL
    if process_cpu > NATIVE_THREADS_RATIO * wall:
        evidence.append(
            f"process CPU is {process_cpu / wall:.1f}x wall time: native threads "
            f"ran outside the GIL"
        )
        return Workload.CPU_NATIVE
    si = sys.getswitchinterval()
    if raw.gil is None:
        window = (
            f" ({format_seconds(raw.gil_window_s)} heartbeat window)" if raw.gil_window_s else ""
        )
        evidence.append(
            f"GIL not measured, items too short or too few{window}: assumed held, "
            f"as pure Python holds it"
        )
        return Workload.CPU_GIL
    fraction, ticks, median = raw.gil
    evidence.append(
        f"heartbeat thread woke {format_seconds(median)} late (median of {ticks} "
        f"ticks) = {fraction:.0%} of the {format_seconds(si)} switch interval"
    )
    if fraction >= GIL_HELD_MIN:
        evidence.append("so the function holds the GIL: threads would take turns")
        return Workload.CPU_GIL
    evidence.append("so the function releases the GIL: threads run it in parallel")
    return Workload.CPU_NATIVE


def _busy(wall: float, thread_cpu: float, process_cpu: float, queued: float) -> float:
    """Computing / (computing + waiting), for one item.

    Waiting is the calling thread's wall time spent neither on a CPU nor
    queued for one (sleeping, blocked on I/O or a lock). Leaving the queued
    time out of both sides keeps the ratio honest on a loaded machine, where
    a computing item queues a lot and a sleeping one queues when it wakes.
    Computing counts every thread of the process, so an item that waits on
    its own native thread pool still computes.
    """
    waiting = max(0.0, wall - thread_cpu - queued)
    computing = max(thread_cpu, process_cpu)
    return computing / (computing + waiting) if computing + waiting > 0 else 0.0

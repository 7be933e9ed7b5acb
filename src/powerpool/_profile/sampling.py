"""Running the sampled items and collecting raw measurements, within a budget.

:func:`_sample_sync` runs a plain function's items one at a time in the
calling thread, timing each and starting the heartbeat (GIL) thread only for
heavy items; :func:`_sample_async` runs a coroutine function's coroutines on
a private event loop. Both fill a :class:`_Raw` for :mod:`.classify`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .._backends._itemloop import call as call_item
from .._decide import IO_MAX_BUSY  # one threshold for the profiler and auto
from .._probes import Heartbeat, SchedClock
from .classify import PICKLE_SAMPLES, WARMUP_FACTOR, _busy, _gil_disabled
from .hotspots import _hotspots, _start_cprofile
from .record import Hotspot, format_seconds

if TYPE_CHECKING:
    from .._itemprobe import ItemProbe

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
ASYNC_BATCH = 4
"""Coroutines run concurrently when profiling a coroutine function."""


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
            # The item loop's own call (one exception policy; a separate frame
            # that hot-spot filtering tells from the profiler's bookkeeping).
            # in_caller: sampling runs in the caller's thread, Ctrl-C stops it.
            outcome = call_item(fn, args, kwargs, in_caller=True)
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
    """Sample coroutines on a private loop of the event-loop engine (in a helper
    thread when this thread already runs a loop), each through its one item
    policy, :func:`powerpool._coroutines.call`."""
    from .._coroutines import run_private

    return run_private(lambda loop: _run_async_sample(fn, it, first, budget, loop))


def _run_async_sample(
    fn: Callable[..., Any],
    it: Iterator[Call],
    first: tuple[Call, Any] | None,
    budget: _Budget,
    loop: Any,
) -> _Raw:
    import asyncio

    from .._coroutines import call

    perf = time.perf_counter
    raw = _Raw(is_async=True)

    async def timed(item: Call, made: Any) -> tuple[Outcome, float, float]:
        # ``made``: the coroutine a plain function already returned (sampled once).
        target = fn if made is None else lambda *_args, **_kwargs: made
        t0, c0 = perf(), time.thread_time()
        outcome = await call(target, item[0], item[1])
        return outcome, perf() - t0, time.thread_time() - c0

    async def gather(batch: list[tuple[Call, Any]]) -> list[tuple[Outcome, float, float]]:
        return await asyncio.gather(*(timed(c, m) for c, m in batch))

    prof = _start_cprofile(raw) if budget.hotspots else None
    max_items = budget.max_items
    try:
        pending: list[tuple[Call, Any]] = [first] if first is not None else []
        batch_size = 1  # the first coroutine runs alone: its latency is undisturbed
        while len(raw.outcomes) < max_items:
            room = min(batch_size, max_items - len(raw.outcomes))
            while len(pending) < room:
                next_call = next(it, None)
                if next_call is None:
                    break
                pending.append((next_call, None))
            if not pending:
                break
            for probe in budget.probes:
                probe.before()
            c0, p0 = time.thread_time(), time.process_time()
            done = loop.run_until_complete(gather(pending))
            c1, p1 = time.thread_time(), time.process_time()
            for probe in reversed(budget.probes):
                probe.after(len(raw.outcomes), len(pending))
            for (item, _), (outcome, wall, own_cpu) in zip(pending, done, strict=True):
                raw.outcomes.append(outcome)
                raw.walls.append(wall)
                # Alone, a coroutine's own CPU clock excludes the loop's start-up;
                # together, each clock also sees the others, so share the total.
                alone = len(done) == 1
                raw.thread_cpus.append(own_cpu if alone else (c1 - c0) / len(done))
                raw.process_cpus.append(own_cpu if alone else (p1 - p0) / len(done))
                if len(raw.calls) < PICKLE_SAMPLES:
                    raw.calls.append(item)
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
    if prof is not None:
        raw.hotspots = _hotspots(prof)
    return raw


def _is_coroutine_function(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):  # unwraps functools.partial
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - looking for ``async def __call__``
    return call is not None and inspect.iscoroutinefunction(call)

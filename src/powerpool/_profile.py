"""Measure a sample of the real work, and say what kind of work it is.

:func:`profile` (public) and :func:`profile_calls` (used by ``backend="auto"``)
run the caller's function on a few real items in the calling thread and
return a frozen :class:`Profile`: time per item (wall, calling-thread CPU,
whole-process CPU), how much of that time the GIL was held, how big and how
slow the arguments and results are to pickle, memory, optional cProfile hot
spots, and a :class:`Workload` class with the evidence for it.

How the GIL is measured: while the items run, a heartbeat thread sleeps
``HEARTBEAT_S`` again and again and records how late it wakes. Waking needs
the GIL; if the function holds it (pure Python), the heartbeat waits until
the interpreter forces a switch, i.e. late by about ``sys.getswitchinterval()``
(5 ms). If the function releases it (sleeping, hashlib on big buffers, zlib,
most numpy loops), the heartbeat is only late by the OS wake-up slack (tens of
microseconds). Dividing lateness by the switch interval gives a number near 1
for GIL-holding code and near 0 for GIL-releasing code, with a wide gap
between the two that survives a loaded machine.

Cost discipline (``auto`` profiles every run): the first call is timed bare.
Only if an item takes at least ``HEAVY_CALL_S`` does the profiler start the
heartbeat thread and read memory; sampling 8 trivial calls costs a few
microseconds. With ``stop_early`` (the default of :func:`profile_calls`) one
slow waiting item is enough evidence and sampling stops after it.
"""

from __future__ import annotations

import enum
import inspect
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Hotspot", "Profile", "Workload", "format_bytes", "format_seconds", "profile",
           "profile_calls"]

Call = tuple[tuple[Any, ...], dict[str, Any]]
"""One call of the function: (positional args, keyword args)."""
Outcome = tuple[bool, Any]
"""(True, result) or (False, exception) for one call."""

HEAVY_CALL_S = 200e-6
"""An item at least this slow turns on the heartbeat thread and memory readings.
Starting and joining the thread costs ~0.2 ms; below this the work is too light
for the GIL measurement to pay for itself (or to matter)."""
SLOW_ITEM_S = 5e-3
"""With ``stop_early``, a first item at least this slow that waits (low CPU) ends
sampling at once: 400 x 20 ms sleeps are profiled in ~20 ms. A busy one gets
exactly one more item with the heartbeat running, because telling GIL-holding
from GIL-releasing CPU work needs the heartbeat and the choice between threads
and processes depends on it."""
TINY_S = 20e-6
"""Per-item wall time below this is "tiny": about twice the cheapest per-item
overhead of any pool (~10 us of chunked IPC), so no backend can beat a loop."""
IO_MAX_BUSY = 0.5
"""CPU time below this fraction of wall time means the item mostly waits ("io")."""
NATIVE_THREADS_RATIO = 1.2
"""Process CPU above this multiple of wall time proves code ran outside the GIL
in several threads at once (BLAS, OpenMP): one Python thread cannot do that."""
GIL_HELD_MIN = 0.5
"""Heartbeat lateness (as a fraction of the switch interval) from which the
GIL counts as held. GIL-holding code scores ~1, GIL-releasing code ~0 (~0.3 on
a badly overloaded machine), so the midpoint leaves margin both ways."""
HEARTBEAT_S = 1e-3
"""Heartbeat sleep. Shorter ticks measure short items better but cost more CPU
(~10 us per tick); 1 ms is well below the 5 ms switch interval it must detect."""
WARMUP_FACTOR = 3.0
"""A first call slower than this multiple of the median of the others (a cold
cache, a lazy import) is left out of the per-item means."""
PICKLE_SAMPLES = 3
"""How many sampled arguments and results are pickled to estimate IPC cost."""
HOTSPOT_LIMIT = 8
"""How many hot spots a profile keeps."""
ASYNC_BATCH = 4
"""Coroutines run concurrently when profiling a coroutine function."""

_THIS_FILE = os.path.normcase(__file__)


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
        return (f"{self.function}: {format_seconds(self.cumulative_s)} cumulative, "
                f"{format_seconds(self.own_s)} own, {self.calls} calls")


@dataclass(frozen=True)
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
    """0..1: how late the heartbeat woke, as a fraction of the switch interval
    (~1: the function holds the GIL; ~0: it releases it). 0.0 when not measured,
    see ``gil_measured``."""
    arg_pickle_bytes: int
    """Mean pickled size of one item's arguments, bytes (0: not measured)."""
    result_pickle_bytes: int
    """Mean pickled size of one result, bytes (0: not measured)."""
    pickle_per_item_s: float
    """Seconds to pickle and unpickle one item's arguments and result."""
    peak_rss_bytes: int
    """Highest resident memory of this process seen while sampling, bytes
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
    """Whether the heartbeat measured the GIL (items long enough, GIL enabled)."""
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
    """Seconds the profiler added on top of running the items."""

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
        lines = [f"{name}: {self.workload.value} ({self.items} items sampled in "
                 f"{format_seconds(self.profiling_s)})"]
        gil = (f"GIL held {self.gil_held_fraction:.0%}" if self.gil_measured
               else "GIL off" if self.gil_disabled else "GIL not measured")
        lines.append(f"  per item  {format_seconds(self.wall_per_item_s)} wall, "
                     f"{format_seconds(self.cpu_per_item_s)} CPU (calling thread "
                     f"{format_seconds(self.thread_cpu_per_item_s)}), {gil}")
        if self.unpicklable:
            lines.append(f"  pickling  impossible: {self.unpicklable}")
        else:
            fn_size = (f", function {format_bytes(self.fn_pickle_bytes)}"
                       if self.fn_pickle_bytes else "")
            lines.append(f"  pickling  args {format_bytes(self.arg_pickle_bytes)}, result "
                         f"{format_bytes(self.result_pickle_bytes)}, "
                         f"{format_seconds(self.pickle_per_item_s)} per item{fn_size}"
                         + (" (cloudpickle)" if self.needs_cloudpickle else ""))
        if self.peak_rss_bytes:
            lines.append(f"  memory    peak RSS {format_bytes(self.peak_rss_bytes)} "
                         f"(+{format_bytes(self.rss_growth_bytes)} while sampling)")
        if self.errors:
            lines.append(f"  errors    {self.errors} of {self.items} items raised")
        lines.extend(f"  - {line}" for line in self.evidence)
        if self.hotspots:
            lines.append("  hot spots")
            lines.extend(f"    {i}. {spot}" for i, spot in enumerate(self.hotspots, 1))
        return "\n".join(lines)


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


def profile(fn: Callable[..., Any], sample: Iterable[Any], *, max_items: int = 8,
            max_seconds: float = 0.5, hotspots: bool = False, star: bool = False) -> Profile:
    """Run ``fn`` on up to ``max_items`` items of ``sample`` and describe the work.

    Each element of ``sample`` is one argument (``star=True``: a tuple of
    arguments). Items run one at a time in the calling thread, until
    ``max_items`` ran or the next one would overrun ``max_seconds``.
    Exceptions from ``fn`` are counted in ``errors``, not raised.
    ``hotspots=True`` also runs cProfile (slows pure Python ~2x).
    """
    calls: Iterator[Call] = ((tuple(x), {}) if star else ((x,), {}) for x in sample)
    prof, _ = profile_calls(fn, calls, max_items=max_items, max_seconds=max_seconds,
                            hotspots=hotspots, stop_early=False, thorough=True)
    if prof.items == 0:
        raise ValueError("profile() needs a sample with at least one item")
    return prof


def profile_calls(fn: Callable[..., Any], calls: Iterable[Call], *, max_items: int = 8,
                  max_seconds: float = 0.3, hotspots: bool = False, stop_early: bool = True,
                  thorough: bool = False) -> tuple[Profile, list[Outcome]]:
    """Profile ``fn`` on calls pulled one at a time from ``calls``; keep the outcomes.

    Each consumed call runs exactly once in the calling thread (a coroutine
    function's coroutines on a private event loop, in a helper thread if this
    thread already runs a loop). Returns the profile and the outcomes, in
    order, of exactly the calls consumed: ``(True, result)`` or
    ``(False, exception)`` with its traceback; exceptions are never raised
    (an exception raised by ``calls`` itself propagates).

    Sampling stops after ``max_items`` calls, when the next call would overrun
    ``max_seconds``, and with ``stop_early`` after one slow (>= 5 ms) waiting
    item, or two slow busy ones. ``thorough`` (used by :func:`profile`) also
    measures pickling with cloudpickle for work no process pool would get.
    An empty ``calls`` gives a profile with ``items == 0``.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    t_start = time.perf_counter()
    it = iter(calls)
    if _is_coroutine_function(fn):
        raw = _sample_async(fn, it, None, max_items, max_seconds, hotspots, stop_early, t_start)
    else:
        raw = _sample_sync(fn, it, max_items, max_seconds, hotspots, stop_early, t_start)
    return _build_profile(fn, raw, t_start, thorough), raw.outcomes


# --------------------------------------------------------------------------- sampling


@dataclass
class _Raw:
    """Measurements collected while sampling (mutable, private)."""

    outcomes: list[Outcome] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)  # the first PICKLE_SAMPLES calls
    walls: list[float] = field(default_factory=list)
    thread_cpus: list[float] = field(default_factory=list)
    process_cpus: list[float] = field(default_factory=list)
    is_async: bool = False
    gil: tuple[float, int, float] | None = None  # fraction, ticks used, median lateness
    gil_window_s: float = 0.0
    peak_rss: int = 0
    rss_growth: int = 0
    hotspots: tuple[Hotspot, ...] = ()
    notes: list[str] = field(default_factory=list)


def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
    # A separate frame so that hot-spot filtering can tell the user's function
    # (called from here) from the profiler's own bookkeeping.
    try:
        return True, fn(*args, **kwargs)
    except Exception as exc:
        return False, exc


def _sample_sync(fn: Callable[..., Any], it: Iterator[Call], max_items: int,
                 max_seconds: float, hotspots: bool, stop_early: bool, t_start: float) -> _Raw:
    raw = _Raw()
    perf, thread_time, process_time = time.perf_counter, time.thread_time, time.process_time
    prof = _start_cprofile(raw) if hotspots else None
    beat: _Heartbeat | None = None
    heavy = False
    limit = max_items
    try:
        for call in it:
            if heavy and beat is None:
                beat = _Heartbeat()
            args, kwargs = call
            w0, c0, p0 = perf(), thread_time(), process_time()
            outcome = _invoke(fn, args, kwargs)
            p1, c1, w1 = process_time(), thread_time(), perf()
            wall = w1 - w0
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
                raw.outcomes.clear()
                return _sample_async(fn, it, (call, outcome[1]), max_items, max_seconds,
                                     hotspots, stop_early, t_start)
            if beat is not None:
                beat.mark(w0, w1)
            heavy = heavy or wall >= HEAVY_CALL_S
            spent = w1 - t_start
            if n >= limit:
                raw.notes.append(f"stopped after {n} items (max_items)" if n == max_items
                                 else "stopped after 2 items: the first was slow and busy, the "
                                      "second ran with the heartbeat to measure the GIL")
                break
            if spent + sum(raw.walls) / n > max_seconds:
                raw.notes.append(f"stopped after {n} items: time budget "
                                 f"{format_seconds(max_seconds)} spent")
                break
            if n == 1 and stop_early and wall >= SLOW_ITEM_S:
                busy = max(c1 - c0, p1 - p0) / wall
                if busy < IO_MAX_BUSY:
                    raw.notes.append(f"stopped after 1 item: one slow waiting item "
                                     f"({format_seconds(wall)}) is enough evidence")
                    break
                if spent + wall > max_seconds:
                    raw.notes.append("stopped after 1 item: a second would overrun the "
                                     "time budget")
                    break
                limit = 2
    finally:
        if prof is not None:
            prof.disable()
        if beat is not None:
            beat.stop()
    if beat is not None:
        raw.gil, raw.gil_window_s = beat.gil_estimate()
        raw.peak_rss, raw.rss_growth = beat.peak_rss, beat.rss_growth
    if prof is not None:
        raw.hotspots = _hotspots(prof)
    return raw


def _sample_async(fn: Callable[..., Any], it: Iterator[Call], first: tuple[Call, Any] | None,
                  max_items: int, max_seconds: float, hotspots: bool, stop_early: bool,
                  t_start: float) -> _Raw:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_async_sample(fn, it, first, max_items, max_seconds, hotspots, stop_early,
                                 t_start)
    # This thread already runs an event loop (we were called from async code):
    # a second loop cannot run here, so ours runs in a short-lived helper thread.
    box: list[_Raw | BaseException] = []

    def target() -> None:
        try:
            box.append(_run_async_sample(fn, it, first, max_items, max_seconds, hotspots,
                                         stop_early, t_start))
        except BaseException as exc:  # handed to the caller's thread below
            box.append(exc)

    helper = threading.Thread(target=target, name="powerpool-profile-loop", daemon=True)
    helper.start()
    helper.join()
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _run_async_sample(fn: Callable[..., Any], it: Iterator[Call],
                      first: tuple[Call, Any] | None, max_items: int, max_seconds: float,
                      hotspots: bool, stop_early: bool, t_start: float) -> _Raw:
    import asyncio

    perf = time.perf_counter
    raw = _Raw(is_async=True)

    async def timed(call: Call, made: Any) -> tuple[Outcome, float]:
        t0 = perf()
        try:
            if made is None:
                made = fn(*call[0], **call[1])
            result = (await made) if inspect.isawaitable(made) else made
            outcome: Outcome = (True, result)
        except (Exception, asyncio.CancelledError) as exc:
            outcome = (False, exc)
        return outcome, perf() - t0

    loop = asyncio.new_event_loop()
    prof = _start_cprofile(raw) if hotspots else None
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
            c0, p0 = time.thread_time(), time.process_time()
            done = loop.run_until_complete(asyncio.gather(*(timed(c, m) for c, m in pending)))
            c1, p1 = time.thread_time(), time.process_time()
            for (call, _), (outcome, wall) in zip(pending, done):
                raw.outcomes.append(outcome)
                raw.walls.append(wall)
                raw.thread_cpus.append((c1 - c0) / len(done))
                raw.process_cpus.append((p1 - p0) / len(done))
                if len(raw.calls) < PICKLE_SAMPLES:
                    raw.calls.append(call)
            pending = []
            n = len(raw.outcomes)
            if stop_early and n == 1 and raw.walls[0] >= SLOW_ITEM_S:
                raw.notes.append("stopped after 1 coroutine: one slow item is enough evidence")
                break
            if perf() - t_start + max(raw.walls) > max_seconds:
                raw.notes.append(f"stopped after {n} coroutines: time budget spent")
                break
            batch_size = ASYNC_BATCH
        raw.notes.append(f"coroutine function: ran {len(raw.outcomes)} coroutines on a private "
                         f"event loop, up to {ASYNC_BATCH} at a time")
    finally:
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
    call = getattr(type(fn), "__call__", None)  # an object with ``async def __call__``
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def _gil_disabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is not None and not is_enabled()


# --------------------------------------------------------------------------- heartbeat and memory


class _Heartbeat:
    """A thread that sleeps ``HEARTBEAT_S`` in a loop and records how late it wakes.

    Also samples resident memory at each tick. Invariant: ``ticks`` and
    ``_rss`` are appended only by the heartbeat thread and read by the
    sampler only after ``stop()`` joined it.
    """

    def __init__(self) -> None:
        self.ticks: list[tuple[float, float]] = []  # (when it was due, when it woke)
        self._rss: list[int] = []
        self._done = threading.Event()
        self._probe = _RssProbe()
        self._maxrss_before = _max_rss()
        self._rss_before = self._probe.read()
        self._windows: list[tuple[float, float]] = []
        self._thread = threading.Thread(target=self._run, name="powerpool-profile-heartbeat",
                                        daemon=True)
        self._thread.start()
        self.peak_rss = 0
        self.rss_growth = 0

    def _run(self) -> None:
        perf, wait, ticks, read = time.perf_counter, self._done.wait, self.ticks, self._probe.read
        rss = self._rss
        while True:
            due = perf() + HEARTBEAT_S
            if wait(HEARTBEAT_S):  # releases the GIL while it sleeps
                return
            ticks.append((due, perf()))  # waking up needed the GIL
            rss.append(read())

    def mark(self, start: float, end: float) -> None:
        """Record that an item ran from ``start`` to ``end`` (perf_counter seconds)."""
        self._windows.append((start, end))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        rss_after = self._probe.read()
        self._probe.close()
        peak = max([rss_after, self._rss_before, *self._rss])
        maxrss = _max_rss()
        if maxrss > self._maxrss_before:  # the lifetime peak rose while sampling: it is ours
            peak = max(peak, maxrss)
        self.peak_rss = peak
        self.rss_growth = max(0, peak - self._rss_before) if self._rss_before else 0

    def gil_estimate(self) -> tuple[tuple[float, int, float] | None, float]:
        """((held fraction, ticks used, median lateness s) or None, window seconds)."""
        if not self._windows:
            return None, 0.0
        start, end = self._windows[0][0], self._windows[-1][1]
        si = sys.getswitchinterval()
        late: list[float] = []
        for due, woke in self.ticks:
            if not start <= due < end:
                continue
            if woke <= end:
                late.append(max(0.0, woke - due))
            elif end - due >= si / 2:
                # Still blocked when the last item ended: a lower bound, but
                # already long enough to count as GIL holding.
                late.append(end - due)
        if not late:
            return None, end - start
        fraction = sum(min(x / si, 1.0) for x in late) / len(late)
        return (fraction, len(late), sorted(late)[len(late) // 2]), end - start


class _RssProbe:
    """Reads this process's resident memory cheaply (~1 us on Linux)."""

    def __init__(self) -> None:
        self._fd = -1
        self._proc: Any = None
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError, ValueError):
            try:
                import psutil

                self._proc = psutil.Process()
            except Exception:  # no psutil or no access: memory stays unmeasured
                self._proc = None

    def read(self) -> int:
        try:
            if self._fd >= 0:
                return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
            if self._proc is not None:
                return int(self._proc.memory_info().rss)
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _max_rss() -> int:
    """The process's lifetime peak RSS in bytes (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


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
    invoke = (_THIS_FILE, _invoke.__code__.co_firstlineno, "_invoke")

    def ours(key: tuple[str, int, str]) -> bool:
        return os.path.normcase(key[0]) == _THIS_FILE

    # Leave out the profiler's own frames, and everything only they called
    # (timers, the heartbeat thread's waits), but never what _invoke called:
    # that is the user's function.
    excluded = {key for key in stats if ours(key)}
    changed = True
    while changed:
        changed = False
        for key, entry in stats.items():
            callers = entry[4]
            if (key not in excluded and callers and invoke not in callers
                    and all(c in excluded or ours(c) for c in callers)):
                excluded.add(key)
                changed = True
    ranked = sorted((item for item in stats.items() if item[0] not in excluded),
                    key=lambda item: item[1][3], reverse=True)
    spots = []
    for (filename, line, name), (_cc, calls, own, cumulative, _callers) in ranked[:HOTSPOT_LIMIT]:
        label = name if filename == "~" else f"{name} ({os.path.basename(filename)}:{line})"
        spots.append(Hotspot(function=label, calls=int(calls), cumulative_s=float(cumulative),
                             own_s=float(own)))
    return tuple(spots)


# --------------------------------------------------------------------------- building the record


def _build_profile(fn: Callable[..., Any], raw: _Raw, t_start: float, thorough: bool) -> Profile:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    n = len(raw.outcomes)
    gil_disabled = _gil_disabled()
    if n == 0:
        return Profile(items=0, wall_per_item_s=0.0, cpu_per_item_s=0.0,
                       thread_cpu_per_item_s=0.0, gil_held_fraction=0.0, arg_pickle_bytes=0,
                       result_pickle_bytes=0, pickle_per_item_s=0.0, peak_rss_bytes=0,
                       workload=Workload.ASYNC if raw.is_async else Workload.TINY,
                       evidence=("no items to sample",), hotspots=(),
                       profiling_s=time.perf_counter() - t_start, function=name,
                       gil_disabled=gil_disabled)
    evidence: list[str] = []
    walls, tcpu, pcpu = raw.walls, raw.thread_cpus, raw.process_cpus
    if n >= 3 and not raw.is_async:
        rest = sorted(walls[1:])
        median = rest[len(rest) // 2]
        if walls[0] > WARMUP_FACTOR * median and walls[0] - median > 1e-4:
            evidence.append(f"first call took {format_seconds(walls[0])}, the others "
                            f"~{format_seconds(median)}: treated as warm-up, left out of "
                            f"the means")
            walls, tcpu, pcpu = walls[1:], tcpu[1:], pcpu[1:]
    wall = sum(walls) / len(walls)
    thread_cpu = sum(tcpu) / len(tcpu)
    process_cpu = sum(pcpu) / len(pcpu)
    if raw.gil is not None and not gil_disabled:
        gil_fraction, gil_measured = raw.gil[0], True
    else:
        gil_fraction, gil_measured = 0.0, False

    workload = _classify(raw, wall, thread_cpu, process_cpu, gil_disabled, evidence)

    # Pickling only decides between processes and threads for CPU work, so
    # cloudpickle (a 40 ms first import) is only tried there or when asked.
    wants_processes = workload in (Workload.CPU_GIL, Workload.CPU_NATIVE) or thorough
    args_cost = _pickle_cost(raw.calls, wants_processes)
    results = [value for ok, value in raw.outcomes[:PICKLE_SAMPLES] if ok]
    result_cost = _pickle_cost(results, wants_processes)
    fn_cost = _pickle_cost([fn], True) if wants_processes else (0, 0.0, None, False)
    unpicklable = None
    for what, cost in (("function", fn_cost), ("argument", args_cost), ("result", result_cost)):
        if cost[2] is not None:
            unpicklable = f"{what}: {cost[2]}"
            evidence.append(f"the {what} cannot be pickled ({cost[2]}): no process pool")
            break
    errors = sum(1 for ok, _ in raw.outcomes if not ok)
    if errors:
        first_error = next(value for ok, value in raw.outcomes if not ok)
        evidence.append(f"{errors} of {n} items raised, e.g. {type(first_error).__name__}: "
                        f"{first_error}")
    evidence.extend(raw.notes)
    elapsed = time.perf_counter() - t_start
    return Profile(
        items=n, wall_per_item_s=wall, cpu_per_item_s=process_cpu,
        thread_cpu_per_item_s=thread_cpu, gil_held_fraction=gil_fraction,
        arg_pickle_bytes=args_cost[0], result_pickle_bytes=result_cost[0],
        pickle_per_item_s=args_cost[1] + result_cost[1], peak_rss_bytes=raw.peak_rss,
        workload=workload, evidence=tuple(evidence), hotspots=raw.hotspots, profiling_s=elapsed,
        function=name, max_wall_s=max(raw.walls), errors=errors, gil_measured=gil_measured,
        gil_disabled=gil_disabled, fn_pickle_bytes=fn_cost[0],
        needs_cloudpickle=args_cost[3] or result_cost[3] or fn_cost[3], unpicklable=unpicklable,
        rss_growth_bytes=raw.rss_growth, overhead_s=max(0.0, elapsed - sum(raw.walls)),
    )


def _classify(raw: _Raw, wall: float, thread_cpu: float, process_cpu: float,
              gil_disabled: bool, evidence: list[str]) -> Workload:
    per_item = (f"{format_seconds(wall)} wall, {format_seconds(thread_cpu)} CPU in the "
                f"calling thread, {format_seconds(process_cpu)} in the whole process per item")
    busy = max(thread_cpu, process_cpu) / wall if wall > 0 else 0.0
    if raw.is_async:
        evidence.append(f"coroutine function; {per_item}")
        if busy >= IO_MAX_BUSY:
            evidence.append(f"the coroutines compute {busy:.0%} of the time: an event loop "
                            f"overlaps only their waiting")
        return Workload.ASYNC
    if wall < TINY_S:
        evidence.append(f"{format_seconds(wall)} per item is below {format_seconds(TINY_S)}: "
                        f"cheaper than any pool's per-item overhead")
        return Workload.TINY
    evidence.append(per_item)
    if busy < IO_MAX_BUSY:
        evidence.append(f"CPU is {busy:.0%} of wall time: the item mostly waits")
        return Workload.IO
    evidence.append(f"CPU is {busy:.0%} of wall time: the item computes")
    if gil_disabled:
        evidence.append("the GIL is disabled (free-threaded build): threads run Python code "
                        "in parallel")
        return Workload.CPU_GIL
    if process_cpu > NATIVE_THREADS_RATIO * wall:
        evidence.append(f"process CPU is {process_cpu / wall:.1f}x wall time: native threads "
                        f"ran outside the GIL")
        return Workload.CPU_NATIVE
    si = sys.getswitchinterval()
    if raw.gil is None:
        window = (f" ({format_seconds(raw.gil_window_s)} heartbeat window)"
                  if raw.gil_window_s else "")
        evidence.append(f"GIL not measured, items too short or too few{window}: assumed held, "
                        f"as pure Python holds it")
        return Workload.CPU_GIL
    fraction, ticks, median = raw.gil
    evidence.append(f"heartbeat thread woke {format_seconds(median)} late (median of {ticks} "
                    f"ticks) = {fraction:.0%} of the {format_seconds(si)} switch interval")
    if fraction >= GIL_HELD_MIN:
        evidence.append("so the function holds the GIL: threads would take turns")
        return Workload.CPU_GIL
    evidence.append("so the function releases the GIL: threads run it in parallel")
    return Workload.CPU_NATIVE


def _pickle_cost(objs: list[Any], allow_cloudpickle: bool) -> tuple[int, float, str | None, bool]:
    """(mean bytes, mean seconds to dump and load, why unpicklable or None, used cloudpickle)."""
    if not objs:
        return 0, 0.0, None, False
    total_bytes, total_s, used_cloudpickle = 0, 0.0, False
    perf = time.perf_counter
    for obj in objs:
        t0 = perf()
        try:
            data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        except Exception:
            if not allow_cloudpickle:
                return 0, 0.0, None, False  # unmeasured: no process pool would get it
            try:
                import cloudpickle

                t0 = perf()  # the first import of cloudpickle is not a per-item cost
                data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                return 0, 0.0, f"{type(exc).__name__}: {exc}", True
            used_cloudpickle = True
        try:
            pickle.loads(data)
        except Exception as exc:
            return 0, 0.0, f"pickles but does not unpickle: {type(exc).__name__}: {exc}", False
        total_s += perf() - t0
        total_bytes += len(data)
    return total_bytes // len(objs), total_s / len(objs), None, used_cloudpickle

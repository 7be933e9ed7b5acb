"""From raw measurements to a :class:`~.record.Profile`, and what kind of work it is.

:func:`_build_profile` averages the sampled items (leaving out a warm-up
call), measures pickling, and asks :func:`_classify` for the
:class:`~.record.Workload`, which it decides from CPU time against waiting
(:func:`_busy`) and the heartbeat's GIL score, writing its evidence in words.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._decide import IO_MAX_BUSY, TINY_S  # one threshold for the profiler and auto
from .._probes import pickle_cost
from .record import NATIVE_THREADS_RATIO, Profile, Workload, format_seconds

if TYPE_CHECKING:
    from .sampling import _Raw

GIL_HELD_MIN = 0.5
"""Heartbeat score from which the GIL counts as held. GIL-holding code scores
~1, GIL-releasing code ~0 (up to ~0.4 when it also runs some Python), so the
midpoint leaves margin both ways."""
WARMUP_FACTOR = 3.0
"""A first call slower than this multiple of the median of the others (a cold
cache, a lazy import) is left out of the per-item means."""
PICKLE_SAMPLES = 3
"""How many sampled arguments and results are pickled to estimate IPC cost."""


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


def _gil_disabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is not None and not is_enabled()

"""From a measured :class:`~powerpool._profile.Profile` to a backend, a worker
count and a chunk size, with the reasons in plain words.

:func:`plan_from_profile` is a pure function (no I/O, no clock) so that
``backend="auto"`` can call it on every run and tests can feed it made-up
profiles. Its cost model is Amdahl's law with the pools' overheads as the
serial part::

    serial      = n * t                         t: wall seconds per item
    processes   = start + n * (ipc + pickling)  +  rounds * chunk * t
    threads     = threads * start_one + n * handoff + n * t * g  +  rounds * chunk * t * (1 - g)
    io threads  = threads * start_one + n * handoff + max(n * cpu, rounds * t)
    asyncio     = start + n * task + max(n * cpu, rounds * t)

where ``g`` is the fraction of the work that holds the GIL (it runs one thread
at a time) and ``rounds * chunk`` is how many items the busiest worker runs.
The backend with the smallest estimate wins, threads over processes when
they are within ``PREFER_THREADS_WITHIN``, and serial unless the winner is at
least ``MIN_GAIN`` times faster: a loop has no start-up, no pickling and the
plainest tracebacks.

Memory caps the workers: an item that needs ``m`` bytes at its peak (the
profile's tracemalloc peak with ``memory=True``, else how far resident memory
rose while sampling) gets at most ``available / m`` threads, or
``available / (m + WORKER_BASE_BYTES)`` processes, and the reasons say so
when that is what limits them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from itertools import islice
from typing import Any

from ._estimates import (
    MIN_CHUNKS_PER_WORKER,
    PROCESS_START_S,
    TARGET_CHUNK_S,
    WORKER_BASE_BYTES,
    _async_reasons,
    _asyncio,
    _cpu_threads,
    _dask,
    _Estimate,
    _io_threads,
    _ipc_s,
    _item_bytes,
    _memory_cap,
    _memory_reason,
    _processes,
    _serial_chunksize,
    _times,
)
from ._profile import Profile, Workload, format_bytes, format_seconds
from ._system import usable_cores

__all__ = ["Plan", "cpu_count", "plan", "plan_from_profile"]

cpu_count = usable_cores  # the planner counts cores the way the backends do

MIN_GAIN = 1.1
"""Parallel plans must be estimated this much faster than a loop to be chosen."""
PREFER_THREADS_WITHIN = 1.1
"""Threads win over processes when within this factor: they share memory, start
at once and need no pickling, so their estimate is the more reliable one."""
GIL_SCORE_NOISE = 0.1
"""Heartbeat GIL score that GIL-free code reaches from OS wake-up slack alone
(~0.01-0.1 measured on a loaded machine); subtracted before the score is used
as Amdahl's serial fraction for threads."""


@dataclass(frozen=True, repr=False)
class Plan:
    """How to run a function over the items, and why."""

    backend: str
    """``"serial"``, ``"threads"``, ``"asyncio"``, ``"processes"`` or ``"dask"``."""
    workers: int
    """Threads, processes or concurrent coroutines to use (1 for serial; 0 for
    dask: as many as the cluster has). With an unknown number of items this is
    an upper bound: start them lazily."""
    chunksize: int
    """Items sent to a worker in one message."""
    expected_speedup: float
    """Estimated serial time / parallel time (start-up included when the number
    of items is known; the long-run rate when it is not)."""
    reasons: tuple[str, ...]
    """Why this backend, worker count and chunk size, in plain words."""
    profile: Profile | None
    """The measurements the plan rests on."""
    native_threads: int | None = None
    """Cap on BLAS/OpenMP threads per worker (None: leave it to the backend)."""
    basis: str = ""
    """The estimate behind ``expected_speedup``, with its numbers."""
    n_items: int | None = None
    """Number of items planned for (None: unknown, an iterator)."""
    cores: int = 1
    """Usable cores the plan assumed."""
    expected_s: float | None = None
    """Estimated wall seconds of the whole run (None when ``n_items`` is unknown)."""

    def __str__(self) -> str:
        if self.backend == "serial":
            head = f"plan: serial, chunksize {self.chunksize}"
        else:
            who = "cluster workers" if self.workers == 0 else f"{self.workers} workers"
            head = (
                f"plan: {self.backend} with {who}, chunksize {self.chunksize}, "
                f"expected speed-up {self.expected_speedup:.1f}x"
            )
        if self.native_threads is not None:
            head += f", {self.native_threads} native thread(s) per worker"
        lines = [head]
        if self.profile is not None:
            p = self.profile
            lines.append(
                f"  measured: {p.workload.value}, {format_seconds(p.wall_per_item_s)} "
                f"per item over {p.items} items"
            )
        lines.extend(f"  - {reason}" for reason in self.reasons)
        if self.basis:
            lines.append(f"  basis: {self.basis}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        # What a REPL or a notebook shows for a bare ``plan``: the readable
        # report that print() gives, not the dataclass's wall of fields.
        return str(self)

    def _repr_html_(self) -> str:
        from ._report_html import text_html

        return text_html(str(self))


def plan_from_profile(  # noqa: PLR0911 - one early return per workload, each explained
    profile: Profile,
    n_items: int | None,
    *,
    cores: int | None = None,
    address: str | None = None,
    max_io_workers: int = 512,
    memory_bytes: int | None = None,
) -> Plan:
    """Plan a run of ``n_items`` items (None: unknown) from a measured profile.

    ``cores`` defaults to :func:`cpu_count`. ``address`` (a dask scheduler)
    allows scaling out. ``memory_bytes`` (memory available) caps the workers
    when items use memory; it defaults to what this machine has available
    now, read only when the profile measured memory per item.
    Pure otherwise: reads no clock, no file, no environment (except these
    two defaults).
    """
    cores = max(1, cores if cores is not None else cpu_count())
    n = n_items if n_items is None else max(0, n_items)
    p = profile
    w = max(p.wall_per_item_s, 1e-9)
    reasons: list[str] = []
    native_threads: int | None = None

    def done(est: _Estimate, *extra: str) -> Plan:
        speedup = w / est.per_item_s if est.per_item_s > 0 else 1.0
        if est.backend == "serial":
            speedup = 1.0
        return Plan(
            backend=est.backend,
            workers=est.workers,
            chunksize=est.chunksize,
            expected_speedup=round(speedup, 2),
            reasons=(*reasons, *extra),
            profile=p,
            native_threads=native_threads if est.backend != "serial" else None,
            basis=est.basis,
            n_items=n,
            cores=cores,
            expected_s=est.per_item_s * n if n is not None else None,
        )

    serial = _Estimate(
        "serial",
        1,
        _serial_chunksize(n, w),
        w,
        f"serial {_times(n, w)}" if n is not None else f"serial {format_seconds(w)} per item",
    )
    if n is None:
        reasons.append(
            "the number of items is unknown (an iterator): estimates are the "
            "long-run rate, start-up costs amortized"
        )
    if p.workload is Workload.ASYNC:  # coroutines need an event loop, however few
        if n == 0 or p.items == 0:
            return done(
                _Estimate("asyncio", 1, 1, w, "nothing measured"),
                "coroutine function, nothing measured: asyncio",
            )
        return done(_asyncio(p, n, w), *_async_reasons(p, n))
    if p.items == 0 or n == 0:
        return done(serial, "nothing to measure or run: serial")
    if p.workload is Workload.TINY:
        return done(
            serial,
            f"each item takes {format_seconds(w)}, less than any pool spends "
            f"handing an item out (~10-20 us): a plain loop is fastest",
        )
    if n == 1:
        return done(serial, "a single item: nothing to run in parallel")

    item_bytes = _item_bytes(p)
    if memory_bytes is None and item_bytes > 0:
        memory_bytes = _available_memory()
    thread_cap = _memory_cap(item_bytes, memory_bytes, 0)
    process_cap = _memory_cap(item_bytes, memory_bytes, WORKER_BASE_BYTES)
    if p.workload is Workload.IO:
        est = _io_threads(p, n, cores, w, min(max_io_workers, thread_cap or max_io_workers))
        reasons.append(
            f"the items mostly wait (CPU {p.cpu_ratio:.0%} of wall time): threads "
            f"overlap the waiting; {est.workers} threads cover the "
            f"{format_seconds(w)} wait while the CPU part (one thread at a time "
            f"under the GIL) stays below one core"
        )
        if (
            thread_cap is not None
            and est.workers < _io_threads(p, n, cores, w, max_io_workers).workers
        ):
            reasons.append(_memory_reason(p, "threads", est.workers, memory_bytes))
        return _finish(done, serial, est, reasons)

    # CPU-bound: threads and (if everything pickles) processes compete.
    single = w
    if p.uses_native_threads:
        single = max(w, p.cpu_per_item_s)  # cost of one item with its native pool capped at 1
        native_threads = 1
        reasons.append(
            f"each item already keeps {p.cpu_ratio:.1f} cores busy through native "
            f"threads; in parallel, each worker gets 1 native thread (no "
            f"oversubscription), so one item costs ~{format_seconds(single)}"
        )
    if p.workload is Workload.CPU_GIL:
        gil = 0.0 if p.gil_disabled else (p.gil_held_fraction if p.gil_measured else 1.0)
        if p.gil_disabled:
            reasons.append(
                "the items compute in Python, and this interpreter runs without "
                "the GIL: threads run them in parallel with no pickling"
            )
        else:
            held = (
                f"the heartbeat measured the GIL held {gil:.0%} of the time"
                if p.gil_measured
                else "GIL holding assumed (items too short to measure)"
            )
            reasons.append(
                f"the items compute in Python ({held}): threads would take turns, "
                f"processes run them in parallel"
            )
    else:
        gil = max(0.0, p.gil_held_fraction - GIL_SCORE_NOISE) if p.gil_measured else 0.0
        reasons.append(
            "the items compute in native code that releases the GIL: threads run "
            "them in parallel, with no start-up and no pickling"
        )
    threads = _cpu_threads(p, n, min(cores, thread_cap or cores), single, gil)
    candidates = [threads]
    if p.unpicklable:
        reasons.append(f"no processes: {p.unpicklable}")
    else:
        candidates.append(_processes(p, n, min(cores, process_cap or cores), single))
    best = min(candidates, key=lambda e: e.per_item_s)
    if (
        best.backend == "processes"
        and threads.per_item_s <= best.per_item_s * PREFER_THREADS_WITHIN
    ):
        best = threads
    scale_out = _dask(p, n, cores, single, address)
    if scale_out is not None:
        reasons.append(
            f"about {format_seconds(single * (n or 0) / cores)} of work per local "
            f"core, and a cluster at {address}: scale out (the cluster's cores add "
            f"to the estimate below, which is for this machine)"
        )
        return done(
            _Estimate(
                "dask",
                0,
                scale_out.chunksize,
                best.per_item_s,
                f"{serial.basis}; on this machine alone: {best.basis}",
            )
        )
    # Said only if the parallel plan wins over serial.
    details = []
    if best.backend == "processes" and p.arg_pickle_bytes + p.result_pickle_bytes > 0:
        details.append(
            f"processes pay {format_seconds(PROCESS_START_S)} to start and "
            f"{format_seconds(_ipc_s(p))} per item to send arguments "
            f"({format_bytes(p.arg_pickle_bytes)}) and results "
            f"({format_bytes(p.result_pickle_bytes)})"
        )
    if best.chunksize > 1:
        details.append(
            f"chunksize {best.chunksize}: about {format_seconds(TARGET_CHUNK_S)} of "
            f"work per message, with at least {MIN_CHUNKS_PER_WORKER} chunks per "
            f"worker when the count allows, so the last chunks balance out"
        )
    best_cap = thread_cap if best.backend == "threads" else process_cap
    memory_bound = best_cap is not None and best.workers == best_cap < min(cores, n or cores)
    if memory_bound:
        details.append(_memory_reason(p, best.backend, best.workers, memory_bytes))
    if best.workers > 1:
        if n is not None and best.workers == n:
            why = "one per item"
        elif memory_bound:
            why = "as many as fit in memory"
        else:
            why = f"one per usable core ({cores})"
        details.append(f"{best.workers} workers: {why}")
    return _finish(done, serial, best, reasons, details)


def _finish(
    done: Callable[..., Plan],
    serial: _Estimate,
    best: _Estimate,
    reasons: list[str],
    details: list[str] | None = None,
) -> Plan:
    gain = serial.per_item_s / best.per_item_s if best.per_item_s > 0 else 1.0
    if gain < MIN_GAIN:
        return done(
            _Estimate(
                "serial", 1, serial.chunksize, serial.per_item_s, f"{serial.basis}; {best.basis}"
            ),
            f"the best parallel choice, {best.backend}, would run at {gain:.2f}x "
            f"serial speed here (start-up and per-item overheads eat the gain): serial",
        )
    reasons.extend(details or ())
    return done(
        _Estimate(
            best.backend,
            best.workers,
            best.chunksize,
            best.per_item_s,
            f"{serial.basis}; {best.basis}; speed-up {gain:.2f}x",
        )
    )


# --------------------------------------------------------------------------- cores and plan()


def plan(
    fn: Callable[..., Any],
    items: Iterable[Any],
    *,
    sample: int = 64,
    address: str | None = None,
    star: bool = False,
) -> Plan:
    """What ``backend="auto"`` would decide for ``fn`` over ``items``, and why.

    Runs at most the first ``sample`` items exactly as auto starts a run (on
    worker processes, measured there), stopping as soon as the decision
    settles, and plans the whole input from that evidence, with the same
    function auto uses. ``items`` may be a list (its
    length is used) or an iterator (only the sampled items are consumed
    from it, and they are then spent). Each item is one argument
    (``star=True``: a tuple of arguments). With ``address`` (a dask
    scheduler) the plan scales out when the work is much more than this
    machine finishes soon.
    """
    from ._speculate import plan_by_running

    n = len(items) if isinstance(items, Sized) else None
    head = list(islice(iter(items), max(1, sample)))
    sample_args = [tuple(x) for x in head] if star else head
    return plan_by_running(fn, sample_args, n, star=star, address=address)


def _available_memory() -> int | None:
    """Bytes this process could still allocate: the machine's available memory,
    or less when a cgroup (a container) limits it. None: unknown (no cap)."""
    available = _meminfo_available()
    if available is None:
        try:  # not Linux: psutil (imported only here; it costs ~30 ms)
            import psutil

            available = int(psutil.virtual_memory().available)
        except Exception:  # unsupported platform: no memory cap
            return None
    try:  # cgroup v2: a container's limit is lower than the machine's memory
        base = "/sys/fs/cgroup/"
        with open(base + "memory.max") as f:
            limit = f.read().strip()
        with open(base + "memory.current") as f:
            current = int(f.read())
        if limit != "max":
            available = min(available, max(0, int(limit) - current))
    except (OSError, ValueError):
        pass
    return available


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux, ~20 us), bytes; None elsewhere."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

"""The planner's cost model: one estimate of the run's wall time per backend.

Each function here turns a measured :class:`~powerpool._profile.Profile`
into an :class:`_Estimate` for one backend (processes, threads for CPU work,
threads for waiting work, asyncio, dask), following the formulas in
:mod:`powerpool._plan`'s docstring, with the basis of the figure in words;
:func:`~powerpool._plan.plan_from_profile` compares them. Pure: no I/O, no
clock. The constants are the pools' measured overheads.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ._profile import format_bytes, format_seconds

if TYPE_CHECKING:
    from ._profile import Profile

PROCESS_START_S = 0.05
"""Starting a process pool: fork takes ~10 ms, spawn/forkserver plus imports
~100 ms; 50 ms keeps short runs serial without scaring off long ones."""
PROCESS_ITEM_S = 10e-6
"""Parent-side cost per item of chunked IPC, pickling excluded (the engine's target)."""
PIPE_BYTES_PER_S = 1e9
"""Copy rate through a pipe; pickled arguments and results cross it once each."""
THREAD_START_S = 1e-4
"""Starting one thread (~0.1 ms including the hand-shake)."""
THREAD_CHUNK_S = 20e-6
"""Handing one chunk to a thread and its result back (queue, future, wake-ups)."""
THREAD_ITEM_S = 1e-6
"""Per item inside a chunk (the call loop and outcome bookkeeping)."""
ASYNC_START_S = 1e-3
"""Starting an event loop (or reaching the running one) for an asyncio run."""
ASYNC_ITEM_S = 30e-6
"""Creating, scheduling and collecting one task on the event loop."""
MAX_ASYNC_CONCURRENCY = 1000
"""Coroutines in flight at once: enough to hide network latency, few enough
not to exhaust file descriptors or overwhelm the server being called."""
TARGET_CHUNK_S = 0.02
"""Work per chunk: long enough that ~30 us of per-chunk cost is < 0.2%, short
enough that progress, cancellation and load balancing stay responsive."""
MIN_CHUNKS_PER_WORKER = 4
"""At least this many chunks per worker, so a slow chunk does not leave the
other workers idle at the end (the tail is at most 1/4 of a worker's share)."""
SERIAL_MAX_CHUNK = 100_000
"""Chunk cap for serial runs (chunks there only pace progress and statistics)."""
IO_WORKER_TIE = 1.03
"""The fewest I/O threads whose estimate is within this factor of the best."""
WORKER_BASE_BYTES = 40 * 2**20
"""Resident memory of a fresh worker process before its first item."""
DASK_MIN_WORK_PER_CORE_S = 60.0
"""With a cluster address, scale out when the local cores face more than this
much work each: a minute amortizes the cluster's ~1 s set-up and ~1 ms per task."""
DASK_CHUNK_S = 1.0
"""Work per dask task, to amortize the scheduler's ~1 ms per task."""


class _Estimate:
    """One backend's estimate (a plain class: a dataclass costs ~1 ms at import)."""

    __slots__ = ("backend", "basis", "chunksize", "per_item_s", "workers")

    def __init__(
        self, backend: str, workers: int, chunksize: int, per_item_s: float, basis: str
    ) -> None:
        self.backend = backend
        self.workers = workers
        self.chunksize = chunksize
        self.per_item_s = per_item_s  # estimated wall seconds of the run / number of items
        self.basis = basis


def _share(n: int | None, chunksize: int, workers: int) -> float:
    """Items the busiest worker runs, divided by n (1/workers when n is unknown)."""
    if n is None:
        return 1.0 / workers
    chunks = math.ceil(n / chunksize)
    return math.ceil(chunks / workers) * chunksize / n


def _chunksize(n: int | None, workers: int, t: float) -> int:
    size = max(1, math.ceil(TARGET_CHUNK_S / t))
    if n is not None:
        size = min(size, max(1, n // (MIN_CHUNKS_PER_WORKER * workers)))
    return size


def _serial_chunksize(n: int | None, t: float) -> int:
    size = min(SERIAL_MAX_CHUNK, max(1, math.ceil(TARGET_CHUNK_S / t)))
    return min(size, n) if n else size


def _ipc_s(p: Profile) -> float:
    return (
        PROCESS_ITEM_S
        + p.pickle_per_item_s
        + (p.arg_pickle_bytes + p.result_pickle_bytes) / PIPE_BYTES_PER_S
    )


def _times(n: int | None, t: float) -> str:
    if n is None:
        return f"{format_seconds(t)} per item"
    return f"{n} x {format_seconds(t)} = {format_seconds(n * t)}"


def _processes(p: Profile, n: int | None, cores: int, t: float) -> _Estimate:
    workers = min(cores, n) if n is not None else cores
    chunksize = _chunksize(n, workers, t)
    start = PROCESS_START_S + workers * p.fn_pickle_bytes / PIPE_BYTES_PER_S
    ipc = _ipc_s(p)
    share = _share(n, chunksize, workers)
    per_item = (start / n if n else 0.0) + ipc + t * share
    basis = (
        f"processes {format_seconds(start)} start + {_times(n, ipc)} to send + "
        f"{_times(n, t)} / {workers} workers"
    )
    if n is not None:
        basis += f" = {format_seconds(per_item * n)}"
    return _Estimate("processes", workers, chunksize, per_item, basis)


def _cpu_threads(p: Profile, n: int | None, cores: int, t: float, gil: float) -> _Estimate:
    workers = min(cores, n) if n is not None else cores
    chunksize = _chunksize(n, workers, t)
    start = workers * THREAD_START_S
    handoff = THREAD_CHUNK_S / chunksize + THREAD_ITEM_S
    per_item = (
        (start / n if n else 0.0)
        + handoff
        + t * gil
        + t * (1 - gil) * _share(n, chunksize, workers)
    )
    basis = (
        f"threads {format_seconds(start)} start + {_times(n, handoff)} hand-off + "
        f"{gil:.0%} of the work one at a time under the GIL, the rest / {workers} workers"
    )
    if n is not None:
        basis += f" = {format_seconds(per_item * n)}"
    return _Estimate("threads", workers, chunksize, per_item, basis)


def _io_threads(p: Profile, n: int | None, cores: int, t: float, cap: int) -> _Estimate:
    cpu = min(p.cpu_per_item_s, t)  # the CPU part, conservatively all under the GIL
    saturate = math.ceil(cores * t / max(cpu, 1e-6))  # more threads only queue for the CPU
    cap = max(1, min(cap, saturate, n if n is not None else cap))
    handoff = THREAD_CHUNK_S + THREAD_ITEM_S

    def per_item(workers: int) -> float:
        rounds = math.ceil(n / workers) / n if n is not None else 1.0 / workers
        start = workers * THREAD_START_S / n if n is not None else 0.0
        return start + handoff + max(cpu, t * rounds)

    best = cap
    if n is not None:
        # Each thread count is tried at the point where the number of rounds
        # changes; the fewest threads within IO_WORKER_TIE of the best win.
        first_rounds = math.ceil(n / cap)
        options = sorted({math.ceil(n / k) for k in range(first_rounds, first_rounds + 64)})
        fastest = min(per_item(k) for k in options)
        best = min(k for k in options if per_item(k) <= fastest * IO_WORKER_TIE)
    cost = per_item(best)
    basis = (
        f"threads {_times(n, handoff)} hand-off + the larger of the CPU part "
        f"({_times(n, cpu)}) and the waiting in {best} parallel lanes"
    )
    if n is not None:
        basis += f" = {format_seconds(cost * n)}"
    return _Estimate("threads", best, 1, cost, basis)


def _asyncio(p: Profile, n: int | None, t: float) -> _Estimate:
    workers = min(n, MAX_ASYNC_CONCURRENCY) if n is not None else MAX_ASYNC_CONCURRENCY
    cpu = min(p.thread_cpu_per_item_s, t)
    rounds = math.ceil(n / workers) / n if n is not None else 1.0 / workers
    per_item = (ASYNC_START_S / n if n else 0.0) + ASYNC_ITEM_S + max(cpu, t * rounds)
    basis = (
        f"asyncio {_times(n, ASYNC_ITEM_S)} scheduling + the larger of the CPU part "
        f"({_times(n, cpu)}) and the waiting with {workers} in flight"
    )
    return _Estimate("asyncio", workers, 1, per_item, basis)


def _async_reasons(p: Profile, n: int | None) -> tuple[str, ...]:
    workers = min(n, MAX_ASYNC_CONCURRENCY) if n is not None else MAX_ASYNC_CONCURRENCY
    out = [
        f"coroutine function: an event loop runs up to {workers} coroutines at once "
        f"(cap {MAX_ASYNC_CONCURRENCY}, to spare file descriptors and servers)"
    ]
    if p.thread_cpu_per_item_s >= 0.5 * p.wall_per_item_s:
        out.append(
            "but the coroutines mostly compute: an event loop overlaps only waiting, "
            "so expect little gain; a plain function could use processes"
        )
    return tuple(out)


def _dask(p: Profile, n: int | None, cores: int, t: float, address: str | None) -> _Estimate | None:
    if address is None or n is None or p.unpicklable:
        return None
    if t * n / cores <= DASK_MIN_WORK_PER_CORE_S:
        return None
    chunksize = max(1, min(math.ceil(DASK_CHUNK_S / t), n // 100))
    return _Estimate("dask", 0, chunksize, 0.0, "")


def _item_bytes(p: Profile) -> int:
    """Memory one item needs at its peak: tracemalloc's measure when taken, else RSS growth."""
    return p.peak_alloc_bytes if p.peak_alloc_bytes > 0 else p.rss_growth_bytes


def _memory_cap(item_bytes: int, memory_bytes: int | None, base_bytes: int) -> int | None:
    """Most workers whose items fit in ``memory_bytes`` at once (None: no limit known)."""
    if memory_bytes is None or item_bytes <= 0:
        return None
    return max(1, memory_bytes // (item_bytes + base_bytes))


def _memory_reason(p: Profile, backend: str, workers: int, memory_bytes: int | None) -> str:
    measured = (
        "its tracemalloc peak"
        if p.peak_alloc_bytes > 0
        else "how far resident memory rose while sampling"
    )
    base = (
        f" plus {format_bytes(WORKER_BASE_BYTES)} per worker process"
        if backend == "processes"
        else ""
    )
    return (
        f"memory limits the workers: each item needs up to "
        f"{format_bytes(_item_bytes(p))} ({measured}){base}, and "
        f"{format_bytes(memory_bytes or 0)} is available: {workers} {backend} fit"
    )

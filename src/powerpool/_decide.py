"""What auto concludes from measurements taken in the workers: one pure function.

``backend="auto"`` never samples the work in the caller's thread. The run
starts at once on worker processes (see :mod:`powerpool._speculate`); each
worker measures the chunks it runs (wall and CPU time, a GIL heartbeat on
the first chunks, bytes on the wire: :class:`~powerpool._chunk.Measures`).
:class:`Tally` folds those per-chunk reports into an :class:`Evidence`
record, and :func:`decide` turns evidence into a :class:`~powerpool._plan.Plan`
— the same function for a running ``auto`` and for :func:`powerpool.plan`,
so the two always agree on the same evidence.

The decision ladder (each rung measured, none guessed)::

    nothing measured yet            -> processes (start there, isolated)
    items far cheaper than a hand-off (< TINY_S each, >= TINY_MIN_ITEMS seen)
                                    -> the caller's thread (serial), unless isolated
    items mostly wait (CPU < IO_MAX_BUSY of wall, the GIL not held, and seen to
    wait: they blocked, or the heartbeat found the GIL released)
                                    -> threads, as many as overlap the waiting, unless isolated
    items compute and hold the GIL (heartbeat >= GIL_HELD_MIN, or too short to tell)
                                    -> processes
    items compute outside the GIL (heartbeat < GIL_HELD_MIN)
                                    -> threads and processes side by side on real
                                       chunks; the higher measured throughput per
                                       worker wins (TRIAL_THREADS_WITHIN)

"Isolated" means user code must stay out of the caller's process: a fault
option is set (timeout, retries, errors="return"/"skip"), the pool has an
initializer, or the caller asked (``powerpool run``). Then every rung below
"nothing measured" that would leave the workers stays on processes, and the
reason says so.

First calls are not the item's cost: a worker flags the chunk that loaded
the function (``Measures.first``: imports, caches filling); per-item figures
leave such chunks out as soon as warm ones exist. Native thread pools cannot
fool the ladder either: workers cap BLAS/OpenMP at one thread each, and the
threads-versus-processes question for native code is settled by measured
throughput, not by CPU/wall ratios.

The worker count, chunk size and predicted speed-up come from the planner's
cost model (:func:`~powerpool._plan.plan_from_profile`) applied to the
measured figures; the backend is the ladder's. The model is consulted only
where the ladder needs it (the threads' count, a cluster) or when the plan is
read (see :class:`Decision`): a run that stays where it started never loads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from ._chunk import ChunkResult, Measures
from ._units import format_seconds

if TYPE_CHECKING:
    # Imported when first needed, not with this module: a cold auto run forks
    # its workers first and loads the planner while they start.
    from ._plan import Plan
    from ._profile import Profile

TINY_S = 20e-6
"""Per item below this is "tiny": about twice the cheapest per-item overhead of
any pool (~10 us of chunked IPC), so no backend can beat a loop (the profiler
uses the same threshold)."""

IO_MAX_BUSY = 0.5
"""An item computing less than this fraction of the time it was not queued
for a CPU mostly waits ("io"; the profiler uses the same threshold)."""

__all__ = ["Decision", "Evidence", "Tally", "decide"]

TINY_MIN_ITEMS = 8
"""Items that must have been measured below TINY_S before the caller's thread
takes over: one cheap first item is not proof (a heavy-tailed input could
start with a trivial item); 8 is powerpool.plan()'s default sample, and 8
trivial items cost a worker well under 1 ms."""

BATCH_ITEMS = 8
"""Chunks of at least this many items measure a tiny item's own cost: a
worker's fixed cost per chunk (waking, bookkeeping: 5-20 us on a loaded
machine) is then at most a few us per item. One-item chunks cannot tell a
1 us item from a 20 us one."""

MAYBE_TINY_S = 1e-3
"""One-item chunks faster than this may hide tiny items under the per-chunk
cost (a fresh worker's first chunks, on a loaded machine, took 20-230 us for
``abs``): the decision waits for a chunk of BATCH_ITEMS items (a few ms)."""

IO_MIN_BLOCKS = 0.5
"""Voluntary switches per item below which items never really waited: a low
CPU/wall ratio then means a starved CPU (a loaded or throttled machine), not
I/O. A sleeping or fetching item blocks at least once."""

DECIDE_MIN_CHUNKS = 2
"""Chunks measured before a decision is final: one chunk can land on a
preempted worker; two already come from both ends of a 2-core machine."""

GIL_HELD_MIN = 0.5
"""Heartbeat score from which the GIL counts as held (pure Python scores ~1,
GIL-releasing native code ~0)."""

GIL_MIN_SAMPLES = 2
"""Probe chunks whose heartbeat must say "released" (on average) before threads are
tried: on a loaded machine one chunk of pure Python can score low by chance."""

TRIAL_MIN_CHUNKS = 2
"""Chunks each side of a threads-versus-processes trial must finish (after the
trial began) before the throughputs are compared."""

TRIAL_THREADS_WITHIN = 0.85
"""Threads win the trial when their measured items per second per worker reach
this fraction of the processes': threads need no pickling, share memory and
start at once, so a near tie goes to them."""


# Named tuples, not dataclasses: see "Records" in docs/architecture.md.
class Trial(NamedTuple):
    """Throughput of the same function on threads and on processes, measured side by side."""

    threads_items_per_s: float
    """Items per second per thread (items / seconds the threads were busy)."""
    processes_items_per_s: float
    """Items per second per worker process."""

    @property
    def threads_win(self) -> bool:
        """Whether threads ran within TRIAL_THREADS_WITHIN of processes."""
        return self.threads_items_per_s >= TRIAL_THREADS_WITHIN * self.processes_items_per_s


class Evidence(NamedTuple):
    """What the workers measured about one function's items."""

    function: str
    """Qualified name of the function."""
    items: int
    """Items measured (first calls included; the per-item figures leave those
    out as soon as warm chunks exist)."""
    chunks: int
    """Chunks those items came in."""
    wall_per_item_s: float
    """Mean seconds per item while it ran on a worker."""
    cpu_per_item_s: float
    """Mean CPU seconds per item (a worker process's threads all count)."""
    gil_held: float | None
    """Mean heartbeat score of GIL holding, 0..1; None: not measured (items too short)."""
    wire_bytes_per_item: int
    """Pickled arguments plus result per item, as they crossed the pipes (0: never did)."""
    first_call_s: float = 0.0
    """Seconds per item of the first-call chunks left out (imports, warm-up), 0 if none."""
    measured_on: tuple[str, ...] = ()
    """Backends the items were measured on."""
    trial: Trial | None = None
    """Threads versus processes measured side by side, when a trial ran."""
    queued_per_item_s: float = 0.0
    """Seconds per item the worker was ready but waited for a CPU (a loaded machine)."""
    warm: bool = False
    """Whether the figures come from warm chunks (not the function's first call)."""
    gil_samples: int = 0
    """Chunks the GIL score rests on."""
    blocks_per_item: float | None = None
    """Times per item the worker blocked (I/O, sleep, locks); None: not measured."""
    batched_per_item_s: float | None = None
    """Seconds per item over warm chunks of at least BATCH_ITEMS items (the
    per-chunk cost spread thin); None until such a chunk ran."""

    @property
    def item_s(self) -> float:
        """Best estimate of one item's own cost: batched when measured, else per chunk."""
        return (
            self.batched_per_item_s if self.batched_per_item_s is not None else self.wall_per_item_s
        )

    @property
    def busy(self) -> float:
        """CPU / (wall - run-queue wait) per item, capped at 1: 0 waits, 1 computes.

        Time spent queued for a CPU is neither computing nor waiting, so a
        computing item on a loaded machine does not pass for I/O; nor does
        one that never blocked (a throttled machine's lost time is not queued).
        """
        if self.blocks_per_item is not None and self.blocks_per_item < IO_MIN_BLOCKS:
            return 1.0 if self.cpu_per_item_s > 0 else 0.0
        active = self.wall_per_item_s - self.queued_per_item_s
        if active <= 0:
            return 1.0 if self.cpu_per_item_s > 0 else 0.0
        return min(1.0, self.cpu_per_item_s / active)

    def describe(self) -> str:
        """One line: ``12 items on processes: 5.1 ms each, CPU 99%, GIL held 97%``."""
        where = "+".join(self.measured_on) or "nowhere"
        words = [f"{self.items} items on {where}: {format_seconds(self.item_s)} each"]
        words += [
            f"CPU {self.busy:.0%}",
        ]
        if self.gil_held is not None:
            words.append(f"GIL held {self.gil_held:.0%}")
        if self.first_call_s:
            words.append(f"first call {format_seconds(self.first_call_s)} (warm-up, left out)")
        if self.trial is not None:
            words.append(
                f"side by side: threads {self.trial.threads_items_per_s:.1f}, processes "
                f"{self.trial.processes_items_per_s:.1f} items/s per worker"
            )
        return ", ".join(words)


class Decision:
    """The verdict for the evidence so far: where the items run, on how many
    workers, whether more evidence could change it; and the full plan.

    The plan (the planner's cost model: chunk size, predicted speed-up, its
    reasons) is built when first read. A cold run that stays on the worker
    processes it started on never reads it mid-run, and so never loads the
    planner while its workers compute: on 2 cores that import, at the first
    result, took ~10 ms of the caller's CPU and left a worker idle ~15 ms
    (paired cold runs of 300 heavy-tailed items).
    """

    __slots__ = ("_build", "_plan", "backend", "settled", "trial", "workers")

    backend: str
    """Where the items run: processes, threads, serial (your thread) or dask."""
    workers: int
    """Workers (threads, processes) on that backend."""
    settled: bool
    """True once the evidence suffices: later chunks no longer move the decision."""
    trial: bool
    """True when the evidence asks for threads and processes side by side."""

    def __init__(
        self,
        backend: str,
        workers: int,
        settled: bool,
        build: Callable[[], Plan],
        *,
        trial: bool = False,
    ) -> None:
        self.backend, self.workers, self.settled, self.trial = backend, workers, settled, trial
        self._build: Callable[[], Plan] | None = build
        self._plan: Plan | None = None

    @property
    def plan(self) -> Plan:
        """Backend, workers, chunk size, reasons and predicted speed-up (built on first read)."""
        if self._plan is None:
            assert self._build is not None
            self._plan, self._build = self._build(), None
        return self._plan

    def __repr__(self) -> str:
        how = "settled" if self.settled else ("trial" if self.trial else "undecided")
        return f"<Decision {self.backend} x{self.workers}, {how}>"


class _Side:
    """Running sums over one kind of chunk (see Tally)."""

    __slots__ = (
        "blocked_items",
        "blocks",
        "chunks",
        "cpu_s",
        "gil_n",
        "gil_sum",
        "items",
        "queued_s",
        "wall_s",
        "wire",
    )

    def __init__(self) -> None:
        self.chunks = 0
        self.items = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.queued_s = 0.0
        self.wire = 0
        self.gil_sum = 0.0
        self.gil_n = 0
        self.blocks = 0
        self.blocked_items = 0  # items of the chunks that measured blocks

    def add(self, n: int, result: ChunkResult, m: Measures) -> None:
        self.chunks += 1
        self.items += n
        self.wall_s += result.busy_s
        self.cpu_s += m.cpu_s
        self.queued_s += m.queued_s
        self.wire += m.wire_bytes
        if m.gil is not None:
            self.gil_sum += m.gil
            self.gil_n += 1
        if m.blocks >= 0:
            self.blocks += m.blocks
            self.blocked_items += n

    def merged(self, other: _Side) -> _Side:
        out = _Side()
        for name in _Side.__slots__:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out


_ALONE = ("processes", "serial")
"""Backends whose chunks measure the item alone: a worker process, or the
caller's thread with nothing else of the run in it. A worker thread's wall
time includes waiting for the GIL held by its siblings, which would pass
for I/O; threads' chunks count only when nothing else was measured, and in
trials."""


class Tally:
    """Folds per-chunk measurements into :class:`Evidence` (the run's thread only).

    Chunks that failed still count (their time was spent); chunks reported
    without measurements (lost, timed out) are skipped. First-call chunks
    are kept apart and used only until warm ones exist.
    """

    def __init__(self, function: str) -> None:
        self._function = function
        # (measured alone, first call) -> sums
        self._sides = {
            (alone, first): _Side() for alone in (True, False) for first in (True, False)
        }
        self._batched = [0, 0.0]  # items, seconds: warm chunks of >= BATCH_ITEMS, measured alone
        self._on: dict[str, None] = {}
        # Trial bookkeeping: backend name -> [chunks, items, busy seconds].
        self._trial: dict[str, list[float]] | None = None
        self._trial_result: Trial | None = None

    def add(self, backend: str, result: ChunkResult) -> None:
        """Record one finished chunk run on ``backend``."""
        m = result.measures
        n = len(result.chunk)
        if m is None or n == 0:
            return
        self._on[backend] = None
        alone = backend in _ALONE
        self._sides[(alone, m.first)].add(n, result, m)
        if alone and not m.first and n >= BATCH_ITEMS:
            self._batched[0] += n
            self._batched[1] += max(0.0, result.busy_s - m.queued_s)
        if self._trial is not None and backend in self._trial and not m.first:
            entry = self._trial[backend]
            entry[0] += 1
            entry[1] += n
            entry[2] += result.busy_s

    @property
    def alone(self) -> bool:
        """Whether any chunk was measured alone (in a worker process or the caller's thread)."""
        return bool(self._sides[(True, False)].chunks or self._sides[(True, True)].chunks)

    def warm_cpu(self) -> tuple[int, float]:
        """(items, CPU seconds) over every warm chunk, threads' included.

        Unlike wall time, CPU time is the item's own wherever it ran: a thread
        waiting for the GIL spends none. So this is the better-sampled CPU per
        item once a run has moved to threads (hundreds of items there against
        the few first chunks in worker processes, where one stray chunk, a GC
        pass or a worker's housekeeping, can weigh a lot).
        """
        items, cpu = 0, 0.0
        for (_, first), side in self._sides.items():
            if not first:
                items += side.items
                cpu += side.cpu_s
        return items, cpu

    def start_trial(self, *backends: str) -> None:
        """Begin counting throughput per backend from now on (chunks finished before are not)."""
        self._trial = {name: [0, 0, 0.0] for name in backends}

    def trial_done(self) -> bool:
        """Whether every side of the running trial finished TRIAL_MIN_CHUNKS warm chunks."""
        if self._trial is None:
            return False
        return all(entry[0] >= TRIAL_MIN_CHUNKS for entry in self._trial.values())

    def end_trial(self) -> Trial | None:
        """Settle the trial (threads vs processes) into a :class:`Trial`."""
        if self._trial is None:
            return self._trial_result
        rates = {
            name: (entry[1] / entry[2] if entry[2] > 0 else 0.0)
            for name, entry in self._trial.items()
        }
        self._trial = None
        self._trial_result = Trial(rates.get("threads", 0.0), rates.get("processes", 0.0))
        return self._trial_result

    def evidence(self) -> Evidence:
        """The evidence so far: warm chunks when there are any, else the first-call ones."""
        alone = self.alone
        warm = self._sides[(alone, False)]
        cold = self._sides[(alone, True)]
        use = warm if warm.items else cold
        both = warm.merged(cold)
        gil = both.gil_sum / both.gil_n if both.gil_n else None
        wall = use.wall_s / use.items if use.items else 0.0
        first_call = cold.wall_s / cold.items if cold.items and warm.items else 0.0
        if first_call < 2 * wall:
            first_call = 0.0  # no real warm-up: not worth a word
        return Evidence(
            function=self._function,
            items=both.items,
            chunks=both.chunks,
            wall_per_item_s=wall,
            cpu_per_item_s=use.cpu_s / use.items if use.items else 0.0,
            gil_held=gil,
            wire_bytes_per_item=(use.wire // use.items) if use.items else 0,
            first_call_s=first_call,
            measured_on=tuple(self._on),
            trial=self._trial_result,
            queued_per_item_s=use.queued_s / use.items if use.items else 0.0,
            warm=bool(warm.items),
            blocks_per_item=use.blocks / use.blocked_items if use.blocked_items else None,
            gil_samples=both.gil_n,
            batched_per_item_s=(
                self._batched[1] / self._batched[0] if alone and self._batched[0] else None
            ),
        )


def decide(
    evidence: Evidence,
    n_items: int | None,
    *,
    cores: int,
    workers: int | None = None,
    isolate: str | None = None,
    address: str | None = None,
) -> Decision:
    """The plan for ``n_items`` items (None: unknown) given ``evidence``.

    ``workers`` is the user's fixed worker count (None: the plan's).
    ``isolate`` says why user code must stay in workers (None: it need not).
    ``address`` (a dask scheduler) lets computing work scale out when the
    planner's model says this machine alone would take too long.
    Pure: no clock, no I/O.
    """
    return _ladder(
        evidence, n_items, cores=cores, workers=workers, isolate=isolate, address=address
    )


def _ladder(  # noqa: PLR0911 - one return per rung, each explained
    e: Evidence,
    n_items: int | None,
    *,
    cores: int,
    workers: int | None,
    isolate: str | None,
    address: str | None,
) -> Decision:
    said = f"measured {e.describe()}"
    count = workers or cores

    def isolated(plan: Plan) -> Plan:
        if isolate is None or any(isolate in reason for reason in plan.reasons):
            return plan
        return dataclasses.replace(plan, reasons=(isolate, *plan.reasons))

    if e.items == 0:
        why = "nothing measured yet: the items start on worker processes at once, each measured"
        reason = f"{why} where it runs"
        return Decision(
            "processes",
            count,
            False,
            lambda: isolated(_plan("processes", count, n_items, cores, reason)),
        )
    models: list[Plan] = []

    def model() -> Plan:
        """The planner's cost model for this evidence (loads the planner on first use)."""
        if not models:
            from ._plan import plan_from_profile

            models.append(plan_from_profile(_as_profile(e), n_items, cores=cores, address=address))
        return models[0]

    def go(backend: str, reason: str, settled: bool, *, size: int = count) -> Decision:
        return Decision(
            backend, size, settled, lambda: isolated(_from_model(model(), backend, size, reason))
        )

    # A first call may include imports and warm-up: computing (or tiny) is
    # only settled on warm chunks. Waiting is not something warm-up fakes.
    enough = e.chunks >= DECIDE_MIN_CHUNKS and e.warm
    waited = e.chunks >= DECIDE_MIN_CHUNKS
    if e.batched_per_item_s is None and e.wall_per_item_s < MAYBE_TINY_S:
        batch = f"a chunk of {BATCH_ITEMS}+ items will tell whether the items are tiny"
        return go("processes", f"{said}; too quick to price from one-item chunks: {batch}", False)
    if e.item_s < TINY_S:
        proven = enough and e.items >= TINY_MIN_ITEMS
        cheap = f"each item is cheaper than any hand-off to a worker (< {format_seconds(TINY_S)})"
        why = f"{said}; {cheap}"
        if isolate is not None:
            return go("processes", f"{why}, but {isolate}: processes, in large chunks", proven)
        if not proven:
            unproven = f"not proven until {TINY_MIN_ITEMS} items were measured"
            return go("processes", f"{why}; {unproven}", False)
        return go("serial", f"{why}: the rest runs in your thread, a plain loop", True, size=1)
    # Waiting releases the GIL (sleep, sockets, files): a heartbeat that found
    # it held means the items computed and the CPU figure was starved (a
    # preempted worker on a loaded VM, where even the run queue misses time).
    gil_held = e.gil_held is not None and e.gil_held >= GIL_HELD_MIN
    if e.busy < IO_MAX_BUSY and not gil_held:
        why = f"{said}; the items mostly wait (CPU {e.busy:.0%} of wall)"
        if e.blocks_per_item is None and e.gil_held is None:
            # Low CPU alone is no proof: under the heartbeat (blocks not
            # counted) a computing item on a starved machine waits too, for
            # its own GIL while the heartbeat sits in the run queue.
            unproven = "not proven until the items are seen to block (a starved CPU idles too)"
            return go("processes", f"{why}; {unproven}", False)
        if isolate is not None:
            overlap = "processes overlap the waiting one item per worker"
            return go("processes", f"{why}, but {isolate}: {overlap}", waited)
        lanes = workers or (model().workers if model().backend == "threads" else cores)
        return go("threads", f"{why}: {lanes} threads overlap the waiting", waited, size=lanes)
    if e.gil_held is None or e.gil_held >= GIL_HELD_MIN:
        held = (
            "the GIL was not measured (items too short for the heartbeat): pure Python holds it"
            if e.gil_held is None
            else f"the heartbeat found the GIL held {e.gil_held:.0%} of the time"
        )
        why = f"{said}; the items compute and {held}"
        if address is not None and model().backend == "dask":  # more than this machine's work
            return go("dask", f"{why}: {model().reasons[-1]}", enough, size=0)
        return go("processes", f"{why}: processes run them in parallel", enough)
    why = f"{said}; the items compute outside the GIL (held {e.gil_held:.0%})"
    if e.gil_samples < GIL_MIN_SAMPLES:  # one noisy heartbeat is no reason to try threads
        return go("processes", f"{why}, by one chunk's heartbeat: measuring more", False)
    if isolate is not None:
        return go("processes", f"{why}, but {isolate}: processes", enough)
    t = e.trial
    if t is None:
        trial = "threads and processes now run real chunks side by side, the faster per worker"
        decision = go("processes", f"{why}: {trial} keeps the rest", False)
        decision.trial = True  # not settled: the trial's chunks decide
        return decision
    side = (
        f"{why}; side by side, threads ran {t.threads_items_per_s:.1f} items/s per worker, "
        f"processes {t.processes_items_per_s:.1f}"
    )
    return go("threads" if t.threads_win else "processes", side, True)


def _as_profile(e: Evidence) -> Profile:
    """The evidence in the planner's terms, so its cost model sizes workers and chunks."""
    from ._profile import Profile, Workload

    if e.item_s < TINY_S:
        workload = Workload.TINY
    elif e.busy < IO_MAX_BUSY and not (e.gil_held is not None and e.gil_held >= GIL_HELD_MIN):
        workload = Workload.IO
    elif e.gil_held is not None and e.gil_held < GIL_HELD_MIN:
        workload = Workload.CPU_NATIVE
    else:
        workload = Workload.CPU_GIL
    half = e.wire_bytes_per_item // 2
    scale = e.item_s / e.wall_per_item_s if e.wall_per_item_s > 0 else 0.0
    return Profile(
        items=e.items,
        wall_per_item_s=e.item_s,
        cpu_per_item_s=e.cpu_per_item_s * scale,
        thread_cpu_per_item_s=e.cpu_per_item_s * scale,
        gil_held_fraction=e.gil_held if e.gil_held is not None else 0.0,
        arg_pickle_bytes=half,
        result_pickle_bytes=e.wire_bytes_per_item - half,
        pickle_per_item_s=0.0,
        peak_rss_bytes=0,
        workload=workload,
        evidence=(e.describe(),),
        hotspots=(),
        profiling_s=0.0,  # measured while the work ran: no time of its own
        function=e.function,
        gil_measured=e.gil_held is not None,
    )


def _from_model(model: Plan, backend: str, workers: int, reason: str) -> Plan:
    """The model's plan, with the ladder's backend and worker count (and its figures redone)."""
    if model.backend == backend and model.workers == workers:
        return dataclasses.replace(model, reasons=(reason, *model.reasons))
    # The model priced another backend: this one can at best run one item per worker.
    speedup = 1.0 if backend == "serial" else float(min(workers, model.n_items or workers))
    return dataclasses.replace(
        model,
        backend=backend,
        workers=workers,
        chunksize=model.chunksize,
        expected_speedup=round(speedup, 2),
        reasons=(reason,),
        expected_s=None,
        basis=f"the model's own pick was {model.backend} x{model.workers}; {model.basis}",
    )


def _plan(backend: str, workers: int, n: int | None, cores: int, reason: str) -> Plan:
    """A plan with nothing measured to price it: one item per worker at best."""
    from ._plan import Plan

    return Plan(
        backend=backend,
        workers=workers,
        chunksize=1,
        expected_speedup=float(workers),
        reasons=(reason,),
        profile=None,
        n_items=n,
        cores=cores,
    )

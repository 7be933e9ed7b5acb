"""``backend="auto"``: start the work in parallel at once, decide while it runs, switch if needed.

Design (auto v2)::

    call ──► Steer.routes(): processes (cold)  or  what this code ran on last time (warm)
              │
              ▼
    Run ── chunks ──► route(s) ──► workers run items, measure each chunk
     ▲                                   (wall, CPU, GIL heartbeat, bytes: Measures)
     │                                          │
     └── Steer.observe(result) ◄── ChunkResult ─┘
             │  Tally -> Evidence -> decide()   (pure, shared with powerpool.plan)
             └─► new routes?  processes -> threads   (items wait)
                              processes -> caller    (items proven tiny)
                              processes + threads    (native code: a side-by-side trial,
                                                      the faster per worker keeps the rest)
                              threads -> more threads (lanes counted on first calls,
                                                      recounted on warm chunks)

* **No serial sample.** The first chunks go to worker processes the moment
  the call is made (one item each, a few per worker, probed), so every core
  is busy after one pool start, whatever the core count: the cost of
  deciding is a few chunks' latency, not one item per core.
* **One switching mechanism.** A route is a backend with its own in-flight
  window (:class:`powerpool._run.Run`); the steer hands the run a new set of
  routes. Chunks already sent finish where they are and report to the same
  inbox; new and retried chunks go to the new routes. So no item runs twice,
  order and retries stay the core's job, written once.
* **Isolation.** User code enters the caller's process (threads, or the
  caller's thread for tiny items) only when the evidence proves it pays and
  nothing asks for isolation: a fault option (timeout, retries,
  errors="return"/"skip"), an initializer, or ``powerpool run``. Otherwise
  every item runs in a worker process, where a segfault fails one item and
  ``timeout=`` holds from the first item on.
* **Memory by code identity.** A settled decision is remembered per code
  object (``fn.__code__``; the function itself for builtins), so a second
  call of the same function starts where the first one ended (the caller's
  thread for tiny work, threads for waiting) without paying for processes
  again — and keeps measuring, so it switches back if the items changed.
  Code identity, not function identity: a closure re-created per call still
  hits, and a function redefined with new code does not.
* **Honest plans.** The plan printed with ``explain=True`` (stderr, at the
  decision and at each switch) and kept in ``pool.last_plan`` is the one the
  run is following; at the end it records the workers and chunk sizes used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from functools import partial
from typing import TYPE_CHECKING, Any

from ._decide import (
    BATCH_ITEMS,
    IO_MAX_BUSY,
    MAYBE_TINY_S,
    Decision,
    Evidence,
    Tally,
    decide,
)

if TYPE_CHECKING:
    from ._backends import Backend
    from ._chunk import ChunkResult
    from ._plan import Plan

__all__ = ["Steer", "code_key", "forget", "plan_by_running"]

UNDECIDED_MAX_CHUNK = 64
"""Largest chunk cut before the decision settles: small enough that a wrong
first backend holds little work (and that tiny items prove themselves in a
round trip or two), large enough to measure tiny items' cost above the
chunk's own overhead."""

UNDECIDED_CHUNK_S = 0.01
"""Work per chunk while undecided (the batch that proves items tiny aside).
A chunk sent before a switch finishes on the old backend: chunks of 0.1 s
(the process engine's target) would leave 20 ms waits running five at a
time on a worker long after the run moved to threads. Smaller costs more
round trips, but only until the decision (a few chunks per worker)."""

PROBE_CHUNKS = 4
"""Chunks sent with the GIL heartbeat while undecided (the first ones, whatever
the worker count): enough for GIL_MIN_SAMPLES even if some are first calls or
too short to score. Per worker it was 32 probes on 16 cores, every item of a
short run carrying a heartbeat that slows pure Python a little."""

MAX_SWITCHES = 4
"""Switches one run may make: enough for a trial and a correction, few enough
that noisy evidence cannot make the run flap between backends."""

RECHECK_FIRST = 4
"""Chunks after a settled decision before it is looked at again; each later
look waits twice as long. A run whose items change (a remembered tiny
function given heavy inputs) is caught within a few chunks; a steady one
pays for a handful of decisions in all, not one per chunk."""

GIL_BOUND_CORES = (0.75, 1.25)
"""Threads whose CPU adds up to between these many cores may be queueing for
the GIL, not waiting: one GIL lets pure Python use one core at a time, so
computing items on many threads add up to ~1 core, however many there are.
Waiting items add up to far less; native code that releases the GIL to more
(on 2+ cores). Such a run is re-measured on worker processes: only there is
an item measured alone (on threads a wait for the GIL looks like I/O)."""

GIL_BOUND_MIN_S = 0.05
"""Wall time a run must have spent on threads before its threads' CPU rate is
trusted: thread start-up and the first chunks make the rate noisy before."""

LANES_GROWTH = 1.25
"""Factor by which the decided thread count must exceed the running threads
backend's before the run moves to a bigger one. The first decision on
waiting work rests on the first-call chunks, whose CPU per item includes
the worker's warm-up (~0.1 ms against a 20 ms sleep's ~0.05 ms): the lanes
priced on it are too few (100 where warm chunks say 200). Growing costs a
new backend's thread starts (~0.1 ms each) while the old one's threads sit
idle; below 25% more lanes that buys less than it costs. Never shrinks:
surplus threads only wait for the GIL."""

MEMORY_SIZE = 256
"""Functions whose settled plan is remembered (least recently used dropped)."""

_IN_PROCESS = ("serial", "threads")

_memory: OrderedDict[Hashable, Evidence] = OrderedDict()
_memory_lock = threading.Lock()


def code_key(fn: Callable[..., Any]) -> Hashable | None:
    """What identifies ``fn``'s code across calls: its code object, else itself if hashable."""
    while isinstance(fn, partial):
        fn = fn.func
    target = getattr(fn, "__func__", fn)  # bound methods share their function's code
    code = getattr(target, "__code__", None)
    if code is not None:
        return code  # type: ignore[no-any-return]
    try:
        hash(fn)
    except TypeError:
        return None
    return fn


def forget() -> None:
    """Drop every remembered plan (tests; or after the machine changed)."""
    with _memory_lock:
        _memory.clear()


class Steer:
    """Chooses, and changes, where one auto run's chunks go (see the module docstring).

    Called from the run's thread only: :meth:`routes` once, :meth:`observe`
    after each finished chunk.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        total: int | None,
        cores: int,
        workers: int | None,
        isolate: str | None,
        explain: bool,
        address: str | None = None,
        backend_for: Callable[[str, int], Backend],
        on_plan: Callable[[Callable[[], Plan | None]], None],
    ) -> None:
        self._fn = fn
        self._total = total
        self._cores = cores
        self._workers = workers
        self._isolate = isolate
        self._address = address
        self._explain = explain
        self._backend_for = backend_for
        self._on_plan = on_plan
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        self._name = name
        self._tally = Tally(name)
        self._prior: Evidence | None = None  # remembered from an earlier call, if used
        self._key = code_key(fn)
        self._started = time.perf_counter()
        self._switches: list[str] = []
        self._since_switch = 0
        self._next_look = RECHECK_FIRST
        self._probes_left = 0
        self._routes: list[Backend] = []
        self._settled = False
        self._deferred = False  # routes() sent work before deciding: begin() decides
        self._deferred_probes = False  # routes() already counted the probe chunks
        self._was_settled = False
        self._trial = False
        self._first_call_lanes = False  # the threads' count rests on first-call chunks only
        self._chunks: dict[str, list[int]] = {}  # backend -> [chunks, items] it ran
        self._threads_cpu = 0.0  # CPU seconds the threads' chunks took, since threads began
        self._threads_since: float | None = None  # when the run began on threads
        self._shown: Decision | None = None  # the decision whose plan is being followed

    @property
    def plan(self) -> Plan | None:
        """The plan being followed now (built when first read: see :class:`Decision`)."""
        return self._shown.plan if self._shown is not None else None

    # -- what the run asks ------------------------------------------------------

    @property
    def settled(self) -> bool:
        """Whether the decision is final (later chunks no longer move it)."""
        return self._settled and not self._trial

    def max_chunk(self, per_item_s: float | None) -> int | None:
        """Cap on chunk size while undecided (None once settled), given the
        per-item time measured so far (None: nothing measured yet)."""
        if self._settled:
            return None
        if per_item_s is None or per_item_s <= 0:
            return UNDECIDED_MAX_CHUNK
        cap = int(UNDECIDED_CHUNK_S / per_item_s)
        if per_item_s < 2 * MAYBE_TINY_S:
            cap = max(cap, BATCH_ITEMS)  # the batch that tells whether items are tiny
        return max(1, min(UNDECIDED_MAX_CHUNK, cap))

    @property
    def remembered_item_s(self) -> float | None:
        """Seconds per item measured on an earlier call this run started from (None: cold)."""
        prior = self._prior
        if prior is None or not self._settled:
            return None
        return prior.item_s if prior.item_s > 0 else None

    def probe(self) -> bool:
        """Whether the next chunk should carry the GIL heartbeat."""
        if self._probes_left <= 0 or self._settled:
            return False
        self._probes_left -= 1
        return True

    def routes(self) -> list[Backend]:
        """Where the first chunks go: the remembered plan's backend, else processes."""
        remembered = self._remembered()
        self._prior = remembered
        if remembered is None:
            # Cold: the first chunks go to worker processes before anything is
            # decided; the first decision comes at the first result (begin()),
            # while the workers already run the next chunks, and loads the
            # planner's model only if the run moves (see Decision).
            count = self._workers or self._cores
            self._routes = [self._backend_for("processes", count)]
            self._probes_left = PROBE_CHUNKS
            self._deferred = self._deferred_probes = True
            return self._routes
        decision = self._decide()
        if remembered is not None:
            # The same function of the same evidence, for this run's size.
            again = self._decide(remembered)
            if again.settled and (self._isolate is None or again.backend not in _IN_PROCESS):
                why = (
                    f"as measured on an earlier call of the same code ({remembered.describe()}); "
                    "still measuring, so a change in the items switches backend"
                )
                decision = _with_reason(again, why, settled=True)
        self._apply(decision, first=True)
        return self._routes

    def started(self) -> None:
        """The run's first chunks are on their way (called by the run).

        A cold start decides at the first result (:meth:`observe`): until then
        the caller's thread only waits, so the process engine's dispatcher
        (a thread of this process) sends the first chunks without competing
        for the GIL with the decision's imports. With ``explain=True`` the
        starting plan is printed now instead.
        """
        if self._explain:
            self.begin()

    @property
    def deciding(self) -> bool:
        """Whether the next :meth:`observe` takes the run's first decision (a cold
        start): the run refills its workers first, so that none waits while the
        decision is taken (its first steps cost the caller a few ms of CPU, more
        when the run moves and loads the planner's model)."""
        return self._deferred

    def begin(self) -> None:
        """Take the first decision now if :meth:`routes` left it for later (a no-op otherwise)."""
        if self._deferred:
            self._deferred = False
            self._apply(self._decide(), first=True)

    def observe(  # noqa: PLR0911 - each return is one reason to keep or change the routes
        self, backend: str, result: ChunkResult
    ) -> list[Backend] | None:
        """Take one finished chunk; new routes when the run should switch, else None."""
        self.begin()
        counts = self._chunks.setdefault(backend, [0, 0])
        counts[0] += 1
        counts[1] += len(result.chunk)
        self._tally.add(backend, result)
        self._since_switch += 1
        if backend == "threads" and result.measures is not None:
            self._threads_cpu += result.measures.cpu_s
            cores = self._gil_bound_cores()
            if cores is not None:
                return self._remeasure_alone(cores)
        if self._trial:
            if not self._tally.trial_done():
                return None
            self._tally.end_trial()
            self._trial = False
        elif self._settled and self._since_switch < self._next_look:
            return None  # settled: look again ever more rarely (the evidence only firms up)
        elif self._settled:
            self._next_look *= 2
        elif not self._tally.alone:
            return None  # only threads measured: GIL waits there would pass for I/O
        decision = self._decide()
        if not decision.settled and not decision.trial:
            if self._prior is None:  # a remembered plan stands until this run's own settles
                self._shown = decision
            return None
        if len(self._switches) >= MAX_SWITCHES:
            self._settled = True
            return None
        before = self._routes
        self._apply(decision)
        return self._routes if self._routes is not before else None

    def finish(self) -> Callable[[], Plan | None]:
        """The run has ended: keep what it measured for the next call of the same
        code, and return the plan as it ran (:meth:`final_plan`'s), built when
        first called: a run that never moved never loads the planner's model
        (see :class:`~powerpool._decide.Decision`) unless its plan is read."""
        own = self._remembrance()
        if self._key is not None and self._tally.alone and self._decide(own).settled:
            # Only evidence that settles a decision by itself replaces what was kept.
            with _memory_lock:
                _memory[self._key] = own
                _memory.move_to_end(self._key)
                while len(_memory) > MEMORY_SIZE:
                    _memory.popitem(last=False)
        # The values the plan is built from, not the steer: the pool keeps this
        # by function in a weak dictionary, which the steer (holding the
        # function) would keep from ever letting go.
        shown, explain = self._shown, self._explain
        workers = self._routes[0].workers if self._routes else None
        chunks = {name: (c[0], c[1]) for name, c in self._chunks.items()}
        switches = tuple(self._switches)
        built: list[Plan | None] = []

        def ran() -> Plan | None:
            if not built:
                plan = None if shown is None else _as_ran(shown.plan, workers, chunks, switches)
                if explain and plan is not None:
                    print(f"powerpool auto: ran\n{plan}", file=sys.stderr, flush=True)
                built.append(plan)
            return built[0]

        if explain:
            ran()  # printed as the run ends
        return ran

    def final_plan(self) -> Plan | None:
        """The plan as it ran: workers and mean chunk size used on the last backend
        (and what the run measured kept, as :meth:`finish` does)."""
        return self.finish()()

    def _remembrance(self) -> Evidence:
        """This run's evidence as the next call of the same code will start from it.

        For waiting work the thread count rests on CPU per item, which the few
        first chunks in worker processes measure poorly (one chunk with a few
        ms of a worker's own housekeeping once made a 20 ms sleep look 10%
        busy: 10 threads instead of 200 on the next call, 0.9 s instead of
        0.1 s); the threads that ran the rest measured it on every item.
        """
        own = self._tally.evidence()
        if own.busy >= IO_MAX_BUSY:
            return own  # computing: CPU per item decides nothing about lanes
        items, cpu = self._tally.warm_cpu()
        if not items:
            return own
        better = own._replace(cpu_per_item_s=cpu / items)
        waiting = better.busy < IO_MAX_BUSY and self._decide(better).backend == "threads"
        return better if waiting else own

    def evidence(self) -> Evidence:
        """What this run measured so far; the remembered evidence it started from while
        its own is too thin to settle a decision (a short run of a remembered function)."""
        own = self._tally.evidence()
        if self._prior is not None and not self._decide(own).settled:
            return self._prior
        return own

    @property
    def in_process_items(self) -> int:
        """Items that ran in the caller's process (its thread, or its threads)."""
        return sum(c[1] for name, c in self._chunks.items() if name in _IN_PROCESS)

    # -- internals ----------------------------------------------------------------

    def _gil_bound_cores(self) -> float | None:
        """The cores a run measured on threads alone used together, when that is
        about one, what one GIL allows (see GIL_BOUND_CORES); None otherwise."""
        if self._tally.alone or self._cores < 2 or self._threads_since is None:
            return None
        if len(self._switches) >= MAX_SWITCHES or self._isolate is not None:
            return None
        elapsed = time.perf_counter() - self._threads_since
        if elapsed < GIL_BOUND_MIN_S:
            return None
        cores = self._threads_cpu / elapsed
        low, high = GIL_BOUND_CORES
        return cores if low <= cores <= high else None

    def _remeasure_alone(self, cores: float) -> list[Backend]:
        """Move the run to worker processes, undecided, with the GIL heartbeat:
        the next chunks are measured alone and decide where the rest runs."""
        cold = decide(
            Tally(self._name).evidence(),
            self._total,
            cores=self._cores,
            workers=self._workers,
        )
        why = (
            f"on threads the items used {cores:.1f} cores together, what one GIL allows: "
            "they may compute, not wait; measuring them alone on worker processes"
        )
        self._prior = None  # this run's own evidence decides from here on
        if self._key is not None:
            with _memory_lock:  # nor does the next call start from the old memory
                _memory.pop(self._key, None)
        self._apply(_with_reason(cold, why, settled=False))
        self._probes_left = PROBE_CHUNKS
        return self._routes

    def _more_lanes(self, decision: Decision) -> bool:
        """Whether ``decision`` wants LANES_GROWTH times the threads the run has
        now, which were counted on first-call chunks (see LANES_GROWTH).

        Only then: counted on warm chunks, the lanes are as well priced as
        they get, and each growth is a new backend's worth of thread starts.
        """
        threads = decision.backend == "threads"
        if not self._first_call_lanes or not threads or len(self._routes) != 1:
            return False
        return decision.workers >= LANES_GROWTH * max(1, self._routes[0].workers)

    def _plan_now(self) -> Plan | None:
        """The plan being followed now, for the pool's ``last_plan`` (read when asked)."""
        return self.plan

    def _remembered(self) -> Evidence | None:
        if self._key is None:
            return None
        with _memory_lock:
            return _memory.get(self._key)

    def _decide(self, evidence: Evidence | None = None) -> Decision:
        return decide(
            evidence if evidence is not None else self._tally.evidence(),
            self._total,
            cores=self._cores,
            workers=self._workers,
            isolate=self._isolate,
            address=self._address,
        )

    def _apply(self, decision: Decision, *, first: bool = False) -> None:
        names = ["processes", "threads"] if decision.trial else [decision.backend]
        old = [b.name for b in self._routes]
        grow = names == old and self._more_lanes(decision)
        changed = names != old or grow
        routes = [] if changed else self._routes  # same backends: keep them as they are
        for name in names if changed else ():
            count = decision.workers if name == decision.backend else (self._workers or self._cores)
            if name == "serial":
                count = 1
            routes.append(self._backend_for(name, count))
        if changed:
            self._first_call_lanes = (
                decision.backend == "threads"
                and self._workers is None
                and self._prior is None
                and not self._tally.evidence().warm
            )
        if decision.trial:
            self._tally.start_trial(*names)
            self._trial = True
        self._settled = decision.settled
        if first and not decision.settled and not self._deferred_probes:
            self._probes_left = PROBE_CHUNKS
        if not first and changed:
            elapsed = time.perf_counter() - self._started
            items = sum(c[1] for c in self._chunks.values())
            was, now = "+".join(old), "+".join(names)
            if grow:
                was, now = f"{was} x{self._routes[0].workers}", f"{now} x{decision.workers}"
            self._switches.append(f"{was} -> {now} after {items} items ({elapsed * 1000:.0f} ms)")
            self._since_switch = 0
            self._next_look = RECHECK_FIRST
        if names == ["threads"] and old != names:
            self._threads_since, self._threads_cpu = time.perf_counter(), 0.0
        elif names != ["threads"]:
            self._threads_since = None
        newly_settled = decision.settled and not self._was_settled
        self._was_settled = self._was_settled or decision.settled
        self._routes = routes
        self._shown = decision
        self._on_plan(self._plan_now)
        if not self._explain:
            return
        if first:
            head = "decided" if decision.settled else "starting, deciding as the items run"
        elif changed:
            head = f"switching {self._switches[-1]}"
        elif newly_settled:
            head = "decided"
        else:
            return
        print(f"powerpool auto: {head}\n{decision.plan}", file=sys.stderr, flush=True)


def _as_ran(
    plan: Plan,
    workers: int | None,
    chunks: dict[str, tuple[int, int]],
    switches: tuple[str, ...],
) -> Plan:
    """``plan`` as a run followed it: the workers and mean chunk size it used on
    the plan's backend (``chunks``: backend -> (chunks, items)), and the
    switches it made."""
    used = chunks.get(plan.backend)
    chunksize = max(1, round(used[1] / used[0])) if used and used[0] else plan.chunksize
    reasons = plan.reasons
    if switches:
        reasons = (*reasons, "switches: " + "; ".join(switches))
    ran = ", ".join(f"{name} {c[1]} items in {c[0]} chunks" for name, c in chunks.items())
    if ran:
        reasons = (*reasons, f"ran: {ran}")
    return dataclasses.replace(
        plan,
        workers=plan.workers if workers is None else workers,
        chunksize=chunksize,
        reasons=reasons,
    )


def _with_reason(decision: Decision, why: str, *, settled: bool) -> Decision:
    """``decision`` with ``why`` as its first reason, settled or not (its plan built when read)."""

    def build() -> Plan:
        plan = decision.plan
        return dataclasses.replace(plan, reasons=(why, *plan.reasons))

    return Decision(decision.backend, decision.workers, settled, build)


def plan_by_running(
    fn: Callable[..., Any],
    sample: list[Any],
    n_items: int | None,
    *,
    star: bool,
    address: str | None = None,
) -> Plan:
    """What auto would decide for ``n_items`` items, from running ``sample`` the way auto does.

    The sample runs exactly as an auto run starts (on worker processes,
    measured there, switching as the evidence says), in a private pool that
    is shut down after; the plan is :func:`decide` on the evidence it left,
    for the whole input: the same function of the same evidence as auto.
    An item that raises ends the sample early; what ran is still evidence.
    """
    from ._pool import Pool
    from ._system import usable_cores

    pool = Pool("auto", progress=False)
    try:
        columns = list(zip(*sample)) if star else [sample]
        if columns:
            results = pool.imap(fn, *columns)
            with contextlib.suppress(Exception):
                for _ in results:
                    steer = pool.steer
                    if steer is not None and steer.settled:
                        break  # decided: the rest of the sample need not run
            results.close()  # type: ignore[attr-defined]
        evidence = pool.last_evidence
    finally:
        pool.shutdown(wait=True)
    if evidence is None:
        evidence = Tally(getattr(fn, "__qualname__", repr(fn))).evidence()
    return decide(evidence, n_items, cores=usable_cores(), address=address).plan

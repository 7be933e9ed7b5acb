"""auto v2: decided in the workers while the work runs; switches keep order and run items once.

No test here asserts a duration or a sample size tied to the machine: they
check where items ran (by pid), what the plan says, and what came back.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import powerpool as pp
from auto_tasks import (
    CRASH_AT,
    busy_for,
    crash_at_7,
    first_sleeps,
    hash_for,
    nap_and_record,
    spin_10ms,
    where_2ms,
)
from powerpool import ItemTimeoutError, WorkerCrashedError
from powerpool._backends import BackendConfig
from powerpool._backends._serial import SerialBackend
from powerpool._chunk import Chunk, ChunkResult, Measures
from powerpool._decide import BATCH_ITEMS, Decision, Evidence, Tally, Trial, decide
from powerpool._ledger import StatsLedger
from powerpool._probes import Heartbeat
from powerpool._run import CHUNKS_IN_FLIGHT_PER_WORKER, Run, RunOptions
from powerpool._speculate import UNDECIDED_MAX_CHUNK, Steer, code_key, forget

ME = os.getpid()


@pytest.fixture(autouse=True)
def fresh_memory() -> None:
    """Each test starts cold: no remembered decisions from other tests."""
    forget()


# --------------------------------------------------------------------------- isolation


@pytest.mark.timeout(120)
def test_computing_items_never_run_in_the_callers_process() -> None:
    with pp.Pool(progress=False) as pool:
        results = pool.map(where_2ms, range(40))
        assert [x for x, _ in results] == list(range(40))
        assert all(pid != ME for _, pid in results)
        assert pool.stats().items_in_caller == 0
        assert pool.last_plan is not None
        assert pool.last_plan.backend == "processes"


@pytest.mark.timeout(120)
def test_a_segfault_fails_one_item_and_the_caller_lives() -> None:
    with pp.Pool(progress=False) as pool:
        results = pool.map(crash_at_7, range(100), errors="return")
        assert isinstance(results[CRASH_AT], WorkerCrashedError)
        assert "SIGSEGV" in str(results[CRASH_AT]) or "signal" in str(results[CRASH_AT])
        assert [r for i, r in enumerate(results) if i != CRASH_AT] == [
            i for i in range(100) if i != CRASH_AT
        ]
        with pytest.raises(WorkerCrashedError):
            pool.map(crash_at_7, range(100))
        assert pool.map(abs, [-1, -2]) == [1, 2]  # still usable


def _run_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a script in a fresh interpreter that imports what this
    one can (powerpool from this checkout, the tests' task modules); it must exit 0."""
    script = tmp_path / "script.py"
    script.write_text(source, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.timeout(120)
def test_a_segfault_under_default_auto_does_not_kill_a_script(tmp_path: Path) -> None:
    done = _run_script(
        tmp_path,
        "import powerpool as pp\n"
        "from auto_tasks import crash_at_7\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        "        pp.map(crash_at_7, range(100))\n"
        "    except pp.WorkerCrashedError as exc:\n"
        "        print('caught', type(exc).__name__)\n",
    )
    assert "caught WorkerCrashedError" in done.stdout


@pytest.mark.timeout(60)
def test_timeout_holds_for_the_first_item() -> None:
    started = time.monotonic()
    with pp.Pool(progress=False) as pool:
        with pytest.raises(ItemTimeoutError):
            pool.map(first_sleeps, range(20), timeout=1)
        assert pool.stats().items_in_caller == 0
    assert time.monotonic() - started < 25  # the item would sleep 30 s: it was stopped


@pytest.mark.timeout(120)
def test_fault_options_keep_waiting_items_in_workers(tmp_path: Path) -> None:
    with pp.Pool(progress=False) as pool:
        results = pool.map(nap_and_record, [str(tmp_path)] * 30, range(30), errors="return")
        assert [x for x, _ in results] == list(range(30))
        assert all(pid != ME for _, pid in results)
        assert pool.last_plan is not None
        assert pool.last_plan.backend == "processes"
        assert any("errors='return'" in reason for reason in pool.last_plan.reasons)


# --------------------------------------------------------------------------- switching


def _calls(directory: Path) -> list[int]:
    return sorted(
        int(line) for path in directory.glob("calls-*.txt") for line in path.read_text().split()
    )


@pytest.mark.timeout(120)
def test_waiting_items_switch_to_threads_in_order_and_once(tmp_path: Path) -> None:
    n = 120
    with pp.Pool(progress=False) as pool:
        results = pool.map(nap_and_record, [str(tmp_path)] * n, range(n))
        plan = pool.last_plan
        stats = pool.stats()
    assert [x for x, _ in results] == list(range(n))  # input order across the switch
    assert _calls(tmp_path) == list(range(n))  # every item ran exactly once
    pids = {pid for _, pid in results}
    assert ME in pids, (pids, plan)  # finished in threads, in this process
    assert len(pids) > 1, (pids, plan)  # began in worker processes
    assert plan is not None
    assert plan.backend == "threads", plan
    assert any("processes -> threads" in reason for reason in plan.reasons), plan
    assert stats.items_in_caller == sum(1 for _, pid in results if pid == ME)


@pytest.mark.timeout(120)
def test_imap_unordered_across_a_switch_yields_each_item_once(tmp_path: Path) -> None:
    with pp.Pool(progress=False) as pool:
        got = list(
            pool.imap_unordered(nap_and_record, [str(tmp_path)] * 80, range(80), with_index=True)
        )
    assert sorted(index for index, _ in got) == list(range(80))
    assert all(index == value[0] for index, value in got)
    assert _calls(tmp_path) == list(range(80))


@pytest.mark.timeout(120)
def test_tiny_items_finish_in_the_callers_thread() -> None:
    with pp.Pool(progress=False) as pool:
        assert pool.map(abs, range(-5000, 5000)) == [abs(x) for x in range(-5000, 5000)]
        assert pool.last_plan is not None
        assert pool.last_plan.backend == "serial"
        assert pool.stats().items_in_caller > 0
        # The next call of the same code starts where this one ended.
        assert pool.map(abs, range(-50, 50)) == [abs(x) for x in range(-50, 50)]
        assert pool.stats().items_in_caller == 100
        assert "earlier call" in pool.last_plan.reasons[0]


@pytest.mark.timeout(120)
def test_tiny_item_errors_raise_like_a_loop() -> None:
    with pp.Pool(progress=False) as pool, pytest.raises(ZeroDivisionError):
        pool.map(lambda x: 1 // (x - 3000), range(6000))


@pytest.mark.timeout(300)
def test_gil_releasing_items_are_tried_on_threads_and_processes_side_by_side() -> None:
    # The GIL heartbeat is a measurement: on a heavily loaded machine a worker's
    # heartbeat thread can wait for a CPU long enough to read as "GIL held".
    # A few cold runs give it room; one of them must run the side-by-side trial.
    plans = []
    for _ in range(3):
        forget()
        with pp.Pool(progress=False) as pool:
            assert pool.map(hash_for, range(60)) == list(range(60))
            plan = pool.last_plan
            evidence = pool.last_evidence
        assert plan is not None
        assert evidence is not None
        # Which side wins depends on the machine; that both were measured does not.
        assert plan.backend in ("threads", "processes")
        plans.append(plan)
        if evidence.trial is not None:
            assert any("side by side" in reason for reason in plan.reasons), plan
            return
    pytest.fail(f"no run tried threads and processes side by side: {plans}")


# --------------------------------------------------------------------------- honest plans


@pytest.mark.timeout(120)
def test_explain_prints_the_decision_and_each_switch_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pp.Pool(progress=False, explain=True) as pool:
        pool.map(time.sleep, [0.02] * 40)
    err = capsys.readouterr().err
    assert "powerpool auto: starting" in err
    assert "powerpool auto: switching processes -> threads" in err
    assert "powerpool auto: ran" in err


@pytest.mark.timeout(120)
def test_last_plan_and_stats_describe_what_ran() -> None:
    with pp.Pool(progress=False, workers=2) as pool:
        pool.map(spin_10ms, range(12))
        plan = pool.last_plan
        stats = pool.stats()
    assert plan is not None
    assert plan.backend == "processes", plan
    assert plan.workers == 2, plan
    ran = next(reason for reason in plan.reasons if reason.startswith("ran: "))
    # Every item is accounted for; on a loaded machine a noisy heartbeat may send a
    # few through a side-by-side trial on threads before processes keep the rest.
    assert sum(int(n) for n in re.findall(r"(\d+) items", ran)) == 12, plan
    assert stats.predicted_speedup == plan.expected_speedup
    assert stats.actual_speedup is not None
    assert stats.actual_speedup > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("fn", "items", "backend"),
    [
        (spin_10ms, range(40), "processes"),
        (time.sleep, [0.02] * 200, "threads"),
        (abs, range(50_000), "serial"),
    ],
    ids=["computing", "waiting", "tiny"],
)
def test_plan_and_auto_agree(fn: Any, items: Any, backend: str) -> None:
    planned = pp.plan(fn, items)
    assert planned.backend == backend, planned
    forget()
    with pp.Pool(progress=False) as pool:
        pool.map(fn, items)
        assert pool.last_plan is not None
        assert pool.last_plan.backend == planned.backend, pool.last_plan


# --------------------------------------------------------------------------- the ladder, pure


def evidence(**overrides: object) -> Evidence:
    base: dict[str, object] = {
        "function": "f",
        "items": 20,
        "chunks": 4,
        "wall_per_item_s": 0.01,
        "cpu_per_item_s": 0.01,
        "gil_held": 1.0,
        "gil_samples": 4,
        "wire_bytes_per_item": 40,
        "warm": True,
    }
    base.update(overrides)
    return Evidence(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "backend", "isolated"),
    [
        ({"items": 0, "chunks": 0}, "processes", "processes"),
        ({"batched_per_item_s": 1e-6, "wall_per_item_s": 2e-5}, "serial", "processes"),
        ({"cpu_per_item_s": 0.0005, "gil_held": 0.0}, "threads", "processes"),
        ({"cpu_per_item_s": 0.0005}, "processes", "processes"),  # starved, GIL held: computing
        ({}, "processes", "processes"),
        ({"gil_held": None}, "processes", "processes"),
        ({"gil_held": 0.0, "trial": Trial(100.0, 100.0)}, "threads", "processes"),
        ({"gil_held": 0.0, "trial": Trial(40.0, 100.0)}, "processes", "processes"),
    ],
)
def test_the_ladder(overrides: dict[str, object], backend: str, isolated: str) -> None:
    e = evidence(**overrides)
    assert decide(e, 1000, cores=8).plan.backend == backend
    strict = decide(e, 1000, cores=8, isolate="timeout= asks for isolation")
    assert strict.plan.backend == isolated
    assert any("timeout=" in reason for reason in strict.plan.reasons)


def test_one_heartbeat_saying_released_is_not_enough_for_a_trial() -> None:
    d = decide(evidence(gil_held=0.0, gil_samples=1), 1000, cores=8)
    assert not d.trial
    assert not d.settled
    assert d.plan.backend == "processes"


def test_native_code_without_a_trial_asks_for_one() -> None:
    d = decide(evidence(gil_held=0.0), 1000, cores=8)
    assert d.trial
    assert not d.settled


def test_quick_one_item_chunks_wait_for_a_batch_before_calling_items_tiny() -> None:
    d = decide(evidence(wall_per_item_s=2e-5, cpu_per_item_s=2e-5), 1000, cores=8)
    assert not d.settled
    assert d.plan.backend == "processes"


def test_first_calls_alone_do_not_settle_computing_work() -> None:
    assert not decide(evidence(warm=False), 1000, cores=8).settled
    waiting = evidence(warm=False, cpu_per_item_s=1e-4, gil_held=0.0)
    assert decide(waiting, 1000, cores=8).settled


def test_items_that_never_blocked_are_not_waiting_whatever_their_cpu_ratio() -> None:
    # A throttled or overloaded machine: wall far above CPU, yet no blocking.
    starved = evidence(cpu_per_item_s=0.001, blocks_per_item=0.0)
    assert decide(starved, 1000, cores=8).plan.backend == "processes"
    waiting = evidence(cpu_per_item_s=0.001, blocks_per_item=1.0, gil_held=0.0)
    assert decide(waiting, 1000, cores=8).plan.backend == "threads"


def test_low_cpu_with_neither_blocks_nor_a_gil_score_is_not_yet_waiting() -> None:
    # Probe chunks count no blocks, and a 2 ms item is too short for a GIL
    # score: on a starved machine its CPU ratio alone once sent computing
    # items to threads (in the caller's process). It takes one more chunk.
    unproven = evidence(cpu_per_item_s=0.0005, gil_held=None, gil_samples=0)
    d = decide(unproven, 1000, cores=8)
    assert (d.plan.backend, d.settled) == ("processes", False)
    blocked = unproven._replace(blocks_per_item=1.0)
    d = decide(blocked, 1000, cores=8)
    assert (d.plan.backend, d.settled) == ("threads", True)


def test_the_users_worker_count_is_kept() -> None:
    assert decide(evidence(), 1000, cores=8, workers=3).plan.workers == 3


class _Held:
    """Something a closure holds (a stand-in for a big array), weakly referenceable."""


def _closure_over_held() -> tuple[Any, weakref.ref[_Held]]:
    held = _Held()

    def fn(x: int) -> int:
        return x + (1 if held else 0)

    return fn, weakref.ref(held)


@pytest.mark.timeout(120)
def test_an_auto_run_keeps_no_earlier_function_alive() -> None:
    # The pool keeps each function's plan for submit() in a weak dictionary:
    # neither that plan (built when read) nor anything else may keep the
    # function, and what its closure holds, alive once the caller drops it.
    with pp.Pool(progress=False) as pool:
        first, held = _closure_over_held()
        pool.map(first, range(20))
        second, _ = _closure_over_held()
        pool.map(second, range(20))  # the pool's last steer now holds this one
        del first
        gc.collect()
        assert held() is None
        assert pool.last_plan is not None  # the plan is still there to read


def test_code_identity() -> None:
    def make() -> object:
        return lambda x: x

    assert code_key(make()) == code_key(make())  # type: ignore[arg-type]
    assert code_key(abs) is abs
    assert code_key(spin_10ms) is spin_10ms.__code__


# --------------------------------------------------------------------------- the cold path


@pytest.mark.timeout(120)
def test_a_cold_start_routes_work_before_loading_the_planner(tmp_path: Path) -> None:
    # In a fresh interpreter: routes() (after which the run sends its first
    # chunks) must not import the planner, nor the first decision (begin(), at
    # the first result) when it keeps the run where it is; reading the plan does.
    done = _run_script(
        tmp_path,
        "import sys\n"
        "from powerpool._speculate import Steer\n"
        "class Backend:\n"
        "    name, workers = 'processes', 2\n"
        "made = []\n"
        "steer = Steer(abs, total=10, cores=2, workers=None, isolate=None, explain=False,\n"
        "              backend_for=lambda name, n: made.append(name) or Backend(),\n"
        "              on_plan=lambda plan: None)\n"
        "steer.routes()\n"
        "print(made, 'powerpool._plan' in sys.modules)\n"
        "steer.begin()\n"
        "print('powerpool._plan' in sys.modules, made)\n"
        "print(steer.plan.backend, 'powerpool._plan' in sys.modules)\n",
    )
    assert done.stdout.splitlines() == [
        "['processes'] False",
        "False ['processes']",  # decided, on the same backend (not started twice)
        "processes True",  # the plan itself is built when read
    ]


@pytest.mark.timeout(120)
def test_the_first_items_run_in_workers_forked_before_the_planner_loaded(tmp_path: Path) -> None:
    done = _run_script(
        tmp_path,
        "import sys\n"
        "import powerpool as pp\n"
        "from auto_tasks import planner_loaded\n"
        "print(sorted(set(pp.map(planner_loaded, range(6)))))\n"
        "print('powerpool._plan' in sys.modules)\n",
    )
    # Nor does the caller load it afterwards: a run that stayed on processes
    # builds its plan only when the plan is read.
    assert done.stdout.split() == ["[False]", "False"]


@pytest.mark.timeout(120)
def test_a_cold_run_that_stays_on_processes_loads_the_planner_after_its_items(
    tmp_path: Path,
) -> None:
    # The planner's first import, mid-run, competes with the workers and the
    # dispatcher; a run that stays where it started never needs it until its
    # plan is read (the pool reads it when the run ends).
    done = _run_script(
        tmp_path,
        "import sys\n"
        "import powerpool as pp\n"
        "from auto_tasks import where_2ms\n"
        "with pp.Pool(progress=False) as pool:\n"
        "    loaded = ['powerpool._plan' in sys.modules for _ in pool.imap(where_2ms, range(60))]\n"
        "    plan = pool.last_plan\n"
        "    moved = any(r.startswith('switches') for r in plan.reasons)\n"
        "    print(plan.backend, moved or not any(loaded), 'powerpool._plan' in sys.modules)\n",
    )
    assert done.stdout.split() == ["processes", "True", "True"]


def _steer(backend_for: Any = None) -> Steer:
    """A steer for a 1000-item run on 2 cores; ``backend_for`` makes its routes
    (by default none may be made)."""
    return Steer(
        abs,
        total=1000,
        cores=2,
        workers=None,
        isolate=None,
        explain=False,
        backend_for=backend_for or (lambda name, workers: pytest.fail("no backend needed")),
        on_plan=lambda plan: None,
    )


class _InstantBackend:
    """Runs each chunk in submit() and delivers at once; counts the chunks it got."""

    name = "processes"
    chunk_target_s = 0.1

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.submitted = 0

    def submit(self, chunk: Chunk) -> None:
        self.submitted += 1
        values = [chunk.fn(*args, **kwargs) for _, args, kwargs in chunk.items]
        measures = Measures(0.002 * len(values), self.submitted <= self.workers)
        assert chunk.on_done is not None
        busy_s = 0.002 * len(values)
        result = ChunkResult(chunk, None, "w", busy_s, values=values, measures=measures)
        chunk.on_done(result)


def test_a_cold_run_sends_the_workers_more_before_its_first_decision() -> None:
    # The first decision loads the planner (~10 ms on a cold interpreter):
    # the chunk the first result freed must be on its way before, not after.
    backend = _InstantBackend(2)
    steer = Steer(
        abs,
        total=100,
        cores=2,
        workers=None,
        isolate=None,
        explain=False,
        backend_for=lambda name, workers: backend,
        on_plan=lambda plan: None,
    )
    sent_at_decision: list[int] = []
    begin = steer.begin

    def recording_begin() -> None:
        if steer.deciding:
            sent_at_decision.append(backend.submitted)
        begin()

    steer.begin = recording_begin  # type: ignore[method-assign]
    ids = iter(range(10**6))
    run = Run(
        backend=None,
        fn=abs,
        source=iter(range(100)),
        star=False,
        options=RunOptions(),
        ordered=True,
        with_index=False,
        total=100,
        epoch=0,
        ledger=StatsLedger(),
        new_chunk_id=lambda: next(ids),
        steer=steer,
    )
    assert [v for block in run for v in block] == list(range(100))
    window = CHUNKS_IN_FLIGHT_PER_WORKER * backend.workers
    assert sent_at_decision == [window + 1]


def test_undecided_chunks_hold_little_work() -> None:
    steer = _steer()
    assert steer.max_chunk(None) == UNDECIDED_MAX_CHUNK  # nothing measured yet
    assert steer.max_chunk(0.02) == 1  # a 20 ms wait goes alone: a switch strands no queue
    assert steer.max_chunk(1e-6) == UNDECIDED_MAX_CHUNK  # tiny: one batch proves it
    assert steer.max_chunk(1.5e-3) == BATCH_ITEMS  # maybe tiny under per-chunk cost


def test_serial_chunks_count_how_often_the_callers_thread_blocked() -> None:
    got: list[ChunkResult] = []
    backend = SerialBackend(BackendConfig(workers=1), got.append)
    chunk = Chunk(0, time.sleep, star=False)
    chunk.args = [0.001] * 3
    chunk.indices = range(3)
    backend.submit(chunk)
    measures = got[0].measures
    assert measures is not None
    if measures.blocks != -1:  # -1: this platform cannot count them
        assert measures.blocks >= 3  # each sleep blocks at least once


def _measured(n: int, busy_s: float, cpu_s: float, *, blocks: int = -1) -> ChunkResult:
    chunk = Chunk(0, abs, star=False)
    chunk.args = [0] * n
    chunk.indices = range(n)
    return ChunkResult(
        chunk, None, "w", busy_s, values=[0] * n, measures=Measures(cpu_s, False, blocks=blocks)
    )


def test_waiting_work_is_remembered_with_the_cpu_of_every_item_it_ran() -> None:
    steer = _steer()
    tally = steer._tally
    # Two worker chunks of a 20 ms wait, one with 6 ms of a worker's own housekeeping...
    tally.add("processes", _measured(1, 0.02, 0.0001, blocks=1))
    tally.add("processes", _measured(1, 0.02, 0.006, blocks=1))
    # ...then the threads ran the rest, measuring each item's CPU.
    for _ in range(100):
        tally.add("threads", _measured(1, 0.02, 0.0001, blocks=1))
    first = decide(tally.evidence(), 1000, cores=2).plan
    kept = decide(steer._remembrance(), 1000, cores=2).plan
    assert first.backend == kept.backend == "threads"
    assert kept.workers > first.workers  # the stray chunk no longer caps the lanes
    assert steer._remembrance().cpu_per_item_s < tally.evidence().cpu_per_item_s


def test_computing_work_is_remembered_as_the_workers_measured_it() -> None:
    steer = _steer()
    tally = steer._tally
    for _ in range(4):
        tally.add("processes", _measured(1, 0.01, 0.01, blocks=0))
        tally.add("threads", _measured(1, 0.02, 0.005, blocks=3))
    assert steer._remembrance() == tally.evidence()


@pytest.mark.parametrize(("cpu_s", "moved"), [(0.2, True), (0.01, False)])
def test_threads_adding_up_to_one_core_are_measured_again_in_workers(
    cpu_s: float, moved: bool
) -> None:
    """A run that began on threads (a remembered waiting function) whose threads'
    CPU adds up to what one GIL allows is moved to worker processes, undecided,
    to be measured alone there: on threads a wait for the GIL looks like I/O.
    Threads that add up to little CPU (real waiting) stay."""
    steer = _steer(lambda name, workers: SimpleNamespace(name=name, workers=workers))
    waiting = Tally("f")
    for _ in range(8):
        waiting.add("processes", _measured(1, 0.02, 0.0001, blocks=1))
    plan = decide(waiting.evidence(), 1000, cores=2).plan
    assert plan.backend == "threads"
    steer._apply(Decision(plan.backend, plan.workers, True, lambda: plan), first=True)
    steer._threads_since = time.perf_counter() - 0.2  # the threads have run for 0.2 s
    routes = None
    for _ in range(10):  # ten chunks, cpu_s of CPU in all
        routes = steer.observe("threads", _measured(1, 0.2, cpu_s / 10, blocks=1)) or routes
    if moved:
        assert routes is not None
        assert [b.name for b in routes] == ["processes"]
        assert not steer.settled
        assert steer.plan is not None
        assert "one GIL" in steer.plan.reasons[0]
    else:
        assert routes is None
        assert steer.plan is not None
        assert steer.plan.backend == "threads"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("work", "held"), [(busy_for, True), (time.sleep, False)])
def test_a_capped_heartbeat_stops_ticking_and_still_scores(work: Any, held: bool) -> None:
    beat = Heartbeat(max_ticks=8)
    beat.begin()
    start = time.perf_counter()
    work(0.3)  # long enough for far more than 8 ticks
    end = time.perf_counter()
    beat.end(start, end)
    beat.stop()
    estimate, _ = beat.gil_estimate()
    assert estimate is not None
    score, ticks, _ = estimate
    assert ticks <= 9  # the cap, plus the final wait counted as a tick that only slept
    assert (score >= 0.5) is held

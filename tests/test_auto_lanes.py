"""auto's thread count for waiting work: counted on first calls, recounted on warm chunks.

Evidence and chunk results are built by hand: no test here asserts a duration
or a count that depends on the machine, only what the planner and the steer
make of given figures.
"""

from __future__ import annotations

from typing import Any

import pytest

from powerpool._chunk import Chunk, ChunkResult, Measures
from powerpool._decide import Evidence, decide
from powerpool._speculate import Steer, forget


@pytest.fixture(autouse=True)
def fresh_memory() -> None:
    """Each test starts cold: no remembered decisions from other tests."""
    forget()


WAITS = Evidence(
    function="f",
    items=20,
    chunks=4,
    wall_per_item_s=0.02,
    cpu_per_item_s=5e-5,
    gil_held=0.0,
    gil_samples=4,
    wire_bytes_per_item=40,
    warm=True,
    blocks_per_item=1.0,
)
"""Warm evidence of 20 ms waits with 0.05 ms of CPU each (a sleep, measured here)."""


def _result(busy_s: float, cpu_s: float, *, first: bool) -> ChunkResult:
    chunk = Chunk(0, abs, star=False)
    chunk.args = [0]
    chunk.indices = range(1)
    blocks = -1 if first else 1  # probe chunks (the first ones) carry no block count
    measures = Measures(cpu_s, first, gil=0.0 if first else None, blocks=blocks)
    return ChunkResult(chunk, None, "w", busy_s, values=[0], measures=measures)


def test_waits_with_little_cpu_get_lanes_for_few_rounds_and_computing_ones_do_not() -> None:
    plan = decide(WAITS, 400, cores=2).plan
    assert plan.backend == "threads"
    assert plan.workers * 2 >= 400  # 400 waits in at most two rounds
    # 5 ms of pure Python per item: more threads would only queue for the GIL.
    mixed = WAITS._replace(wall_per_item_s=0.025, cpu_per_item_s=0.005)
    plan = decide(mixed, 400, cores=2).plan
    assert plan.backend == "threads"
    assert plan.workers < 50


class _FakeBackend:
    def __init__(self, name: str, workers: int) -> None:
        self.name, self.workers = name, workers


def _cold_steer(made: list[_FakeBackend], total: int) -> Steer:
    def backend_for(name: str, workers: int) -> Any:
        made.append(_FakeBackend(name, workers))
        return made[-1]

    steer = Steer(
        abs,
        total=total,
        cores=2,
        workers=None,
        isolate=None,
        explain=False,
        backend_for=backend_for,
        on_plan=lambda plan: None,
    )
    steer.routes()
    return steer


def _run_on(steer: Steer, made: list[_FakeBackend], first: tuple[float, float], warm: float) -> int:
    """Feed two first-call chunks (wall, CPU) then warm worker chunks of ``warm`` CPU;
    the threads count the run ends on."""
    for _ in range(2):
        steer.observe("processes", _result(*first, first=True))
    switched = made[-1]
    assert switched.name == "threads"
    for _ in range(8):
        steer.observe("processes", _result(first[0], warm, first=False))
    return made[-1].workers


def test_lanes_counted_on_first_calls_grow_once_warm_chunks_price_them() -> None:
    # 400 waits of 20 ms: the first-call chunks' CPU includes the worker's
    # warm-up (0.4 ms); warm chunks measure the item's own (0.05 ms).
    made: list[_FakeBackend] = []
    steer = _cold_steer(made, 400)
    final = _run_on(steer, made, (0.02, 4e-4), 5e-5)
    first = next(b for b in made if b.name == "threads").workers
    assert final > first
    assert final * 2 >= 400  # at most two rounds of waiting, as warm figures price it
    ran = steer.final_plan()
    assert ran is not None
    assert ran.workers == final
    assert any(f"threads x{first} -> threads x{final}" in reason for reason in ran.reasons)


def test_lanes_for_items_that_really_compute_stay_few() -> None:
    # 20 ms of waiting plus 5 ms of pure Python: threads queue for the GIL, so
    # warm figures must not add lanes (the saturate cap's guard).
    made: list[_FakeBackend] = []
    steer = _cold_steer(made, 400)
    final = _run_on(steer, made, (0.025, 0.0052), 0.005)
    assert [b.name for b in made] == ["processes", "threads"]
    assert final < 50


def test_a_remembered_thread_count_is_kept_not_grown() -> None:
    # Warm calls start from lanes priced on warm chunks: no new backend per call.
    made: list[_FakeBackend] = []
    steer = _cold_steer(made, 400)
    _run_on(steer, made, (0.02, 4e-4), 5e-5)
    steer.final_plan()
    again: list[_FakeBackend] = []
    second = _cold_steer(again, 400)
    assert [b.name for b in again] == ["threads"]
    for _ in range(40):
        second.observe("threads", _result(0.03, 1e-5, first=False))
    assert len(again) == 1

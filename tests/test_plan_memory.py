"""The planner never plans more workers than the available memory holds.

The available memory is faked (``_plan._available_memory`` is monkeypatched),
so these tests mean the same on a laptop and on a 1 TB server.
"""

from __future__ import annotations

import dataclasses

import pytest

from powerpool import _plan
from powerpool._estimates import WORKER_BASE_BYTES
from powerpool._plan import plan_from_profile
from powerpool._profile import Workload, profile
from test_plan import made  # the one made-up-profile builder

GIB = 2**30
MIB = 2**20


def fake_memory(monkeypatch: pytest.MonkeyPatch, available: int | None) -> list[int]:
    reads: list[int] = []

    def read() -> int | None:
        reads.append(1)
        return available

    monkeypatch.setattr(_plan, "_available_memory", read)
    return reads


def memory_reasons(plan: _plan.Plan) -> list[str]:
    return [r for r in plan.reasons if r.startswith("memory limits the workers")]


def test_processes_capped_by_measured_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_memory(monkeypatch, 3 * GIB)
    prof = made(Workload.CPU_GIL, 0.05, peak_alloc_bytes=GIB)
    plan = plan_from_profile(prof, 1000, cores=16)
    assert plan.backend == "processes"
    assert plan.workers == 3 * GIB // (GIB + WORKER_BASE_BYTES) == 2
    (reason,) = memory_reasons(plan)
    assert "1.0 GiB" in reason
    assert "tracemalloc peak" in reason
    assert "3.0 GiB is available: 2 processes fit" in reason
    assert "2 workers: as many as fit in memory" in plan.reasons


def test_threads_share_one_process_so_more_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_memory(monkeypatch, 3 * GIB)
    prof = made(Workload.CPU_NATIVE, 0.05, peak_alloc_bytes=GIB)
    plan = plan_from_profile(prof, 1000, cores=16)
    assert (plan.backend, plan.workers) == ("threads", 3)
    assert "3 threads fit" in memory_reasons(plan)[0]


def test_io_threads_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_memory(monkeypatch, GIB)
    prof = made(Workload.IO, 0.05, peak_alloc_bytes=100 * MIB)
    plan = plan_from_profile(prof, 1000, cores=4)
    assert plan.backend == "threads"
    assert plan.workers == 10
    assert memory_reasons(plan)
    roomy = plan_from_profile(prof, 1000, cores=4, memory_bytes=1000 * GIB)
    assert roomy.workers > 10
    assert not memory_reasons(roomy)


def test_rss_growth_is_used_when_tracemalloc_did_not_measure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_memory(monkeypatch, 3 * GIB)
    plan = plan_from_profile(made(Workload.CPU_GIL, 0.05, rss_growth_bytes=GIB), 1000, cores=16)
    assert plan.workers == 2
    assert "resident memory rose" in memory_reasons(plan)[0]


def test_plenty_of_memory_says_nothing_about_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_memory(monkeypatch, 64 * GIB)
    plan = plan_from_profile(made(Workload.CPU_GIL, 0.05, peak_alloc_bytes=GIB), 1000, cores=16)
    assert plan.workers == 16
    assert not memory_reasons(plan)


def test_memory_is_read_only_when_items_use_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = fake_memory(monkeypatch, 1)
    plan = plan_from_profile(made(Workload.CPU_GIL, 0.05), 1000, cores=4)
    assert plan.workers == 4
    assert reads == []  # auto's hot path pays nothing for work that uses no memory
    unknown = fake_memory(monkeypatch, None)
    capped = plan_from_profile(made(Workload.CPU_GIL, 0.05, peak_alloc_bytes=GIB), 1000, cores=4)
    assert unknown == [1]
    assert capped.workers == 4  # unknown memory: no cap


def test_a_measured_50_mb_item_caps_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    def allocates(n: int) -> int:
        block = bytearray(50 * 10**6)
        return n + len(block) - len(block) + sum(range(20_000))

    prof = profile(allocates, [1, 2, 3], memory=True, max_seconds=60.0)
    assert 50 * 10**6 <= prof.peak_alloc_bytes < 51 * 10**6
    forced = dataclasses.replace(prof, workload=Workload.CPU_GIL, wall_per_item_s=0.05)
    # What the plan would be with memory to spare: the rest of this real
    # profile (measured on a possibly loaded machine) may already ask for fewer.
    fake_memory(monkeypatch, 10**15)
    uncapped = plan_from_profile(forced, 1000, cores=8).workers
    fake_memory(monkeypatch, 200 * 10**6)  # room for 4 such items in threads, 2 in processes
    plan = plan_from_profile(forced, 1000, cores=8)
    cap = 200 * 10**6 // (prof.peak_alloc_bytes + WORKER_BASE_BYTES)
    assert cap == 2
    # Never more than memory holds; fewer when, with only that many, this
    # measured profile is not worth running in parallel at all.
    assert plan.workers <= min(uncapped, cap)
    if plan.workers == cap < uncapped:
        assert memory_reasons(plan)
        assert "memory limits the workers" in str(plan)


def test_available_memory_reads_the_machine() -> None:
    available = _plan._available_memory()
    assert available is None or available > 0

"""The planner: rules of thumb on made-up profiles, then on real ones.

``plan_from_profile`` is pure, so most tests feed it a profile built by hand
and pin the number of cores; the last few profile real work of each kind and
check that the plan picks the matching backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import os
from typing import Any

import pytest

from powerpool import _plan, _system
from powerpool._estimates import MIN_CHUNKS_PER_WORKER, TARGET_CHUNK_S
from powerpool._plan import Plan, plan, plan_from_profile
from powerpool._profile import Profile, Workload, profile
from tasks import sleep_20ms as nap
from tasks import spin


def made(workload: Workload, wall_s: float, **overrides: Any) -> Profile:
    """A profile as the profiler would report it for ``workload``."""
    busy = workload in (Workload.CPU_GIL, Workload.CPU_NATIVE, Workload.TINY)
    fields: dict[str, Any] = {
        "items": 8,
        "wall_per_item_s": wall_s,
        "cpu_per_item_s": wall_s if busy else wall_s / 1000,
        "thread_cpu_per_item_s": wall_s if busy else wall_s / 1000,
        "gil_held_fraction": 0.98 if workload is Workload.CPU_GIL else 0.02,
        "arg_pickle_bytes": 40,
        "result_pickle_bytes": 40,
        "pickle_per_item_s": 4e-6,
        "peak_rss_bytes": 50 * 2**20,
        "workload": workload,
        "evidence": (),
        "hotspots": (),
        "profiling_s": 0.01,
        "gil_measured": workload in (Workload.CPU_GIL, Workload.CPU_NATIVE),
    }
    fields.update(overrides)
    return Profile(**fields)


@pytest.fixture(autouse=True)
def pure(monkeypatch: pytest.MonkeyPatch) -> None:
    """plan_from_profile must not look at the machine when cores are given."""

    def forbidden() -> int:
        raise AssertionError("cpu_count() called although cores was given")

    monkeypatch.setattr(_plan, "cpu_count", forbidden)


# --------------------------------------------------------------------------- rules of thumb


def test_tiny_work_runs_serially() -> None:
    p = plan_from_profile(made(Workload.TINY, 1e-6), 200_000, cores=16)
    assert (p.backend, p.workers, p.expected_speedup) == ("serial", 1, 1.0)
    assert p.chunksize >= 1000  # chunks only pace progress; large is cheap
    assert any("plain loop" in reason for reason in p.reasons)


def test_io_gets_enough_threads_to_overlap_the_waiting() -> None:
    p = plan_from_profile(made(Workload.IO, 0.02), 400, cores=2)
    assert p.backend == "threads"
    assert 100 <= p.workers <= 400  # 400 x 20 ms in <= 0.1 s needs >= ~n/4 threads
    assert p.chunksize == 1
    assert p.expected_s is not None
    assert p.expected_s <= 0.1
    assert p.expected_speedup > 50


def test_io_with_unknown_length_is_capped() -> None:
    p = plan_from_profile(made(Workload.IO, 0.02), None, cores=2, max_io_workers=64)
    assert p.backend == "threads"
    assert p.workers == 64
    assert p.expected_s is None
    assert any("unknown" in reason for reason in p.reasons)


def test_io_threads_stop_where_the_cpu_part_saturates() -> None:
    prof = made(Workload.IO, 0.01, cpu_per_item_s=0.004, thread_cpu_per_item_s=0.004)
    p = plan_from_profile(prof, 10_000, cores=2)
    assert p.backend == "threads"
    assert p.workers <= math.ceil(2 * 0.01 / 0.004)  # cores x wall / cpu


def test_cpu_gil_goes_to_processes_in_chunks() -> None:
    p = plan_from_profile(made(Workload.CPU_GIL, 0.005), 1000, cores=16)
    assert p.backend == "processes"
    assert p.workers == 16
    assert p.chunksize == 4  # 20 ms of work per chunk
    assert math.ceil(1000 / p.chunksize) >= MIN_CHUNKS_PER_WORKER * p.workers
    assert 12 < p.expected_speedup < 16
    assert "processes" in p.basis
    assert "start" in p.basis


@pytest.mark.parametrize("n", [17, 100, 1000, 10**6])
@pytest.mark.parametrize("wall_s", [5e-5, 1e-3, 0.05])
def test_chunks_compute_about_20ms_and_balance(n: int, wall_s: float) -> None:
    p = plan_from_profile(made(Workload.CPU_GIL, wall_s), n, cores=8)
    if p.backend == "serial":
        return
    assert p.chunksize * wall_s <= TARGET_CHUNK_S + wall_s
    chunks = math.ceil(n / p.chunksize)
    assert chunks >= min(n, MIN_CHUNKS_PER_WORKER * p.workers)


def test_little_total_work_stays_serial() -> None:
    p = plan_from_profile(made(Workload.CPU_GIL, 0.005), 3, cores=2)
    assert p.backend == "serial"  # 15 ms of work is less than a process pool's start-up
    assert any("serial" in reason for reason in p.reasons)


def test_single_item_is_serial() -> None:
    assert plan_from_profile(made(Workload.IO, 1.0), 1, cores=8).backend == "serial"


def test_free_threaded_build_sends_python_work_to_threads() -> None:
    prof = made(
        Workload.CPU_GIL, 0.005, gil_disabled=True, gil_measured=False, gil_held_fraction=0.0
    )
    p = plan_from_profile(prof, 1000, cores=8)
    assert p.backend == "threads"
    assert p.workers == 8
    assert any("without the GIL" in reason for reason in p.reasons)


def test_unpicklable_python_work_cannot_use_processes() -> None:
    prof = made(Workload.CPU_GIL, 0.005, unpicklable="function: PicklingError: no")
    p = plan_from_profile(prof, 1000, cores=8)
    assert p.backend == "serial"  # threads would take turns on the GIL
    assert any("no processes" in reason for reason in p.reasons)


def test_cpu_native_goes_to_threads_one_per_core() -> None:
    p = plan_from_profile(made(Workload.CPU_NATIVE, 0.01), 100, cores=4)
    assert p.backend == "threads"
    assert p.workers == 4
    assert p.expected_speedup > 3


def test_native_work_holding_the_gil_half_the_time_prefers_processes() -> None:
    prof = made(Workload.CPU_NATIVE, 0.01, gil_held_fraction=0.4)
    p = plan_from_profile(prof, 1000, cores=16)
    assert p.backend == "processes"  # Amdahl: 40% serialized caps threads at 2.5x


def test_native_threads_already_parallel() -> None:
    busy = made(Workload.CPU_NATIVE, 0.01, cpu_per_item_s=0.02)  # 2 cores per item
    assert plan_from_profile(busy, 1000, cores=2).backend == "serial"
    wide = plan_from_profile(busy, 1000, cores=16)
    assert wide.backend in ("threads", "processes")
    assert wide.native_threads == 1
    assert wide.expected_speedup == pytest.approx(8, rel=0.15)


def test_async_bounds_concurrency() -> None:
    assert plan_from_profile(made(Workload.ASYNC, 0.01), 50, cores=2).workers == 50
    p = plan_from_profile(made(Workload.ASYNC, 0.01), 5000, cores=2)
    assert (p.backend, p.workers) == ("asyncio", 1000)
    assert p.expected_speedup > 100


def test_big_work_with_a_cluster_scales_out() -> None:
    prof = made(Workload.CPU_GIL, 1.0)
    p = plan_from_profile(prof, 10_000, cores=4, address="tcp://127.0.0.1:8786")
    assert (p.backend, p.workers) == ("dask", 0)
    assert any("scale out" in reason for reason in p.reasons)
    assert plan_from_profile(prof, 10_000, cores=4).backend == "processes"
    small = plan_from_profile(prof, 100, cores=4, address="tcp://127.0.0.1:8786")
    assert small.backend == "processes"  # 25 s per core: not worth a cluster


def test_memory_growth_caps_workers() -> None:
    prof = made(Workload.CPU_GIL, 0.05, rss_growth_bytes=2**30)
    p = plan_from_profile(prof, 1000, cores=16, memory_bytes=3 * 2**30)
    assert p.backend == "processes"
    assert p.workers == 2


def test_empty_profile_is_serial() -> None:
    prof = dataclasses.replace(made(Workload.TINY, 0.0), items=0)
    assert plan_from_profile(prof, 0, cores=4).backend == "serial"
    coroutines = dataclasses.replace(made(Workload.ASYNC, 0.0), items=0)
    assert plan_from_profile(coroutines, 0, cores=4).backend == "asyncio"


def test_plan_reads_well() -> None:
    p = plan_from_profile(made(Workload.CPU_GIL, 0.005), 1000, cores=4)
    text = str(p)
    assert text.startswith("plan: processes with 4 workers")
    assert "basis:" in text
    assert "GIL" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.workers = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- cores


def test_cpu_count_is_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real one, for once
    cores = _plan.cpu_count()
    assert 1 <= cores <= (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max 100000", None),
        ("200000 100000", 2),
        ("150000 100000", 2),
        ("50000 100000", 1),
        ("garbage", None),
    ],
)
def test_cgroup_v2_quota(text: str, expected: int | None) -> None:
    assert _system._parse_cpu_max(text) == expected


def test_cgroup_v1_quota() -> None:
    assert _system._parse_cfs("-1\n", "100000\n") is None
    assert _system._parse_cfs("400000\n", "100000\n") == 4


# --------------------------------------------------------------------------- real work, end to end

CORES = 4
"""Planned for a 4-core machine whatever runs the test: the choice of backend
is what is checked, not this machine's core count."""


BUFFER = bytes(8 * 2**20)
"""Made once: allocating 8 MiB in each call would hold the GIL part of the time."""


def digest(_: int) -> bytes:
    return hashlib.sha256(BUFFER).digest()


async def anap(x: int) -> int:
    await asyncio.sleep(0.01)
    return x


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("fn", "backend"),
    [
        (nap, "threads"),
        (spin, "processes"),
        (digest, "threads"),
        (anap, "asyncio"),
        (abs, "serial"),
    ],
)
def test_real_work_gets_the_matching_backend(fn: Any, backend: str) -> None:
    # The GIL heartbeat is a measurement: on a heavily loaded machine its
    # thread can wait for a CPU long enough to misread one run. Three runs
    # give it room; a planner that is wrong on a quiet machine fails all three.
    seen = []
    for _ in range(3):
        prof = profile(fn, range(6), max_seconds=5.0)  # generous: a loaded machine
        p = plan_from_profile(prof, 2000, cores=CORES)
        assert isinstance(p, Plan)
        assert p.profile is prof
        if p.backend == backend:
            return
        seen.append(f"{prof}\n{p}")
    pytest.fail("\n\n".join(seen))


@pytest.mark.timeout(60)
def test_public_plan_samples_lists_and_iterators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    listed = plan(abs, list(range(100_000)))
    assert listed.backend == "serial"
    assert listed.n_items == 100_000
    source = iter(range(1000))
    lazy = plan(nap, source, sample=3)
    assert lazy.backend == "threads"
    assert lazy.n_items is None
    assert next(source) == 3  # only the sample was consumed
    starred = plan(pow, [(2, 3), (3, 2)], star=True)
    assert starred.profile is not None
    assert starred.profile.items == 2

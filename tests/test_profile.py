"""The profiler: classification of each kind of work, sampling discipline, the record.

Timing assertions are deliberately loose: the suite must pass on a shared,
loaded 2-core machine. What is asserted tightly is what the design makes
robust: the heartbeat's GIL score (near 1 versus near 0, judged at 0.5),
CPU plus run-queue time versus wall time, and how many items were consumed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from auto_tasks import hash_for, spin_10ms
from powerpool._profile import (
    Hotspot,
    Profile,
    Workload,
    classify,
    profile,
    profile_calls,
    record,
    sampling,
)
from tasks import sleep_20ms as nap
from tasks import spin

SLACK_S = 5.0
"""Time budget for the classification tests: they test the measurement, not
the budget, and a loaded machine can stretch one item to a quarter second."""

BUFFER = bytes(8 * 2**20)
"""hashlib releases the GIL for buffers over 2 KiB; 8 MiB hashes in ~5-30 ms."""


def trivial(x: int) -> int:
    return x + 1


def digest(_: int) -> bytes:
    return hashlib.sha256(BUFFER).digest()


def socket_read(x: int) -> bytes:
    """Waits ~10 ms on a real socket for bytes a timer thread sends."""
    left, right = socket.socketpair()
    sender = threading.Timer(0.01, right.sendall, (bytes([x % 256]),))
    try:
        sender.start()
        return left.recv(1)
    finally:
        sender.join()
        left.close()
        right.close()


async def anap(x: int) -> int:
    await asyncio.sleep(0.01)
    return x


def calls_of(items: Any) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    return (((x,), {}) for x in items)


# --------------------------------------------------------------------------- classification


@pytest.mark.timeout(30)
def test_sleep_is_io() -> None:
    prof = profile(nap, range(4), max_seconds=SLACK_S)
    assert prof.workload is Workload.IO, str(prof)
    assert prof.items == 4
    assert prof.wall_per_item_s >= 0.015
    assert prof.cpu_ratio < 0.5


@pytest.mark.timeout(30)
def test_socket_read_is_io() -> None:
    prof = profile(socket_read, range(4), max_seconds=SLACK_S)
    assert prof.workload is Workload.IO, str(prof)


@pytest.mark.timeout(60)
def test_pure_python_is_cpu_gil() -> None:
    prof = profile(spin_10ms, range(6), max_seconds=SLACK_S)
    assert prof.workload is Workload.CPU_GIL, str(prof)
    assert prof.gil_measured, str(prof)
    assert prof.gil_held_fraction >= 0.5, str(prof)


@pytest.mark.timeout(60)
def test_hashlib_on_big_buffers_is_cpu_native() -> None:
    prof = profile(digest, range(6), max_seconds=SLACK_S)
    assert prof.workload is Workload.CPU_NATIVE, str(prof)
    assert prof.gil_measured, str(prof)
    assert prof.gil_held_fraction < 0.5, str(prof)


@pytest.mark.timeout(60)
def test_numpy_ufunc_is_cpu_native() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(2_000_000, dtype=np.float64)

    def roots(_: int) -> float:
        return float(np.sqrt(array)[-1])

    prof = profile(roots, range(6), max_seconds=SLACK_S)
    assert prof.workload is Workload.CPU_NATIVE, str(prof)


@pytest.mark.timeout(30)
def test_coroutine_function_is_async() -> None:
    prof = profile(anap, range(6), max_seconds=SLACK_S)
    assert prof.workload is Workload.ASYNC, str(prof)
    assert prof.items == 6
    assert prof.wall_per_item_s >= 0.008


def test_trivial_function_is_tiny() -> None:
    prof = profile(trivial, range(100))
    assert prof.workload is Workload.TINY, str(prof)
    assert prof.items == 8
    assert not prof.gil_measured


# --------------------------------------------------------------------------- profile_calls (auto)


def test_tiny_sampling_is_cheap_and_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_heartbeat() -> None:
        raise AssertionError("the heartbeat must not start for trivial items")

    monkeypatch.setattr(sampling, "Heartbeat", no_heartbeat)
    source = calls_of(range(200_000))
    best = float("inf")
    for _ in range(5):  # the best of a few runs: the machine is shared
        prof, outcomes = profile_calls(trivial, source)
        best = min(best, prof.profiling_s)
        assert prof.workload is Workload.TINY
        assert [value for _, value in outcomes][:1] != []
    assert best < 0.005  # microseconds in practice; milliseconds would be a bug
    assert next(source) == ((40,), {})  # 5 x 8 consumed, not one more


@pytest.mark.timeout(30)
def test_one_slow_waiting_item_is_enough() -> None:
    source = calls_of(range(400))
    prof, outcomes = profile_calls(nap, source)
    assert prof.items == 1
    assert outcomes == [(True, 0)]
    assert prof.workload is Workload.IO
    assert prof.profiling_s < 0.5  # ~20 ms; generous for a loaded machine
    assert next(source) == ((1,), {})


@pytest.mark.timeout(60)
def test_slow_busy_items_get_a_few_more_with_the_heartbeat() -> None:
    # One more item to see the GIL, and more only while the evidence is
    # thin (fewer than 2 heartbeat ticks) or mixed (a loaded machine).
    # A generous budget: a loaded machine can stretch one item to 250 ms.
    # Items last 10 ms by the clock (a fixed loop is under SLOW_ITEM_S on a fast CPU).
    # A loaded machine can stretch the first item past WARMUP_FACTOR times the
    # second, which then reads (rightly) as warm-up: a few runs give it room.
    seen = []
    for _ in range(3):
        prof, outcomes = profile_calls(spin_10ms, calls_of(range(100)), max_seconds=3.0)
        assert all(ok for ok, _ in outcomes)
        assert prof.items == len(outcomes)
        seen.append(str(prof))
        if 2 <= prof.items <= 4 and prof.workload is Workload.CPU_GIL:
            return
    pytest.fail("\n".join(seen))


@pytest.mark.timeout(60)
def test_slow_native_item_measures_the_gil_released() -> None:
    prof, _ = profile_calls(hash_for, calls_of(range(100)), max_seconds=3.0)
    assert 2 <= prof.items <= 4, str(prof)
    assert prof.workload is Workload.CPU_NATIVE, str(prof)


@pytest.mark.timeout(30)
def test_coroutines_run_on_a_private_loop_once_each() -> None:
    source = calls_of(range(100))
    prof, outcomes = profile_calls(anap, source)
    assert prof.workload is Workload.ASYNC
    assert outcomes == [(True, i) for i in range(prof.items)]
    assert next(source) == ((prof.items,), {})


@pytest.mark.timeout(30)
def test_coroutines_from_inside_a_running_loop() -> None:
    async def main() -> tuple[Profile, list[Any]]:
        return profile_calls(anap, calls_of(range(3)), stop_early=False)

    prof, outcomes = asyncio.run(main())
    assert prof.workload is Workload.ASYNC
    assert outcomes == [(True, 0), (True, 1), (True, 2)]


@pytest.mark.timeout(30)
def test_plain_function_returning_coroutines_is_async() -> None:
    def make(x: int) -> Any:
        return anap(x)

    prof, outcomes = profile_calls(make, calls_of(range(3)), stop_early=False)
    assert prof.workload is Workload.ASYNC
    assert outcomes == [(True, 0), (True, 1), (True, 2)]


def test_each_call_runs_exactly_once_and_outcomes_keep_order() -> None:
    seen: list[int] = []

    def record(x: int) -> int:
        seen.append(x)
        if x % 3 == 1:
            raise ValueError(f"bad {x}")
        return x * 10

    prof, outcomes = profile_calls(record, calls_of(range(100)), max_items=6)
    assert seen == list(range(6))
    assert [ok for ok, _ in outcomes] == [True, False, True, True, False, True]
    assert outcomes[0] == (True, 0)
    error = outcomes[1][1]
    assert isinstance(error, ValueError)
    assert str(error) == "bad 1"
    assert error.__traceback__ is not None  # the traceback survives for the caller
    assert prof.errors == 2
    assert any("ValueError" in line for line in prof.evidence)


@pytest.mark.timeout(30)
def test_sys_exit_in_a_sampled_item_is_its_error() -> None:
    """The item loop's policy: sys.exit() in a task fails the item, it does not end the profile."""

    def exits(x: int) -> int:
        if x == 1:
            sys.exit(3)
        return spin(x)

    prof, outcomes = profile_calls(exits, calls_of(range(4)), stop_early=False)
    assert [ok for ok, _ in outcomes] == [True, False, True, True]
    error = outcomes[1][1]
    assert isinstance(error, SystemExit)
    assert error.code == 3
    assert prof.errors == 1


@pytest.mark.timeout(30)
def test_interrupt_propagates_and_stops_the_heartbeat() -> None:
    def interrupted(x: int) -> int:
        if x == 2:
            raise KeyboardInterrupt
        return spin(x)

    with pytest.raises(KeyboardInterrupt):
        profile_calls(interrupted, calls_of(range(10)), stop_early=False)
    # the autouse no_leaks fixture checks that the heartbeat thread is gone


@pytest.mark.timeout(60)
def test_free_threaded_build_reports_python_work_as_cpu_gil(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the sampler and the record builder each ask
    monkeypatch.setattr(sampling, "_gil_disabled", lambda: True)
    monkeypatch.setattr(classify, "_gil_disabled", lambda: True)
    prof = profile(spin, range(3), max_seconds=SLACK_S)
    assert prof.workload is Workload.CPU_GIL, str(prof)
    assert prof.gil_disabled
    assert not prof.gil_measured


def test_keyword_arguments_are_passed() -> None:
    def scale(x: int, *, factor: int) -> int:
        return x * factor

    _, outcomes = profile_calls(scale, iter([((2,), {"factor": 3})]))
    assert outcomes == [(True, 6)]


def test_empty_input() -> None:
    prof, outcomes = profile_calls(trivial, iter([]))
    assert prof.items == 0
    assert outcomes == []
    with pytest.raises(ValueError, match="at least one item"):
        profile(trivial, [])
    with pytest.raises(ValueError, match="max_items"):
        profile_calls(trivial, iter([]), max_items=0)


@pytest.mark.timeout(30)
def test_time_budget_stops_sampling() -> None:
    prof = profile(spin_10ms, range(100), max_items=100, max_seconds=0.05)
    assert 1 <= prof.items < 100
    assert any("time budget" in line for line in prof.evidence)


@pytest.mark.timeout(30)
def test_warm_up_is_left_out_of_the_means() -> None:
    state = {"calls": 0}

    def lazy(x: int) -> int:
        state["calls"] += 1
        if state["calls"] == 1:
            spin(0)  # first call: a "lazy import" costing milliseconds
        return x

    prof, outcomes = profile_calls(lazy, calls_of(range(100)), max_seconds=SLACK_S)
    assert len(outcomes) > 2, str(prof)  # the fast second item lifted the limit of two
    assert prof.workload is Workload.TINY, str(prof)
    assert any("warm-up" in line for line in prof.evidence)


# --------------------------------------------------------------------------- the record


@pytest.mark.timeout(30)
def test_record_fields_and_report() -> None:
    prof = profile(spin, range(3), star=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        prof.items = 5  # type: ignore[misc]
    assert prof.function.endswith("spin")
    assert prof.arg_pickle_bytes > 0
    assert prof.result_pickle_bytes > 0
    assert prof.pickle_per_item_s > 0
    assert prof.fn_pickle_bytes > 0
    assert not prof.needs_cloudpickle
    assert prof.unpicklable is None
    assert prof.peak_rss_bytes > 0
    assert prof.profiling_s >= prof.items * prof.wall_per_item_s * 0.5
    assert prof.hotspots == ()
    text = str(prof)
    assert "cpu-gil" in text
    assert "per item" in text
    assert "pickling" in text
    assert len(text.splitlines()) < 20


def test_every_field_is_documented() -> None:
    import ast
    import inspect

    # The module's source, not the class's: inspect.getsource() of a slotted
    # dataclass fails on Python 3.13.0 (no __firstlineno__ on the new class).
    tree = ast.parse(inspect.getsource(record))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for cls in (Profile, Hotspot):
        body = classes[cls.__name__].body
        documented = {
            node.target.id
            for node, after in itertools.pairwise(body)
            if isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        }
        assert documented == {f.name for f in dataclasses.fields(cls)}


def test_star_calls_and_cloudpickle_fallback() -> None:
    prof = profile(lambda a, b: a + b, [(1, 2), (3, 4)], star=True)
    assert prof.items == 2
    assert prof.needs_cloudpickle  # a lambda: plain pickle refuses it
    assert prof.unpicklable is None


def test_unpicklable_argument_is_reported() -> None:
    lock = threading.Lock()
    prof = profile(lambda _lock: None, [lock, lock])
    assert prof.unpicklable is not None
    assert prof.unpicklable.startswith("argument")


@pytest.mark.xfail(
    sys.version_info >= (3, 12),
    strict=False,  # seen passing and failing on 3.12 and 3.13: it depends on thread timing
    reason="bug: from Python 3.12 cProfile (sys.monitoring) can see every thread and file the "
    "heartbeat thread's frames under the profiled call, so threading's waits rank first",
)
@pytest.mark.timeout(60)
def test_hotspots_name_the_users_functions() -> None:
    def inner(n: int) -> int:
        return sum(i * i for i in range(n))

    def outer(_: int) -> int:
        return inner(30_000)

    prof = profile(outer, range(3), hotspots=True)
    if any("hot spots unavailable" in line for line in prof.evidence):
        pytest.skip("another profiler (e.g. coverage on 3.12+) is active")
    names = [spot.function for spot in prof.hotspots]
    assert names, str(prof)
    assert names[0].startswith("outer"), names
    assert any(name.startswith("inner") for name in names)
    assert not any("_sample_sync" in n or "Heartbeat" in n or "perf_counter" in n for n in names)
    assert all(spot.calls >= 1 and spot.cumulative_s >= 0 for spot in prof.hotspots)
    assert "hot spots" in str(prof)


def test_profiler_modules_import_lightly() -> None:
    code = (
        "import sys, powerpool\n"
        "before = set(sys.modules)\n"
        "import powerpool._profile, powerpool._plan\n"
        "heavy = {'asyncio', 'cProfile', 'pstats', 'tracemalloc', 'cloudpickle', 'psutil'}\n"
        "print(sorted(heavy & (set(sys.modules) - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"

"""The async face (``amap``/``aimap``) and the asyncio backend behind the sync API.

Each async test drives its own loop with ``asyncio.run``, so no plugin is
needed and every loop (and its default executor) is closed by the test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

import pytest

import powerpool as pp

pytestmark = pytest.mark.timeout(30)


class CustomError(Exception):
    """An error type of the caller's own."""


async def async_square(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


async def slower_first(x: int) -> int:
    """Earlier items finish later."""
    await asyncio.sleep(0.05 * (4 - x))
    return x


async def async_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


async def async_fail_on_three(x: int) -> int:
    await asyncio.sleep(0)
    if x == 3:
        raise CustomError(f"item {x} is cursed")
    return x


def blocking_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def stoppable_sleep(seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not pp.should_stop():
        time.sleep(0.01)
    return seconds


def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise CustomError(f"item {x} is cursed")
    return x


class InFlight:
    """Counts coroutines running at once and remembers the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()  # the asyncio backend runs on its own thread

    async def __call__(self, x: int) -> int:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(0.02)
        finally:
            with self._lock:
                self.now -= 1
        return x


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


# -- amap / aimap with coroutine functions (on the caller's loop) ---------------


def test_amap_returns_results_in_input_order() -> None:
    async def main() -> list[int]:
        return await pp.amap(slower_first, range(5))

    assert run(main) == [0, 1, 2, 3, 4]


def test_amap_zips_several_iterables() -> None:
    async def add(x: int, y: int) -> int:
        return x + y

    async def main() -> list[int]:
        return await pp.amap(add, [1, 2, 3], [10, 20])

    assert run(main) == [11, 22]


def test_amap_of_nothing_is_empty() -> None:
    async def main() -> list[int]:
        return await pp.amap(async_square, [])

    assert run(main) == []


def test_aimap_unordered_yields_as_completed() -> None:
    async def main() -> list[int]:
        return [r async for r in pp.aimap(slower_first, range(5), ordered=False)]

    results = run(main)
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert results[0] == 4  # no wait at all; item 0 waits 0.2 s
    assert results[-1] == 0


def test_aimap_ordered_by_default() -> None:
    async def main() -> list[int]:
        return [r async for r in pp.aimap(slower_first, range(5))]

    assert run(main) == [0, 1, 2, 3, 4]


def test_amap_bounds_coroutines_in_flight() -> None:
    counter = InFlight()

    async def main() -> list[int]:
        return await pp.amap(counter, range(30), workers=3)

    assert run(main) == list(range(30))
    assert counter.peak == 3


def test_aimap_unordered_bounds_coroutines_in_flight() -> None:
    counter = InFlight()

    async def main() -> list[int]:
        return [r async for r in pp.aimap(counter, range(30), workers=3, ordered=False)]

    assert sorted(run(main)) == list(range(30))
    assert counter.peak <= 3


def test_amap_error_keeps_its_type() -> None:
    async def main() -> list[int]:
        return await pp.amap(async_fail_on_three, range(6))

    with pytest.raises(CustomError, match="cursed"):
        run(main)


def test_amap_errors_return_and_skip() -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        returned = await pp.amap(async_fail_on_three, range(6), errors="return")
        skipped = await pp.amap(async_fail_on_three, range(6), errors="skip")
        return returned, skipped

    returned, skipped = run(main)
    assert returned[:3] == [0, 1, 2]
    assert isinstance(returned[3], CustomError)
    assert skipped == [0, 1, 2, 4, 5]


def test_amap_timeout_is_item_timeout_error() -> None:
    async def main() -> list[Any]:
        return await pp.amap(async_sleep, [0.0, 10.0], timeout=0.2, errors="return")

    results = run(main)
    assert results[0] == 0.0
    assert isinstance(results[1], pp.ItemTimeoutError)


def test_breaking_out_of_aimap_cancels_the_rest() -> None:
    async def main() -> list[float]:
        got = []
        async for r in pp.aimap(async_sleep, [0.0] + [10.0] * 5, ordered=False):
            got.append(r)
            break
        return got

    started = time.monotonic()
    assert run(main) == [0.0]
    assert time.monotonic() - started < 5  # the 10 s sleepers were cancelled


# -- the pool core's policies for coroutines on the caller's loop ---------------


class Flaky:
    """Fails each item's first ``failures`` calls, then returns it."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[int, int] = {}

    async def __call__(self, x: int) -> int:
        await asyncio.sleep(0)
        self.calls[x] = self.calls.get(x, 0) + 1
        if self.calls[x] <= self.failures:
            raise CustomError(f"item {x}, call {self.calls[x]}")
        return x


def test_amap_retries_a_flaky_coroutine() -> None:
    flaky = Flaky(failures=2)

    async def main() -> list[int]:
        return await pp.amap(flaky, range(6), retries=2)

    assert run(main) == list(range(6))
    assert flaky.calls == dict.fromkeys(range(6), 3)


def test_amap_retries_give_up_after_the_limit() -> None:
    flaky = Flaky(failures=3)

    async def main() -> list[Any]:
        return await pp.amap(flaky, range(3), retries=2, errors="return")

    results = run(main)
    assert all(isinstance(r, CustomError) for r in results)
    assert [str(r) for r in results] == [f"item {x}, call 3" for x in range(3)]
    assert flaky.calls == dict.fromkeys(range(3), 3)


def test_amap_retry_on_limits_what_is_retried() -> None:
    flaky = Flaky(failures=1)

    async def main() -> list[Any]:
        return await pp.amap(flaky, range(3), retries=2, retry_on=KeyError, errors="return")

    assert all(isinstance(r, CustomError) for r in run(main))
    assert flaky.calls == {0: 1, 1: 1, 2: 1}  # CustomError is not a KeyError: never re-run


def test_aimap_keeps_input_order_through_retries() -> None:
    """Item 1 fails twice and item 3 once: their results still come in input order."""
    calls: dict[int, int] = {}

    async def flaky(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        await asyncio.sleep(0.01 * (5 - x))  # earlier items finish later
        if (x == 1 and calls[x] <= 2) or (x == 3 and calls[x] == 1):
            raise CustomError(x)
        return x

    async def main() -> list[int]:
        return [r async for r in pp.aimap(flaky, range(6), retries=2, workers=2)]

    assert run(main) == list(range(6))
    assert calls[1] == 3
    assert calls[3] == 2


def test_pool_amap_counts_items_in_stats() -> None:
    flaky = Flaky(failures=1)

    async def main(pool: pp.Pool) -> tuple[list[Any], list[Any]]:
        first = await pool.amap(flaky, range(8), retries=1)
        second = await pool.amap(async_fail_on_three, range(5), errors="return")
        return first, second

    with pp.Pool("asyncio", workers=4) as pool:
        first, second = asyncio.run(main(pool))
        stats = pool.stats()
    assert first == list(range(8))
    assert isinstance(second[3], CustomError)
    assert stats.backend == "asyncio"
    assert stats.workers == 4
    assert (stats.items_done, stats.items_failed, stats.items_retried) == (8 + 4, 1, 8)
    assert stats.chunks >= 2
    assert stats.wall_s > 0
    assert set(stats.busy_s_by_worker) == {"asyncio"}


def test_overlapping_coroutines_show_in_the_measured_speedup() -> None:
    """busy time is the items' own seconds: 20 sleepers at once overlap ~20 times."""

    async def main(pool: pp.Pool) -> list[float]:
        return await pool.amap(async_sleep, [0.1] * 20)

    with pp.Pool("auto", workers=20) as pool:
        assert asyncio.run(main(pool)) == [0.1] * 20
        stats = pool.stats()
    assert stats.busy_s >= 20 * 0.1
    assert stats.actual_speedup is not None
    assert stats.actual_speedup > 2


def test_amap_shows_a_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> list[int]:
        return await pp.amap(async_square, range(7), progress=True)

    assert run(main) == [x * x for x in range(7)]
    err = capsys.readouterr().err
    assert "async_square" in err
    assert "7/7" in err


def test_amap_writes_a_report(tmp_path: Any) -> None:
    path = tmp_path / "run.json"

    async def main() -> list[Any]:
        return await pp.amap(async_fail_on_three, range(5), errors="skip", report=path)

    assert run(main) == [0, 1, 2, 4]
    import json

    text = path.read_text()
    assert "async_fail_on_three" in text
    assert json.loads(text)  # a readable report, written as the run ended


def test_report_of_amap_draws_chunks_within_the_run() -> None:
    """Chunks of overlapping coroutines (a fixed chunksize) are drawn where they ran."""

    async def main(pool: pp.Pool) -> list[float]:
        return await pool.amap(async_sleep, [0.1] * 8, chunksize=4, report=True)

    with pp.Pool("asyncio", workers=8) as pool:
        assert asyncio.run(main(pool)) == [0.1] * 8
        report = pool.last_report
    assert report is not None
    assert sorted(i for span in report.spans for i in span.indices) == list(range(8))
    for span in report.spans:
        assert span.worker == "asyncio"
        assert span.end_s - span.start_s >= 0.09  # it waited ~0.1 s...
        assert span.end_s <= report.wall_s + 0.05  # ...and is not drawn past the run


def test_coroutines_run_on_the_callers_loop_and_thread() -> None:
    seen: list[tuple[Any, int]] = []

    async def where(x: int) -> int:
        seen.append((asyncio.get_running_loop(), threading.get_ident()))
        return x

    async def main() -> Any:
        await pp.amap(where, range(5), backend="asyncio")
        return asyncio.get_running_loop()

    loop = run(main)
    assert seen == [(loop, threading.get_ident())] * 5


def test_amap_runs_the_initializer_on_the_callers_loop() -> None:
    state: dict[str, Any] = {}

    async def setup(value: int) -> None:
        state["loop"] = asyncio.get_running_loop()
        state["value"] = value

    async def read(x: int) -> int:
        return x + state["value"]

    async def main() -> list[int]:
        out = await pp.amap(read, range(3), initializer=setup, initargs=(10,))
        assert state["loop"] is asyncio.get_running_loop()
        return out

    assert run(main) == [10, 11, 12]


def test_amap_failing_initializer_fails_the_items() -> None:
    def setup() -> None:
        raise CustomError("no model")

    async def main() -> list[int]:
        return await pp.amap(async_square, range(3), initializer=setup)

    with pytest.raises(pp.InitializerError) as info:
        run(main)
    assert isinstance(info.value.__cause__, CustomError)


def test_amap_rejects_process_options_for_coroutines() -> None:
    async def main() -> list[int]:
        return await pp.amap(async_square, range(3), max_tasks_per_child=5)

    with pytest.raises(TypeError, match="coroutines"):
        run(main)


def test_timeout_cancels_the_late_coroutine() -> None:
    cancelled: list[int] = []

    async def late(x: int) -> int:
        try:
            await asyncio.sleep(10 if x == 1 else 0)
        except asyncio.CancelledError:
            cancelled.append(x)
            raise
        return x

    async def main() -> list[Any]:
        return await pp.amap(late, range(3), timeout=0.2, errors="return")

    started = time.monotonic()
    results = run(main)
    assert results[0] == 0
    assert results[2] == 2
    assert isinstance(results[1], pp.ItemTimeoutError)
    assert cancelled == [1]  # really cancelled at its await, not left running
    assert time.monotonic() - started < 5


def test_timeouts_are_retried() -> None:
    calls: list[int] = []

    async def slow_once(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            await asyncio.sleep(10)
        return x

    async def main() -> list[int]:
        return await pp.amap(slow_once, [7], timeout=0.2, retries=1)

    assert run(main) == [7]
    assert calls == [7, 7]


def test_cancelling_the_awaiting_task_cancels_items_and_leaves_no_task() -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def sleeper(x: int) -> int:
        started.append(x)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(x)
            raise
        return x

    async def main() -> set[asyncio.Task[Any]]:
        task = asyncio.create_task(pp.amap(sleeper, range(20), workers=5))
        while len(started) < 5:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    left = run(main)
    assert left == set()
    assert sorted(cancelled) == sorted(started) == [0, 1, 2, 3, 4]  # the rest never started


def test_breaking_out_of_aimap_cancels_in_flight_items() -> None:
    cancelled: list[int] = []

    async def sleeper(x: int) -> int:
        try:
            await asyncio.sleep(0 if x == 0 else 10)
        except asyncio.CancelledError:
            cancelled.append(x)
            raise
        return x

    async def main() -> set[asyncio.Task[Any]]:
        results = pp.aimap(sleeper, range(6), ordered=False)
        async for r in results:
            assert r == 0
            break
        await results.aclose()  # type: ignore[attr-defined]
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    assert run(main) == set()
    assert sorted(cancelled) == [1, 2, 3, 4, 5]


def test_pool_cancel_from_another_thread_stops_an_amap() -> None:
    with pp.Pool("asyncio", workers=4) as pool:

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, lambda: threading.Thread(target=pool.cancel).start())
            await pool.amap(async_sleep, [10.0] * 8)

        started = time.monotonic()
        with pytest.raises(CancelledError):
            run(main)
        assert time.monotonic() - started < 5
        assert pool.idle()


def test_pool_amap_of_a_coroutine_on_a_thread_pool_is_a_type_error() -> None:
    async def main(pool: pp.Pool) -> list[Any]:
        return await pool.amap(async_square, [1])

    with pp.Pool("threads") as pool, pytest.raises(TypeError, match="asyncio"):
        asyncio.run(main(pool))


def test_pool_aimap_of_a_plain_function_counts_in_the_pools_stats() -> None:
    async def main(pool: pp.Pool) -> list[int]:
        return [r async for r in pool.aimap(fail_on_three, range(6), errors="skip")]

    with pp.Pool("threads", workers=2) as pool:
        assert asyncio.run(main(pool)) == [0, 1, 2, 4, 5]
        stats = pool.stats()
    assert (stats.items_done, stats.items_failed) == (5, 1)


def test_a_coroutines_own_timeout_error_keeps_its_type() -> None:
    """Only a late item is an ItemTimeoutError; a TimeoutError it raises itself stays its own."""

    async def gives_up(x: int) -> int:
        raise TimeoutError(f"upstream {x} timed out")

    async def main() -> list[Any]:
        return await pp.amap(gives_up, [1], timeout=5, errors="return")

    [error] = run(main)
    assert type(error) is TimeoutError
    assert "upstream 1" in str(error)


@pytest.mark.parametrize("backend", ["auto", "asyncio"])
def test_sys_exit_in_a_coroutine_fails_its_item_only(backend: str) -> None:
    async def exits(x: int) -> int:
        if x == 1:
            raise SystemExit(3)
        return x

    async def main() -> list[Any]:
        return await pp.amap(exits, range(3), errors="return", backend=backend)  # type: ignore[arg-type]

    results = run(main)
    assert results[0] == 0
    assert results[2] == 2
    assert isinstance(results[1], SystemExit)
    on_the_backend = pp.map(exits, range(3), backend="asyncio", errors="return")
    assert isinstance(on_the_backend[1], SystemExit)


def test_profiling_coroutines_names_the_users_functions() -> None:
    """The profiler's async sample runs on the engine; its frames are not hot spots."""

    def crunch(n: int) -> int:
        return sum(i * i for i in range(n))

    async def fetch_and_crunch(n: int) -> int:
        await asyncio.sleep(0)
        return crunch(n)

    prof = pp.profile(fetch_and_crunch, [30_000] * 3, hotspots=True)
    if any("hot spots unavailable" in line for line in prof.evidence):
        pytest.skip("another profiler (e.g. coverage on 3.12+) is active")
    assert prof.workload is pp.Workload.ASYNC
    names = [spot.function for spot in prof.hotspots]
    assert any(name.startswith("fetch_and_crunch") for name in names), names
    assert any(name.startswith("crunch") for name in names), names
    assert not any(name.startswith(("call", "timed", "_run_async_sample")) for name in names)


# -- plain functions through amap (in a pool, off the loop) ---------------------


@pytest.mark.parametrize("backend", ["serial", "threads", "processes"])
def test_amap_of_a_plain_function(backend: str) -> None:
    async def main() -> list[int]:
        return await pp.amap(square, range(20), backend=backend)

    assert run(main) == [x * x for x in range(20)]


def test_amap_of_a_plain_function_with_auto() -> None:
    async def main() -> list[int]:
        return await pp.amap(square, range(20))

    assert run(main) == [x * x for x in range(20)]


def test_plain_function_does_not_block_the_loop() -> None:
    ticks: list[float] = []

    async def heartbeat(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def main() -> list[float]:
        stop = asyncio.Event()
        beating = asyncio.create_task(heartbeat(stop))
        await asyncio.sleep(0)
        before = len(ticks)
        results = await pp.amap(blocking_sleep, [0.3, 0.3, 0.3], backend="threads", workers=1)
        during = len(ticks) - before
        stop.set()
        await beating
        assert during >= 10, f"the loop ticked only {during} times in ~0.9 s of blocking work"
        return results

    assert run(main) == [0.3, 0.3, 0.3]


def test_aimap_of_a_plain_function_unordered_with_errors() -> None:
    async def main() -> list[Any]:
        return [
            r
            async for r in pp.aimap(
                fail_on_three, range(6), backend="threads", ordered=False, errors="skip"
            )
        ]

    assert sorted(run(main)) == [0, 1, 2, 4, 5]


def test_amap_of_a_plain_function_error_keeps_its_type() -> None:
    async def main() -> list[int]:
        return await pp.amap(fail_on_three, range(6), backend="processes")

    with pytest.raises(CustomError, match="cursed") as info:
        run(main)
    assert isinstance(info.value.__cause__, pp.RemoteTraceback)


def test_breaking_out_of_a_bridged_aimap_releases_the_pool() -> None:
    async def main() -> list[int]:
        got = []
        async for r in pp.aimap(square, range(100_000), backend="threads", workers=2):
            got.append(r)
            if len(got) == 3:
                break
        return got

    assert run(main) == [0, 1, 4]  # no_leaks checks the pool's threads are gone


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_cancelling_the_awaiting_task_stops_the_pool(backend: str) -> None:
    async def main() -> None:
        await asyncio.wait_for(
            pp.amap(stoppable_sleep, [10.0] * 4, backend=backend, workers=2), timeout=0.5
        )

    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        run(main)
    assert time.monotonic() - started < 5  # the tasks saw should_stop() and returned


def test_cancelling_amap_of_coroutines_cancels_them() -> None:
    async def main() -> None:
        await asyncio.wait_for(pp.amap(async_sleep, [10.0] * 4), timeout=0.3)

    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        run(main)
    assert time.monotonic() - started < 5


# -- bad input ------------------------------------------------------------------


def test_amap_rejects_a_non_callable() -> None:
    async def main() -> list[Any]:
        return await pp.amap(42, [1])  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="callable"):
        run(main)


def test_amap_rejects_bad_errors_policy() -> None:
    async def coroutines() -> list[Any]:
        return await pp.amap(async_square, [1], errors="bogus")

    async def plain() -> list[Any]:
        return await pp.amap(square, [1], backend="threads", errors="bogus")

    with pytest.raises(ValueError, match="errors"):
        run(coroutines)
    with pytest.raises(ValueError, match="errors"):
        run(plain)


@pytest.mark.parametrize("workers", [0, -1, 2.5])
@pytest.mark.parametrize("fn", [async_square, square], ids=["coroutine", "plain"])
def test_amap_rejects_bad_workers(fn: Callable[[int], Any], workers: object) -> None:
    async def main() -> list[Any]:
        return await pp.amap(fn, range(5), workers=workers, backend="auto")

    with pytest.raises(ValueError, match="workers"):
        run(main)


@pytest.mark.parametrize("timeout", [0, -1, "1"])
@pytest.mark.parametrize("fn", [async_square, square], ids=["coroutine", "plain"])
def test_amap_rejects_bad_timeout(fn: Callable[[int], Any], timeout: object) -> None:
    async def main() -> list[Any]:
        return await pp.amap(fn, range(5), timeout=timeout, backend="auto")

    with pytest.raises(ValueError, match="timeout"):
        run(main)


def test_amap_of_a_coroutine_on_a_sync_backend_is_a_type_error() -> None:
    async def main() -> list[Any]:
        return await pp.amap(async_square, [1], backend="threads")

    with pytest.raises(TypeError, match="asyncio"):
        run(main)


# -- backend="asyncio" in the sync API ------------------------------------------


def test_sync_map_runs_coroutines_on_the_asyncio_backend() -> None:
    assert pp.map(async_square, range(20), backend="asyncio") == [x * x for x in range(20)]
    results = pp.imap_unordered(slower_first, range(5), backend="asyncio", with_index=True)
    assert sorted(results) == [(x, x) for x in range(5)]


def test_asyncio_backend_keeps_input_order() -> None:
    assert list(pp.imap(slower_first, range(5), backend="asyncio")) == [0, 1, 2, 3, 4]


def test_asyncio_backend_timeout_is_item_timeout_error() -> None:
    results = pp.map(async_sleep, [0.0, 10.0], backend="asyncio", timeout=0.2, errors="return")
    assert results[0] == 0.0
    assert isinstance(results[1], pp.ItemTimeoutError)
    with pytest.raises(pp.ItemTimeoutError):
        pp.map(async_sleep, [10.0], backend="asyncio", timeout=0.2)


def test_asyncio_backend_error_keeps_its_type() -> None:
    with pytest.raises(CustomError, match="cursed"):
        pp.map(async_fail_on_three, range(6), backend="asyncio")
    assert pp.map(async_fail_on_three, range(6), backend="asyncio", errors="skip") == [
        0,
        1,
        2,
        4,
        5,
    ]


def test_asyncio_backend_bounds_coroutines_in_flight() -> None:
    counter = InFlight()
    assert pp.map(counter, range(30), backend="asyncio", workers=3) == list(range(30))
    assert 1 <= counter.peak <= 3


def test_cancelled_coroutines_see_should_stop() -> None:
    """The engine makes each item's stop token current in its own task."""
    seen: list[bool] = []

    async def watches(x: int) -> int:
        assert not pp.should_stop()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append(pp.should_stop())
            raise
        return x

    pool = pp.Pool("asyncio", workers=4)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            pool.map(watches, [1, 2])
        except BaseException as exc:  # inspected below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 10
    while pool.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    pool.cancel()
    thread.join(10)
    pool.shutdown()
    assert seen == [True, True]
    assert [type(e) for e in errors] == [CancelledError]
    assert not pp.should_stop()  # the caller's own context never had a token


def test_asyncio_pool_submit() -> None:
    with pp.Pool("asyncio") as pool:
        assert pool.submit(async_square, 7).result(timeout=10) == 49
        with pytest.raises(TypeError, match="coroutine"):
            pool.submit(square, 7)


def test_asyncio_backend_cancel_stops_a_running_map() -> None:
    pool = pp.Pool("asyncio", workers=4)
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            pool.map(async_sleep, [10.0] * 8)
        except BaseException as exc:  # inspected below
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    pool.cancel()
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 3
    assert isinstance(box.get("error"), CancelledError)
    assert pool.map(async_square, [3]) == [9]  # still usable
    pool.shutdown()


def test_cancelling_pool_amap_of_a_plain_function_stops_only_that_run() -> None:
    """On the caller's own pool, cancelling stops feeding that run; the pool keeps working."""

    async def main(pool: pp.Pool) -> None:
        task = asyncio.create_task(pool.amap(blocking_sleep, [0.2] * 20))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with pp.Pool("threads", workers=2) as pool:
        asyncio.run(main(pool))
        deadline = time.monotonic() + 10
        while not pool.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.idle()  # the run ended; its items in flight finished
        assert pool.stats().items_done < 20  # the rest never started
        assert pool.map(square, range(3)) == [0, 1, 4]


# -- as a user would: Ctrl-C -----------------------------------------------------

_CTRL_C_SCRIPT = """
import asyncio, sys
import powerpool as pp

async def slow(x):
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        print("cancelled", x, flush=True)
        raise

async def main():
    task = asyncio.ensure_future(pp.amap(slow, range(3), progress=False))
    await asyncio.sleep(0.2)
    print("started", flush=True)
    await task

asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_ctrl_c_during_amap_cancels_the_coroutines_promptly(tmp_path: Any) -> None:
    """A script without a main guard, run as a user would, interrupted as a terminal would."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(_CTRL_C_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert time.monotonic() - sent < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (1, -signal.SIGINT, 128 + signal.SIGINT), err
    assert "KeyboardInterrupt" in err
    assert sorted(out.split("\n")[:-1]) == ["cancelled 0", "cancelled 1", "cancelled 2"]

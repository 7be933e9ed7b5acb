"""``powerpool.Pool``: submit/map/imap/imap_unordered, lifecycle, cancel, statistics.

Every test runs on each sync backend (the ``backend`` fixture) or on the two
that run beside the caller (``parallel_backend``). Tasks that must be stopped
poll ``should_stop()`` and leave marker files in ``tmp_path`` so the test can
see, across processes, what they did.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import itertools
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

import pytest

import powerpool as pp
from powerpool import Pool, PoolState
from tasks import flaky, nap, square, wait_for_gate

pytestmark = pytest.mark.timeout(30)

STOP_WITHIN_S = 3.0
"""How long a cancel may take to reach the caller and the tasks (generous: the
test machine has 2 shared cores)."""


# -- functions the workers run ---------------------------------------------------


class CustomError(Exception):
    """An error type of the caller's own."""


def slow_square(x: int) -> int:
    time.sleep(0.02)
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def raise_custom(x: int) -> int:
    raise CustomError(f"custom failure for {x}")


def fail_on_three(x: int) -> int:
    if x == 3:
        raise CustomError(f"item {x} is cursed")
    return x


def sleep_until_stopped(marker_dir: str, x: int) -> str:
    """Run up to 20 s, polling should_stop(); markers say it started and saw the stop."""
    directory = Path(marker_dir)
    (directory / f"started-{x}").touch()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if pp.should_stop():
            (directory / f"stopped-{x}").touch()
            return "stopped"
        time.sleep(0.01)
    return "ran to the end"


def worker_identity(_: int) -> tuple[int, int]:
    time.sleep(0.001)  # give other workers the chance to take items, if they could
    return os.getpid(), threading.get_ident()


def stop_requested(x: int) -> bool:
    return pp.should_stop()


# -- helpers ------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class Background:
    """Runs ``fn()`` in a thread and keeps what it returned or raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # the test inspects it
            self.error = exc

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"still running after {timeout_s} s"


# -- submit -----------------------------------------------------------------------


def test_submit_returns_a_concurrent_future(backend: str) -> None:
    with Pool(backend) as pool:
        future = pool.submit(add, 2, 3)
        assert isinstance(future, Future)
        assert future.result(timeout=10) == 5


def test_submit_passes_keyword_arguments(backend: str) -> None:
    with Pool(backend) as pool:
        assert pool.submit(add, 2, y=3).result(timeout=10) == 5
        # "fn" and "self" are ordinary keyword arguments of the task.
        future = pool.submit(capture, 1, fn=2, self=3)
        assert future.result(timeout=10) == ((1,), {"fn": 2, "self": 3})


def test_submit_many(backend: str) -> None:
    with Pool(backend) as pool:
        futures = [pool.submit(square, i) for i in range(40)]
        assert [f.result(timeout=10) for f in futures] == [i * i for i in range(40)]


def test_submit_from_many_threads(parallel_backend: str) -> None:
    with Pool(parallel_backend, workers=2) as pool:
        results: dict[int, list[int]] = {}

        def submitter(offset: int) -> None:
            futures = [pool.submit(square, offset + i) for i in range(25)]
            results[offset] = [f.result(timeout=20) for f in futures]

        threads = [threading.Thread(target=submitter, args=(k * 100,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(25)
        assert results == {k * 100: [(k * 100 + i) ** 2 for i in range(25)] for k in range(4)}


def test_submitted_exception_keeps_type_and_traceback(backend: str) -> None:
    with Pool(backend) as pool:
        error = pool.submit(raise_custom, 5).exception(timeout=10)
    assert isinstance(error, CustomError)
    assert "custom failure for 5" in str(error)
    if backend == "processes":
        assert isinstance(error.__cause__, pp.RemoteTraceback)
        assert "raise_custom" in error.__cause__.tb


def test_submit_retries_a_flaky_call(backend: str, tmp_path: Path) -> None:
    with Pool(backend, retries=2) as pool:
        assert pool.submit(flaky, str(tmp_path), 1).result(timeout=10) == 1
        stats = pool.stats()
    assert stats.items_retried == 2
    assert stats.items_done == 1
    assert stats.items_failed == 0


def test_submit_rejects_a_non_callable(backend: str) -> None:
    with Pool(backend) as pool, pytest.raises(TypeError, match="callable"):
        pool.submit(42)  # type: ignore[arg-type]


# -- map / imap / imap_unordered -------------------------------------------------


def test_pool_map_imap_and_imap_unordered(backend: str) -> None:
    with Pool(backend) as pool:
        assert pool.map(square, range(20)) == [x * x for x in range(20)]
        assert list(pool.imap(square, range(20))) == [x * x for x in range(20)]
        assert sorted(pool.imap_unordered(square, range(20))) == sorted(x * x for x in range(20))
        pairs = sorted(pool.imap_unordered(square, range(20), with_index=True))
        assert pairs == [(x, x * x) for x in range(20)]
        assert pool.map(add, [1, 2], [3, 4]) == [4, 6]


def test_pool_runs_many_maps_on_warm_workers(backend: str) -> None:
    with Pool(backend, workers=2) as pool:
        for n in range(5):
            assert pool.map(square, range(n * 10)) == [x * x for x in range(n * 10)]


def test_concurrent_maps_on_one_pool(parallel_backend: str) -> None:
    with Pool(parallel_backend, workers=2) as pool:
        runs = [
            Background(functools.partial(pool.map, add, range(200), [k] * 200)) for k in range(3)
        ]
        for k, run in enumerate(runs):
            run.join(20)
            assert run.error is None
            assert run.result == [x + k for x in range(200)]


def test_run_options_override_pool_defaults(backend: str) -> None:
    with Pool(backend, errors="return") as pool:
        results = pool.map(fail_on_three, range(5))
        assert isinstance(results[3], CustomError)
        assert pool.map(fail_on_three, range(5), errors="skip") == [0, 1, 2, 4]
        with pytest.raises(CustomError):
            pool.map(fail_on_three, range(5), errors="raise")


def test_unknown_run_option_is_a_type_error(backend: str) -> None:
    with Pool(backend) as pool, pytest.raises(TypeError, match="retires"):
        pool.map(square, [1], retires=2)


def test_chunksize_is_honoured(backend: str) -> None:
    with Pool(backend, workers=2) as pool:
        assert pool.map(square, range(20), chunksize=5) == [x * x for x in range(20)]
        assert pool.stats().chunks == 4
        assert sorted(pool.imap_unordered(square, range(7), chunksize=3)) == [
            x * x for x in range(7)
        ]
        assert pool.stats().chunks == 4 + 3  # 3 + 3 + 1
        # The items of one chunk run one after another in the same worker.
        where = pool.map(worker_identity, range(20), chunksize=5)
        for start in range(0, 20, 5):
            assert len(set(where[start : start + 5])) == 1, where


def test_chunksize_default_from_the_pool(backend: str) -> None:
    with Pool(backend, workers=2, chunksize=10) as pool:
        pool.map(square, range(30))
        assert pool.stats().chunks == 3


def test_imap_is_lazy(backend: str, tmp_path: Path) -> None:
    with Pool(backend) as pool:
        results = pool.imap(flaky, [str(tmp_path)] * 3, [0, 2, 4])
        time.sleep(0.05)
        assert list(tmp_path.iterdir()) == []  # nothing ran before iteration
        assert list(results) == [0, 2, 4]


def test_closing_imap_early_leaves_the_pool_usable(backend: str) -> None:
    with Pool(backend, workers=2) as pool:
        results = pool.imap(square, range(10_000))
        assert next(results) == 0
        results.close()  # type: ignore[attr-defined]
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


def test_should_stop_is_false_in_a_live_run(backend: str) -> None:
    assert pp.should_stop() is False  # outside any task
    with Pool(backend) as pool:
        assert pool.map(stop_requested, range(4)) == [False] * 4
        assert pool.submit(stop_requested, 0).result(timeout=10) is False


# -- lifecycle ------------------------------------------------------------------


def test_context_manager_shuts_the_pool_down(backend: str) -> None:
    with Pool(backend) as pool:
        assert pool.state is PoolState.OPEN
        assert pool.map(square, [3]) == [9]
    assert pool.state is PoolState.CLOSED


def test_shutdown_is_idempotent(backend: str) -> None:
    pool = Pool(backend)
    pool.map(square, range(3))
    pool.shutdown()
    pool.shutdown()
    pool.shutdown(wait=False)
    pool.shutdown(cancel_futures=True)
    assert pool.state is PoolState.CLOSED


def test_shutdown_of_an_unused_pool(backend: str) -> None:
    pool = Pool(backend)
    pool.shutdown()
    assert pool.state is PoolState.CLOSED


@pytest.mark.parametrize(
    "use",
    [
        lambda pool: pool.submit(square, 1),
        lambda pool: pool.map(square, [1]),
        lambda pool: pool.imap(square, [1]),
        lambda pool: pool.imap_unordered(square, [1]),
    ],
    ids=["submit", "map", "imap", "imap_unordered"],
)
def test_closed_pool_raises_pool_closed_error(backend: str, use: Callable[[Pool], Any]) -> None:
    pool = Pool(backend)
    pool.map(square, [1])
    pool.shutdown()
    with pytest.raises(pp.PoolClosedError, match="closed") as info:
        use(pool)
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, pp.PowerpoolError)


def test_pool_closed_inside_a_with_block_refuses_work(backend: str) -> None:
    with Pool(backend) as pool:
        pool.shutdown()
        with pytest.raises(pp.PoolClosedError):
            pool.map(square, [1])


def test_shutdown_waits_for_submitted_work(parallel_backend: str, tmp_path: Path) -> None:
    pool = Pool(parallel_backend, workers=2)
    futures = [pool.submit(wait_for_gate, str(tmp_path), i) for i in range(4)]
    wait_until((tmp_path / "started-0").exists)
    threading.Timer(0.3, (tmp_path / "gate").touch).start()
    pool.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]


@pytest.mark.parametrize("wait", [True, False])
def test_shutdown_cancel_futures_cancels_pending_ones(
    parallel_backend: str, tmp_path: Path, wait: bool
) -> None:
    pool = Pool(parallel_backend, workers=1)
    running = pool.submit(wait_for_gate, str(tmp_path), 0)
    wait_until((tmp_path / "started-0").exists)
    pending = [pool.submit(square, i) for i in range(5)]
    if wait:
        threading.Timer(0.3, (tmp_path / "gate").touch).start()
    pool.shutdown(wait=wait, cancel_futures=True)
    assert all(f.cancelled() for f in pending)
    assert not running.cancelled()
    (tmp_path / "gate").touch()
    assert running.result(timeout=10) == 0
    with pytest.raises(pp.PoolClosedError):
        pool.submit(square, 1)


@pytest.mark.timeout(40)
def test_shutdown_during_a_running_map_never_hangs(backend: str, tmp_path: Path) -> None:
    # The map either finishes or fails with CancelledError; it must not wait forever
    # for chunks that a closed backend will never run.
    pool = Pool(backend, workers=2)
    run = Background(lambda: pool.map(slow_square, range(50)))
    time.sleep(0.3)
    pool.shutdown(wait=True)
    run.join(20)
    if run.error is None:
        assert run.result == [x * x for x in range(50)]
    else:
        assert isinstance(run.error, CancelledError), repr(run.error)


def test_submit_after_shutdown_without_wait_is_refused(
    parallel_backend: str, tmp_path: Path
) -> None:
    pool = Pool(parallel_backend, workers=1)
    running = pool.submit(wait_for_gate, str(tmp_path), 0)
    pool.shutdown(wait=False)
    with pytest.raises(pp.PoolClosedError):
        pool.submit(square, 1)
    (tmp_path / "gate").touch()
    assert running.result(timeout=10) == 0


# -- cancel --------------------------------------------------------------------


def test_cancel_stops_a_running_map(backend: str, tmp_path: Path) -> None:
    pool = Pool(backend, workers=2)
    task = functools.partial(sleep_until_stopped, str(tmp_path))
    run = Background(lambda: pool.map(task, range(20)))
    wait_until((tmp_path / "started-0").exists)
    cancelled_at = time.monotonic()
    pool.cancel()
    run.join(STOP_WITHIN_S + 5)
    assert time.monotonic() - cancelled_at < STOP_WITHIN_S
    assert isinstance(run.error, CancelledError)
    # The tasks that were running saw should_stop() turn true and returned.
    wait_until((tmp_path / "stopped-0").exists, STOP_WITHIN_S)
    started = {p.name for p in tmp_path.iterdir() if p.name.startswith("started-")}
    assert len(started) < 20  # the rest never started
    # The pool stays usable, and new work is not cancelled.
    assert pool.map(stop_requested, range(3)) == [False] * 3
    pool.shutdown()


def test_cancel_stops_a_running_imap_unordered(parallel_backend: str, tmp_path: Path) -> None:
    with Pool(parallel_backend, workers=2) as pool:
        task = functools.partial(sleep_until_stopped, str(tmp_path))
        run = Background(lambda: list(pool.imap_unordered(task, range(20))))
        wait_until((tmp_path / "started-0").exists)
        pool.cancel()
        run.join(STOP_WITHIN_S + 5)
        assert isinstance(run.error, CancelledError)


def test_cancel_cancels_pending_futures(parallel_backend: str, tmp_path: Path) -> None:
    with Pool(parallel_backend, workers=1) as pool:
        running = pool.submit(sleep_until_stopped, str(tmp_path), 0)
        wait_until((tmp_path / "started-0").exists)
        pending = [pool.submit(square, i) for i in range(5)]
        pool.cancel()
        assert all(f.cancelled() for f in pending)
        # The running task cannot be cancelled, but it is told to stop.
        assert running.result(timeout=STOP_WITHIN_S + 5) == "stopped"
        assert pool.submit(square, 4).result(timeout=10) == 16


def test_terminate_stops_everything(parallel_backend: str, tmp_path: Path) -> None:
    pool = Pool(parallel_backend, workers=2)
    task = functools.partial(sleep_until_stopped, str(tmp_path))
    run = Background(lambda: pool.map(task, range(20)))
    wait_until((tmp_path / "started-0").exists)
    pool.terminate()
    run.join(STOP_WITHIN_S + 5)
    assert isinstance(run.error, CancelledError)
    assert pool.state is PoolState.CLOSED
    with pytest.raises(pp.PoolClosedError):
        pool.map(square, [1])


# -- statistics -----------------------------------------------------------------


def test_stats_count_done_failed_and_retried(backend: str, tmp_path: Path) -> None:
    with Pool(backend) as pool:
        assert pool.stats().items_done == 0
        pool.map(fail_on_three, range(6), errors="return")
        stats = pool.stats()
        assert (stats.items_done, stats.items_failed, stats.items_retried) == (5, 1, 0)
        pool.map(functools.partial(flaky, str(tmp_path)), range(4), retries=2)
        stats = pool.stats()
        # Items 1 and 3 failed twice each before succeeding.
        assert (stats.items_done, stats.items_failed, stats.items_retried) == (9, 1, 4)
        assert pool.submit(square, 2).result(timeout=10) == 4
        assert pool.stats().items_done == 10
    assert stats.backend == backend
    assert stats.workers >= 1
    assert stats.chunks >= 1
    assert stats.wall_s >= 0
    assert stats.busy_s >= 0
    assert 0.0 <= stats.utilization <= 1.0


def test_stats_is_a_frozen_record(backend: str) -> None:
    with Pool(backend) as pool:
        pool.map(square, range(3))
        stats = pool.stats()
    assert isinstance(stats, pp.PoolStats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.items_done = 0  # type: ignore[misc]


def test_stats_pickle_and_copy_whole_and_still_read_only() -> None:
    with Pool("threads", workers=2) as pool:
        pool.map(square, range(6))
        stats = pool.stats()
    for again in (pickle.loads(pickle.dumps(stats)), copy.deepcopy(stats), copy.copy(stats)):
        assert again == stats
        assert again.busy_s_by_worker == stats.busy_s_by_worker != {}
        with pytest.raises(TypeError):
            again.busy_s_by_worker["thread-0"] = 0.0  # type: ignore[index]


def test_stats_count_failures_of_imap_unordered(backend: str) -> None:
    with Pool(backend) as pool:
        assert sorted(pool.imap_unordered(fail_on_three, range(6), errors="skip")) == [
            0,
            1,
            2,
            4,
            5,
        ]
        stats = pool.stats()
    assert (stats.items_done, stats.items_failed) == (5, 1)


# -- construction ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"backend": "nope"}, ValueError),
        ({"workers": 0}, ValueError),
        ({"chunksize": 0}, ValueError),
        ({"timeout": -1}, ValueError),
        ({"errors": "bogus"}, ValueError),
        ({"retries": -2}, ValueError),
        ({"progress": "sometimes"}, ValueError),
        ({"initializer": 5}, TypeError),
        ({"retires": 3}, TypeError),
    ],
)
def test_bad_pool_options_fail_at_construction(kwargs: dict[str, Any], error: type) -> None:
    kwargs.setdefault("backend", "threads")
    with pytest.raises(error):
        Pool(**kwargs)


def test_timeout_on_a_serial_pool_fails_at_construction() -> None:
    # The serial backend runs items in the caller's thread and cannot stop them.
    with pytest.raises(ValueError, match="timeout"):
        Pool("serial", timeout=1)


def test_explicit_backend_has_no_plan(backend: str) -> None:
    with Pool(backend) as pool:
        pool.map(square, range(3))
        assert pool.last_plan is None
        assert backend in repr(pool)


# -- more edges -------------------------------------------------------------------


def test_submit_with_a_timeout(parallel_backend: str) -> None:
    # 2 s: the replacement worker must import this module within the next item's time.
    with Pool(parallel_backend, workers=1, timeout=2) as pool:
        error = pool.submit(nap, 10).exception(timeout=15)
        assert isinstance(error, pp.ItemTimeoutError)
        assert pool.submit(square, 3).result(timeout=10) == 9


def test_timed_out_items_are_retried(parallel_backend: str) -> None:
    with Pool(parallel_backend, workers=1) as pool:
        results = pool.map(nap, [10.0], timeout=0.2, retries=1, errors="return")
        assert isinstance(results[0], pp.ItemTimeoutError)
        stats = pool.stats()
    assert (stats.items_retried, stats.items_failed) == (1, 1)


def test_pool_is_usable_after_a_failed_map(backend: str) -> None:
    with Pool(backend, workers=2) as pool:
        with pytest.raises(CustomError):
            pool.map(fail_on_three, range(100))
        with pytest.raises(CustomError):
            list(pool.imap_unordered(fail_on_three, range(100)))
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


def broken_input() -> Iterator[int]:
    yield from range(5)
    raise LookupError("the input broke")


def test_an_error_in_the_input_reaches_the_caller(backend: str) -> None:
    with Pool(backend, workers=2) as pool:
        with pytest.raises(LookupError, match="input broke"):
            pool.map(square, broken_input())
        assert pool.map(square, [2]) == [4]


def test_endless_second_iterable_is_cut_by_the_first(backend: str) -> None:
    with Pool(backend) as pool:
        assert pool.map(add, [1, 2, 3], itertools.count(10)) == [11, 13, 15]


def test_large_arguments_and_results_round_trip(backend: str) -> None:
    blobs = [bytes([i]) * 1_000_000 for i in range(4)]
    with Pool(backend, workers=2) as pool:
        assert pool.map(bytes.upper, blobs) == blobs


def test_cancel_reaches_an_idle_imap(parallel_backend: str, tmp_path: Path) -> None:
    with Pool(parallel_backend, workers=2) as pool:
        results = pool.imap(sleep_until_stopped, [str(tmp_path)] * 10, range(10))
        wait_for = Background(lambda: next(results))
        wait_until((tmp_path / "started-0").exists)
        pool.cancel()
        wait_for.join(STOP_WITHIN_S + 5)
        assert isinstance(wait_for.error, CancelledError)


def test_exception_in_the_with_block_still_shuts_down(backend: str) -> None:
    pool = Pool(backend)

    def body() -> None:
        with pool:
            pool.map(square, [1])
            raise KeyError("caller bug")

    with pytest.raises(KeyError):
        body()
    assert pool.state is PoolState.CLOSED


@pytest.mark.skipif(
    importlib.util.find_spec("powerpool._plan") is None, reason="powerpool._plan not written yet"
)
def test_auto_backend_runs_and_explains() -> None:
    with Pool() as pool:
        assert pool.map(square, range(200)) == [x * x for x in range(200)]
        assert pool.last_plan is not None
        assert sorted(pool.imap_unordered(square, range(50))) == sorted(x * x for x in range(50))
        assert pool.submit(square, 5).result(timeout=10) == 25
        with pytest.raises(CustomError):
            pool.map(fail_on_three, range(10))
        results = pool.map(fail_on_three, range(6), errors="return")
        assert isinstance(results[3], CustomError)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_processes_with_each_start_method(method: str) -> None:
    with Pool("processes", workers=1, start_method=method) as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
        assert pool.map(lambda x: x + 1, range(3)) == [1, 2, 3]  # by value (cloudpickle)
        offset = 10
        assert pool.submit(lambda: offset * 2).result(timeout=30) == 20  # a closure


@pytest.mark.timeout(60)
def test_auto_honours_a_timeout_on_tiny_work() -> None:
    # Tiny work would run in the caller's thread, which cannot stop a late
    # item: with timeout= every item stays in a worker process, and the plan
    # says why.
    with pp.Pool(progress=False) as pool:
        assert pool.map(abs, [-1, -2, 3] * 10, timeout=5) == [1, 2, 3] * 10
        assert pool.last_plan is not None
        assert pool.last_plan.backend == "processes"
        assert any("timeout=" in reason for reason in pool.last_plan.reasons)
        assert pool.stats().items_in_caller == 0

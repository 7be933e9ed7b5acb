"""``powerpool.Executor`` behaves as a ``concurrent.futures.Executor``.

Modelled on CPython's own executor tests (Lib/test/test_concurrent_futures:
``ExecutorTest``, ``ThreadPoolShutdownTest``, ``AsCompletedTests``,
``WaitTests``), run over the threads and processes backends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import os
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    CancelledError,
    as_completed,
    wait,
)
from pathlib import Path
from typing import Any

import pytest

import powerpool as pp
from tasks import nap, wait_for_gate

pytestmark = pytest.mark.timeout(30)


# -- functions the workers run ---------------------------------------------------


def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def raise_zero_division(x: int) -> float:
    return x / 0


def pid(_: int) -> int:
    time.sleep(0.02)
    return os.getpid()


class Holder:
    """An object whose method is submitted; the executor must not keep it alive."""

    def method(self) -> int:
        return 1


def wait_until_exists(path: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


@pytest.fixture
def executor(parallel_backend: str) -> Iterator[pp.Executor]:
    ex = pp.Executor(max_workers=2, backend=parallel_backend)
    yield ex
    ex.pool.cancel()  # tasks that poll should_stop() end now
    ex.shutdown(wait=True)


# -- ExecutorTest ---------------------------------------------------------------


def test_is_a_concurrent_futures_executor() -> None:
    executor = pp.Executor()
    assert isinstance(executor, concurrent.futures.Executor)
    executor.shutdown()


def test_submit(executor: pp.Executor) -> None:
    future = executor.submit(pow, 2, 8)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=10) == 256


def test_submit_keyword(executor: pp.Executor) -> None:
    assert executor.submit(mul, 2, y=8).result(timeout=10) == 16
    future = executor.submit(capture, 1, self=2, fn=3)
    assert future.result(timeout=10) == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=capture, arg=1)  # type: ignore[call-arg]


def test_map(executor: pp.Executor) -> None:
    assert list(executor.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10), chunksize=3)) == list(
        map(pow, range(10), range(10))
    )


def test_map_exception(executor: pp.Executor) -> None:
    results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout(executor: pp.Executor) -> None:
    # Start the workers first: the timeout is about the late item, and a fresh
    # forkserver pool on a loaded 2-core machine can itself take a second.
    assert executor.submit(nap, 0).result(timeout=30) == 0
    results = executor.map(nap, [0, 0, 10], timeout=2)
    assert [next(results), next(results)] == [0, 0]
    with pytest.raises(concurrent.futures.TimeoutError):  # not the builtin before 3.11
        next(results)


def test_exception_keeps_its_type(executor: pp.Executor, parallel_backend: str) -> None:
    error = executor.submit(raise_zero_division, 1).exception(timeout=10)
    assert isinstance(error, ZeroDivisionError)
    if parallel_backend == "processes":
        assert isinstance(error.__cause__, pp.RemoteTraceback)
        assert "raise_zero_division" in error.__cause__.tb


def test_no_stale_references(executor: pp.Executor) -> None:
    # CPython's test_no_stale_references: once its future is done, nothing the
    # executor holds keeps the submitted callable (and what it binds) alive.
    holder = Holder()
    collected = threading.Event()
    ref = weakref.ref(holder, lambda _: collected.set())
    assert executor.submit(holder.method).result(timeout=10) == 1
    del holder
    for _ in range(20):  # the worker drops its reference just after resolving the future
        gc.collect()
        if collected.wait(0.05):
            break
    assert ref() is None


def test_max_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        pp.Executor(max_workers=0)
    with pytest.raises(ValueError, match="max_workers"):
        pp.Executor(max_workers=-1)


def test_threads_never_run_more_than_max_workers() -> None:
    lock = threading.Lock()
    running = [0]
    peak = [0]

    def task(_: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    with pp.Executor(max_workers=3, backend="threads") as executor:
        futures = [executor.submit(task, i) for i in range(30)]
        wait(futures, timeout=20)
        assert all(f.done() for f in futures)
        executor.map(task, range(30))
    assert 1 <= peak[0] <= 3


def test_processes_never_use_more_than_max_workers() -> None:
    with pp.Executor(max_workers=2, backend="processes") as executor:
        pids = set(executor.map(pid, range(20), timeout=20))
    assert 1 <= len(pids) <= 2
    assert os.getpid() not in pids


def test_context_manager(parallel_backend: str) -> None:
    with pp.Executor(max_workers=2, backend=parallel_backend) as executor:
        future = executor.submit(mul, 3, 4)
    assert future.done()
    assert future.result(timeout=0) == 12
    with pytest.raises(RuntimeError):
        executor.submit(mul, 1, 1)


# -- ShutdownTest ---------------------------------------------------------------


def test_submit_after_shutdown_raises_runtime_error(executor: pp.Executor) -> None:
    executor.shutdown()
    with pytest.raises(RuntimeError) as info:
        executor.submit(pow, 2, 5)
    assert isinstance(info.value, pp.PoolClosedError)


def test_shutdown_wait_twice(executor: pp.Executor) -> None:
    futures = [executor.submit(nap, 0.05) for _ in range(4)]
    executor.shutdown(wait=True)
    assert all(f.done() for f in futures)
    executor.shutdown(wait=True)
    executor.shutdown(wait=False)


def test_shutdown_waits_for_running_and_pending_work(executor: pp.Executor) -> None:
    futures = [executor.submit(nap, 0.1) for _ in range(6)]
    executor.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == [0.1] * 6


def test_shutdown_cancel_futures(parallel_backend: str, tmp_path: Path) -> None:
    executor = pp.Executor(max_workers=1, backend=parallel_backend)
    first = executor.submit(wait_for_gate, str(tmp_path), 0)
    wait_until_exists(tmp_path / "started-0")
    others = [executor.submit(pow, 2, i) for i in range(10)]
    threading.Timer(0.3, (tmp_path / "gate").touch).start()
    executor.shutdown(wait=True, cancel_futures=True)
    assert first.result(timeout=0) == 0
    assert all(f.cancelled() for f in others)
    for future in others:
        with pytest.raises(CancelledError):
            future.result(timeout=0)


def test_shutdown_no_wait_returns_at_once(parallel_backend: str, tmp_path: Path) -> None:
    executor = pp.Executor(max_workers=1, backend=parallel_backend)
    future = executor.submit(wait_for_gate, str(tmp_path), 0)
    wait_until_exists(tmp_path / "started-0")
    started = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - started < 2  # did not wait for the gate
    assert not future.done()
    (tmp_path / "gate").touch()
    assert future.result(timeout=10) == 0


# -- AsCompletedTests / WaitTests ------------------------------------------------


def test_as_completed(executor: pp.Executor) -> None:
    futures = {executor.submit(nap, s) for s in (0.3, 0.0, 0.1)}
    assert set(as_completed(futures, timeout=20)) == futures


def test_as_completed_yields_fast_ones_first(executor: pp.Executor) -> None:
    slow = executor.submit(nap, 10)
    fast = executor.submit(mul, 2, 3)
    assert next(as_completed([slow, fast], timeout=10)) is fast


def test_as_completed_timeout(executor: pp.Executor) -> None:
    slow = executor.submit(nap, 10)
    with pytest.raises(concurrent.futures.TimeoutError):
        list(as_completed([slow], timeout=0.2))


def test_wait_first_completed(executor: pp.Executor) -> None:
    slow = executor.submit(nap, 10)
    fast = executor.submit(mul, 21, 2)
    done, not_done = wait([slow, fast], timeout=10, return_when=FIRST_COMPLETED)
    assert done == {fast}
    assert not_done == {slow}


def test_wait_all_completed(executor: pp.Executor) -> None:
    futures = [executor.submit(mul, i, i) for i in range(5)]
    futures.append(executor.submit(raise_zero_division, 1))
    done, not_done = wait(futures, timeout=20, return_when=ALL_COMPLETED)
    assert done == set(futures)
    assert not not_done


def test_wait_first_exception(executor: pp.Executor) -> None:
    slow = executor.submit(nap, 10)
    failing = executor.submit(raise_zero_division, 1)
    done, not_done = wait([slow, failing], timeout=10, return_when=FIRST_EXCEPTION)
    assert done == {failing}
    assert not_done == {slow}


def test_wait_timeout(executor: pp.Executor) -> None:
    slow = executor.submit(nap, 10)
    done, not_done = wait([slow], timeout=0.2)
    assert not done
    assert not_done == {slow}


def test_futures_work_with_asyncio(executor: pp.Executor) -> None:
    async def main() -> list[int]:
        futures = [asyncio.wrap_future(executor.submit(mul, i, 2)) for i in range(5)]
        return list(await asyncio.gather(*futures))

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]


def test_run_in_executor(executor: pp.Executor) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, mul, 6, 7)

    assert asyncio.run(main()) == 42


def test_executor_exposes_pool_and_stats(executor: pp.Executor, parallel_backend: str) -> None:
    assert executor.submit(mul, 1, 1).result(timeout=10) == 1
    assert isinstance(executor.pool, pp.Pool)
    stats = executor.stats()
    assert stats.backend == parallel_backend
    assert stats.items_done == 1


def test_many_small_futures_then_shutdown(executor: pp.Executor) -> None:
    # CPython's test_hang_issue12364: shutdown with a queue of pending work.
    futures = [executor.submit(nap, 0.01) for _ in range(50)]
    executor.shutdown()
    assert [f.result(timeout=0) for f in futures] == [0.01] * 50


def test_as_completed_with_duplicate_futures(executor: pp.Executor) -> None:
    future = executor.submit(mul, 2, 2)
    assert list(as_completed([future, future], timeout=10)) == [future]


def test_default_executor_runs_work() -> None:
    with pp.Executor() as executor:
        assert executor.submit(mul, 3, 5).result(timeout=10) == 15
        assert list(executor.map(mul, [1, 2], [3, 4], timeout=10)) == [3, 8]


# -- what Python 3.14 added, on every supported Python ------------------------------


def test_max_workers_error_names_max_workers() -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        pp.Executor(max_workers=0)


def test_map_buffersize_bounds_the_tasks_submitted_ahead(executor: pp.Executor) -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    results = executor.map(abs, endless(), buffersize=3)
    assert [next(results) for _ in range(10)] == list(range(10))
    # 3 ahead, plus one submitted per result taken: never the whole input.
    assert pulled <= 10 + 3
    results.close()


def test_map_buffersize_keeps_order_errors_and_timeout(executor: pp.Executor) -> None:
    assert list(executor.map(mul, range(8), range(8), buffersize=2)) == [x * x for x in range(8)]
    with pytest.raises(ZeroDivisionError):
        list(executor.map(raise_zero_division, [1, 2], buffersize=1))
    with pytest.raises(TypeError, match="buffersize must be an integer or None"):
        executor.map(abs, [1], buffersize=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="buffersize must be None or > 0"):
        executor.map(abs, [1], buffersize=0)


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers_stop_running_work(
    parallel_backend: str, method: str, tmp_path: Path
) -> None:
    executor = pp.Executor(max_workers=1, backend=parallel_backend)
    running = executor.submit(wait_for_gate, str(tmp_path), 0)
    waiting = executor.submit(pow, 2, 3)
    wait_until_exists(tmp_path / "started-0")
    getattr(executor, method)()
    assert waiting.cancelled()
    with pytest.raises(RuntimeError):
        executor.submit(pow, 2, 2)
    (tmp_path / "gate").touch()  # threads cannot be killed: let it end
    if parallel_backend == "processes":
        with pytest.raises(CancelledError):
            running.result(timeout=10)

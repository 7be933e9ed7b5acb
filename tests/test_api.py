"""The module-level API (``powerpool.map``/``imap``/``imap_unordered``) on every sync backend.

Also the input checks: every mistake a caller can make with the options gets
a clear error at the call, before anything runs.

Functions handed to the processes backend are module-level so that they
pickle by reference.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import powerpool as pp
from powerpool import _warm_pools
from powerpool._chunking import MAX_CHUNK_ITEMS
from tasks import flaky, nap, square

pytestmark = pytest.mark.timeout(30)

ENDLESS_INPUT_BOUND = 6 * MAX_CHUNK_ITEMS
"""Most items an imap with 2 workers may pull from an endless input to yield the
first 10: 2 chunks in flight per worker, plus the first small chunks and one
refill, each at most MAX_CHUNK_ITEMS (trivial items grow chunks to that cap)."""


# -- functions the workers run ---------------------------------------------------


class CustomError(Exception):
    """An error type of the caller's own (module-level, so it pickles)."""


def add(x: int, y: int) -> int:
    return x + y


def fail_from_three(x: int) -> int:
    if x >= 3:
        raise ValueError(f"bad item {x}")
    return x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise CustomError(f"item {x} is cursed")
    return x


def raise_custom(x: int) -> int:
    raise CustomError(f"custom failure for {x}")


def slower_first(x: int) -> int:
    """Earlier items finish later, so completion order is the reverse of input order."""
    time.sleep(0.03 * (5 - x))
    return x


async def async_square(x: int) -> int:
    return x * x


def counting(source: Iterator[int], tally: list[int]) -> Iterator[int]:
    """Yield from ``source``, counting in ``tally[0]`` how many items were pulled."""
    for x in source:
        tally[0] += 1
        yield x


# -- results -------------------------------------------------------------------


def test_map_returns_results_in_input_order(backend: str) -> None:
    assert pp.map(square, range(50), backend=backend) == [x * x for x in range(50)]


def test_map_keeps_order_when_late_items_finish_first(backend: str) -> None:
    assert pp.map(slower_first, range(5), backend=backend, workers=5) == [0, 1, 2, 3, 4]


def test_map_zips_several_iterables_to_the_shortest(backend: str) -> None:
    assert pp.map(add, [1, 2, 3, 4], [10, 20, 30], backend=backend) == [11, 22, 33]


def test_map_of_nothing_is_empty(backend: str) -> None:
    assert pp.map(square, [], backend=backend) == []


def test_map_accepts_a_lambda(backend: str) -> None:
    # Lambdas cannot be pickled by reference: processes ship them by value.
    assert pp.map(lambda x: x + 1, range(5), backend=backend) == [1, 2, 3, 4, 5]


def test_map_accepts_a_partial(backend: str) -> None:
    assert pp.map(functools.partial(add, 100), range(3), backend=backend) == [100, 101, 102]


def test_imap_yields_in_input_order(backend: str) -> None:
    results = pp.imap(slower_first, range(5), backend=backend, workers=5)
    assert list(results) == [0, 1, 2, 3, 4]


def test_imap_unordered_yields_every_result(backend: str) -> None:
    results = pp.imap_unordered(square, range(30), backend=backend)
    assert sorted(results) == sorted(x * x for x in range(30))


def test_imap_unordered_with_index_pairs_results_with_inputs(backend: str) -> None:
    pairs = list(pp.imap_unordered(square, range(30), backend=backend, with_index=True))
    assert sorted(pairs) == [(x, x * x) for x in range(30)]


def test_imap_unordered_with_index_over_several_iterables(backend: str) -> None:
    pairs = pp.imap_unordered(add, "abc", "xyz", backend=backend, with_index=True)
    assert sorted(pairs) == [(0, "ax"), (1, "by"), (2, "cz")]


@pytest.mark.timeout(20)
def test_imap_over_endless_input_is_prompt_and_bounded(backend: str) -> None:
    tally = [0]
    started = time.monotonic()
    results = pp.imap(square, counting(itertools.count(), tally), backend=backend, workers=2)
    first = list(itertools.islice(results, 10))
    results.close()  # type: ignore[attr-defined]
    assert first == [x * x for x in range(10)]
    assert time.monotonic() - started < 10
    assert tally[0] <= ENDLESS_INPUT_BOUND
    pulled = tally[0]
    time.sleep(0.1)
    assert tally[0] == pulled  # closing stopped the input


@pytest.mark.timeout(20)
def test_imap_unordered_over_endless_input_is_prompt(backend: str) -> None:
    tally = [0]
    results = pp.imap_unordered(
        square, counting(itertools.count(), tally), backend=backend, workers=2
    )
    first = list(itertools.islice(results, 10))
    results.close()  # type: ignore[attr-defined]
    assert len(first) == 10
    assert tally[0] <= ENDLESS_INPUT_BOUND


def test_imap_does_not_consume_input_before_iteration(backend: str) -> None:
    tally = [0]
    results = pp.imap(square, counting(iter(range(100)), tally), backend=backend)
    assert tally[0] == 0
    assert next(results) == 0
    results.close()  # type: ignore[attr-defined]


def test_chunksize_gives_whole_results(backend: str) -> None:
    assert pp.map(square, range(23), backend=backend, chunksize=5) == [x * x for x in range(23)]


def test_progress_bar_counts_items(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert pp.map(square, range(12), backend=backend, progress=True) == [x * x for x in range(12)]
    err = capsys.readouterr().err
    assert "12/12" in err


def test_progress_false_prints_nothing(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    pp.map(square, range(12), backend=backend, progress=False)
    assert capsys.readouterr().err == ""


# -- errors --------------------------------------------------------------------


def test_first_failure_in_input_order_is_raised_with_its_type(backend: str) -> None:
    with pytest.raises(ValueError, match="bad item 3"):
        pp.map(fail_from_three, range(8), backend=backend)


def test_imap_yields_results_before_the_failure(backend: str) -> None:
    results = pp.imap(fail_from_three, range(8), backend=backend)
    assert [next(results), next(results), next(results)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(results)


def test_imap_unordered_raises_with_its_type(backend: str) -> None:
    with pytest.raises(CustomError):
        list(pp.imap_unordered(fail_on_three, range(8), backend=backend))


def test_raised_exception_carries_the_worker_traceback(backend: str) -> None:
    with pytest.raises(CustomError, match="custom failure for 7") as info:
        pp.map(raise_custom, [7], backend=backend)
    error = info.value
    if backend == "processes":
        cause = error.__cause__
        assert isinstance(cause, pp.RemoteTraceback)
        assert "raise_custom" in cause.tb
        assert "CustomError" in cause.tb
        assert "raise_custom" in str(cause)
    else:
        frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
        assert "raise_custom" in frames


def test_errors_return_puts_the_exception_in_place(backend: str) -> None:
    results = pp.map(fail_on_three, range(6), backend=backend, errors="return")
    assert results[:3] == [0, 1, 2]
    assert results[4:] == [4, 5]
    assert isinstance(results[3], CustomError)
    assert "cursed" in str(results[3])


def test_errors_return_with_imap_unordered(backend: str) -> None:
    pairs = dict(
        pp.imap_unordered(
            fail_on_three, range(6), backend=backend, errors="return", with_index=True
        )
    )
    assert sorted(pairs) == list(range(6))
    assert isinstance(pairs[3], CustomError)


def test_errors_skip_drops_failed_items(backend: str) -> None:
    assert pp.map(fail_on_three, range(6), backend=backend, errors="skip") == [0, 1, 2, 4, 5]


def test_errors_skip_with_imap_unordered(backend: str) -> None:
    results = pp.imap_unordered(fail_from_three, range(6), backend=backend, errors="skip")
    assert sorted(results) == [0, 1, 2]


def test_retries_turn_flaky_items_into_successes(backend: str, tmp_path: Path) -> None:
    fn = functools.partial(flaky, str(tmp_path))
    assert pp.map(fn, range(6), backend=backend, retries=2) == list(range(6))


def test_too_few_retries_still_fail(backend: str, tmp_path: Path) -> None:
    fn = functools.partial(flaky, str(tmp_path))
    results = pp.map(fn, range(4), backend=backend, retries=1, errors="return")
    assert results[0] == 0
    assert results[2] == 2
    assert isinstance(results[1], OSError)
    assert isinstance(results[3], OSError)


def test_retry_on_limits_what_is_retried(backend: str, tmp_path: Path) -> None:
    fn = functools.partial(flaky, str(tmp_path))
    results = pp.map(
        fn, range(2), backend=backend, retries=5, retry_on=(KeyError,), errors="return"
    )
    assert results[0] == 0
    assert isinstance(results[1], OSError)
    assert (tmp_path / "calls-1").read_text() == "."  # tried once, never retried


@pytest.mark.timeout(30)
def test_timeout_fails_the_late_item(parallel_backend: str) -> None:
    # 2 s, not less: an item that lands on the late item's replacement worker must
    # not time out while that fresh worker imports this test module (see the xfail below).
    results = pp.map(nap, [0.0, 10.0, 0.0], backend=parallel_backend, timeout=2, errors="return")
    assert results[0] == 0.0
    assert results[2] == 0.0
    assert isinstance(results[1], pp.ItemTimeoutError)
    assert isinstance(results[1], TimeoutError)


@pytest.mark.timeout(30)
def test_timeout_raises_item_timeout_error(parallel_backend: str) -> None:
    with pytest.raises(pp.ItemTimeoutError):
        pp.map(nap, [10.0], backend=parallel_backend, timeout=0.3)


# -- bad input -----------------------------------------------------------------


def test_non_callable_is_a_type_error(backend: str) -> None:
    with pytest.raises(TypeError, match="callable"):
        pp.map(42, [1], backend=backend)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        pp.imap(42, [1], backend=backend)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        pp.imap_unordered(42, [1], backend=backend)  # type: ignore[arg-type]


def test_missing_iterable_is_a_type_error(backend: str) -> None:
    with pytest.raises(TypeError, match="iterable"):
        pp.map(square, backend=backend)


def test_coroutine_function_on_a_sync_backend_is_a_type_error(backend: str) -> None:
    with pytest.raises(TypeError, match="asyncio"):
        pp.map(async_square, [1, 2], backend=backend)
    with pytest.raises(TypeError, match="asyncio"):
        pp.imap(async_square, [1, 2], backend=backend)


def test_partial_of_a_coroutine_function_is_recognised(backend: str) -> None:
    with pytest.raises(TypeError, match="asyncio"):
        pp.map(functools.partial(async_square), [1], backend=backend)


def test_plain_function_on_the_asyncio_backend_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="coroutine"):
        pp.map(square, [1, 2], backend="asyncio")


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="bogus") as info:
        pp.map(square, [1], backend="bogus")
    for name in ("auto", "serial", "threads", "asyncio", "processes", "dask"):
        assert name in str(info.value)


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2"])
def test_bad_workers_is_a_value_error(workers: object) -> None:
    with pytest.raises(ValueError, match="workers"):
        pp.map(square, [1], backend="threads", workers=workers)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("chunksize", 0),
        ("chunksize", -3),
        ("chunksize", 2.5),
        ("timeout", -1),
        ("timeout", 0),
        ("timeout", "1"),
        ("retries", -1),
        ("errors", "bogus"),
        ("progress", "yes"),
    ],
)
def test_bad_run_option_is_a_value_error(backend: str, option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        pp.map(square, [1], backend=backend, **{option: value})
    with pytest.raises(ValueError, match=option):
        pp.imap(square, [1], backend=backend, **{option: value})


def test_bad_retry_on_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="retry_on"):
        pp.map(square, [1], backend="threads", retry_on=("ValueError",))


def test_timeout_on_the_serial_backend_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="timeout"):
        pp.map(square, [1], backend="serial", timeout=1)
    with pytest.raises(ValueError, match="timeout"):
        pp.imap(square, [1], backend="serial", timeout=1)


def test_unknown_option_is_a_type_error(backend: str) -> None:
    # A misspelt option ("retires=3") must not be silently ignored.
    with pytest.raises(TypeError, match="retires"):
        pp.map(square, [1], backend=backend, retires=3)
    with pytest.raises(TypeError, match="with_index"):
        pp.imap(square, [1], backend=backend, with_index=True)  # only imap_unordered has it


def test_unknown_option_with_auto_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="retires"):
        pp.map(square, [1], retires=3)


def test_bad_input_starts_no_work(tmp_path: Path) -> None:
    # Validation happens at the call, before any item runs.
    with pytest.raises(ValueError, match="errors"):
        pp.imap(flaky, [str(tmp_path)], [1], backend="threads", errors="bogus")
    assert list(tmp_path.iterdir()) == []


# -- warm pools -------------------------------------------------------------------


def test_warm_pools_are_reused(backend: str) -> None:
    assert pp.map(square, range(3), backend=backend, workers=2) == [0, 1, 4]
    assert pp.map(square, range(3), backend=backend, workers=2, errors="skip") == [0, 1, 4]
    assert len(_warm_pools._warm) == 1  # run options don't make a new pool


def test_many_option_sets_keep_a_bounded_number_of_warm_pools(backend: str) -> None:
    # native_threads shapes the workers, so each value keys its own warm pool (of one worker).
    for threads in range(1, _warm_pools.MAX_WARM_POOLS + 3):
        results = pp.map(square, range(5), backend=backend, workers=1, native_threads=threads)
        assert results == [0, 1, 4, 9, 16]
    assert len(_warm_pools._warm) <= _warm_pools.MAX_WARM_POOLS


def test_a_live_imap_survives_warm_pool_eviction(parallel_backend: str) -> None:
    results = pp.imap(square, range(100_000), backend=parallel_backend, workers=1)
    assert next(results) == 0
    for threads in range(2, 3 + _warm_pools.MAX_WARM_POOLS):
        pp.map(square, range(3), backend=parallel_backend, workers=1, native_threads=threads)
    assert sum(1 for _ in results) == 99_999


SLOW_IMPORT_MODULE = """
import time

import powerpool

time.sleep(1.0)  # like a module that imports numpy, torch or pandas


def nap(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not powerpool.should_stop():
        time.sleep(0.01)
    return seconds
"""


@pytest.fixture
def slow_import_nap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[float], float]:
    """``nap`` from a module that takes 1 s to import (the import happens here, once)."""
    name = f"slow_import_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(SLOW_IMPORT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)  # removed again after the test
    nap_fn: Callable[[float], float] = module.nap
    return nap_fn


@pytest.mark.timeout(60)
def test_items_after_a_timeout_run_normally(
    parallel_backend: str,
    slow_import_nap: Callable[[float], float],
) -> None:
    results = pp.map(
        slow_import_nap,
        [10.0, 0.0, 0.0, 0.0],
        backend=parallel_backend,
        workers=1,
        timeout=0.5,
        errors="return",
    )
    assert isinstance(results[0], pp.ItemTimeoutError)
    assert results[1:] == [0.0, 0.0, 0.0]


@pytest.mark.skipif(
    importlib.util.find_spec("powerpool._plan") is None, reason="powerpool._plan not written yet"
)
def test_auto_backend_over_the_module_api(capsys: pytest.CaptureFixture[str]) -> None:
    assert pp.map(square, range(100), explain=True) == [x * x for x in range(100)]
    err = capsys.readouterr().err
    assert "powerpool auto:" in err  # explain=True printed the plan, to stderr
    assert "plan:" in err
    assert list(pp.imap(square, range(30))) == [x * x for x in range(30)]
    pairs = sorted(pp.imap_unordered(square, range(30), with_index=True))
    assert pairs == [(x, x * x) for x in range(30)]
    with pytest.raises(CustomError):
        pp.map(fail_on_three, range(10))
    assert pp.map(fail_on_three, range(6), errors="skip") == [0, 1, 2, 4, 5]

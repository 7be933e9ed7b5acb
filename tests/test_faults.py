"""The failure table (DESIGN.md, "Failure behaviour").

One parametrized table of per-item faults, loky-style: each case runs a map
in which exactly one input misbehaves and asserts the error type, its
message and cause, that every *other* item's result came back, that the
pool keeps working afterwards (a second map on the same pool), and (through
the autouse ``no_leaks`` fixture) that no process or thread leaked. The
table runs on the process engine, on threads and on the Dask test cluster;
a row says what differs on a backend, or why it does not apply there (the
test is skipped with that reason). Faults of the whole process (Ctrl-C, the
parent SIGKILLed) and the process engine's own cases run a child Python
script or the process engine only.

What a task may raise is one policy on every backend (``_backends/_itemloop.py``):
any ``BaseException`` (``sys.exit()``, a ``KeyboardInterrupt`` the function
raised itself, ``GeneratorExit``, a library's own) is that item's error; only
a ``KeyboardInterrupt`` in the caller's own thread (serial, the profiler)
stops the run, as Ctrl-C.

Functions the workers run are in ``fault_helpers`` so that forkserver and
spawn workers can import them by name.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import fault_helpers as fh
import powerpool as pp
from dask_cluster import DaskTestCluster
from powerpool import (
    InitializerError,
    ItemTimeoutError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashedError,
)

pytestmark = pytest.mark.timeout(60)

WORKERS = 2
ITEMS = list(range(8))
"""Eight inputs; the faulty functions misbehave on ``fh.BAD`` only."""

WAIT_S = 15.0
"""Bound on waiting for something a test expects to happen soon (a file, a
process exit): generous for a loaded, shared 2-core machine."""

_HELPERS = ("multiprocessing.forkserver import", "multiprocessing.resource_tracker import")
"""How multiprocessing's own helper processes are started (``python -c ...``)."""


# -- helpers -------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    """Poll ``predicate`` until it is true; False if it never was within the bound."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for an init that never reaps counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


_older: set[int] = set()
"""Processes below this one that predate the running test (a session-wide dask
cluster, another test's stragglers): never counted as the test's workers."""


@pytest.fixture(autouse=True)
def older_processes() -> None:
    """Record what already runs below this process before each test (see ``_older``)."""
    _older.clear()
    _older.update(p.pid for p in psutil.Process().children(recursive=True))


def worker_pids(root: int | None = None) -> set[int]:
    """Live worker processes below ``root`` (this process by default), helpers excluded.

    A worker started by the fork server has the server's command line, so
    helpers are told apart by being ``root``'s own children.
    """
    parent = psutil.Process(root)
    found = set()
    for child in parent.children(recursive=True):
        if root is None and child.pid in _older:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            helper = any(h in " ".join(child.cmdline()) for h in _HELPERS)
            if helper and child.ppid() == parent.pid:
                continue
        except psutil.Error:
            continue
        found.add(child.pid)
    return found


def check_pool_still_works(pool: pp.Pool) -> None:
    """A second map on the same pool succeeds, with its full set of workers."""
    assert pool.map(fh.square, range(20)) == [x * x for x in range(20)]
    assert wait_until(lambda: len(worker_pids()) == WORKERS), worker_pids()


# -- the per-item fault table ------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What the bad item's error must be on one backend."""

    error: type[BaseException]
    """The type the bad item's error must have."""
    message: tuple[str, ...]
    """Substrings that must all appear in ``str(error)``."""
    check: Callable[[BaseException], None] = lambda _: None
    """Extra assertions on the error."""


@dataclass(frozen=True)
class Fault:
    """One row: a map in which the item at ``bad`` fails in a known way.

    ``error``, ``message`` and ``check`` are what the process engine gives;
    ``threads`` and ``dask`` say what those backends give when it differs (an
    :class:`Expect`), or why the case does not apply there (a string: the test
    is skipped with that reason); None means the same as on processes.
    """

    fn: Callable[..., Any]
    error: type[BaseException]
    """The type the bad item's error must have."""
    message: tuple[str, ...]
    """Substrings that must all appear in ``str(error)``."""
    items: list[Any] = field(default_factory=lambda: list(ITEMS))
    bad: int = fh.BAD
    """Index of the failing item in ``items``."""
    expected: Callable[[Any], Any] = fh.square
    """The result every other item must produce."""
    options: dict[str, Any] = field(default_factory=dict)
    """Run options (e.g. ``timeout``)."""
    check: Callable[[BaseException], None] = lambda _: None
    """Extra assertions on the error."""
    threads: Expect | str | None = None
    """On the threads backend: what differs, or why the case does not apply."""
    dask: Expect | str | None = None
    """On a Dask cluster: what differs, or why the case does not apply."""

    def on(self, backend: str) -> Expect:
        """The expectation on ``backend``; skips the test where the case does not apply."""
        other = getattr(self, backend) if backend in ("threads", "dask") else None
        if isinstance(other, str):
            pytest.skip(f"not applicable on {backend}: {other}")
        return other or Expect(self.error, self.message, self.check)


KILLS_THE_CALLER = "it kills the process, and threads share the caller's process"
NOTHING_PICKLED = "nothing is pickled on threads: the item succeeds"
DASK_CRASH = (
    "a dask worker's death fails its whole chunk after dask's own retries "
    "(allowed-failures) and restarts workers of the shared cluster; tested on a "
    "cluster of its own in test_dask.py::test_local_cluster_when_no_address"
)
DASK_TIMEOUT = (
    "the late item's worker is restarted; tested on a cluster of its own in "
    "test_dask.py::test_a_late_item_times_out_and_the_others_complete"
)
THREAD_TIMEOUT = (
    "a thread cannot be killed: the late item would sleep on past the test "
    "(timeouts of threads: test_pool.py, with items that check should_stop)"
)


def _exitcode(code: int) -> Callable[[BaseException], None]:
    def check(error: BaseException) -> None:
        assert isinstance(error, WorkerCrashedError)
        assert error.exitcode == code

    return check


def _remote_cause(error: BaseException) -> None:
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "Traceback" in error.__cause__.tb


def _exit_code(code: int) -> Callable[[BaseException], None]:
    def check(error: BaseException) -> None:
        assert isinstance(error, SystemExit)
        assert error.code == code

    return check


def _exit_code_and_remote_cause(code: int) -> Callable[[BaseException], None]:
    def check(error: BaseException) -> None:
        _exit_code(code)(error)
        _remote_cause(error)

    return check


def _is_timeout(error: BaseException) -> None:
    assert isinstance(error, TimeoutError)


def _unpicklable_args() -> list[Any]:
    items: list[Any] = list(ITEMS)
    items[fh.BAD] = threading.Lock()
    return items


FAULTS = [
    pytest.param(
        Fault(
            fh.segfault_by_signal,
            WorkerCrashedError,
            ("SIGSEGV", "segmentation fault"),
            check=_exitcode(-signal.SIGSEGV),
            threads=KILLS_THE_CALLER,
            dask=DASK_CRASH,
        ),
        id="segfault-signal",
    ),
    pytest.param(
        Fault(
            fh.segfault_by_null_read,
            WorkerCrashedError,
            ("SIGSEGV",),
            check=_exitcode(-signal.SIGSEGV),
            threads=KILLS_THE_CALLER,
            dask=DASK_CRASH,
        ),
        id="segfault-null-read",
    ),
    pytest.param(
        Fault(
            fh.exit_3,
            WorkerCrashedError,
            ("exited with code 3",),
            check=_exitcode(3),
            threads=KILLS_THE_CALLER,
            dask=DASK_CRASH,
        ),
        id="os-exit-3",
    ),
    pytest.param(
        # sys.exit() in a task is the item's error on every backend (the worker
        # lives on), with the worker's traceback where it ran in another process.
        Fault(
            fh.sys_exit_4,
            SystemExit,
            ("4",),
            check=_exit_code_and_remote_cause(4),
            threads=Expect(SystemExit, ("4",), _exit_code(4)),
        ),
        id="sys-exit-4",
    ),
    pytest.param(
        # Not the user's Ctrl-C (signals reach only the main thread; process
        # workers ignore SIGINT): the function raised it, so it is the item's error.
        Fault(
            fh.raise_keyboard_interrupt,
            KeyboardInterrupt,
            ("bad input 3",),
            check=_remote_cause,
            threads=Expect(KeyboardInterrupt, ("bad input 3",)),
        ),
        id="keyboard-interrupt-raised",
    ),
    pytest.param(
        # Any other BaseException (GeneratorExit, asyncio.CancelledError, a
        # library's own) is the item's error too.
        Fault(
            fh.raise_base_exception,
            fh.CustomBaseException,
            ("bad input 3",),
            check=_remote_cause,
            threads=Expect(fh.CustomBaseException, ("bad input 3",)),
        ),
        id="base-exception",
    ),
    pytest.param(
        Fault(
            fh.sigkill_self,
            WorkerCrashedError,
            ("SIGKILL", "out-of-memory"),
            check=_exitcode(-signal.SIGKILL),
            threads=KILLS_THE_CALLER,
            dask=DASK_CRASH,
        ),
        id="sigkill-self",
    ),
    pytest.param(
        Fault(
            fh.hang,
            ItemTimeoutError,
            ("timeout", "killed and replaced"),
            options={"timeout": 1.0},
            check=_is_timeout,
            threads=THREAD_TIMEOUT,
            dask=DASK_TIMEOUT,
        ),
        id="timeout",
    ),
    pytest.param(
        Fault(
            fh.raise_custom,
            fh.CustomError,
            ("bad input 3",),
            check=_remote_cause,
            threads=Expect(fh.CustomError, ("bad input 3",)),
        ),
        id="exception",
    ),
    pytest.param(
        Fault(
            fh.raise_locked,
            SerializationError,
            ("LockedError", "bad input 3"),
            check=_remote_cause,
            threads=Expect(fh.LockedError, ("bad input 3",)),  # never pickled: itself
        ),
        id="exception-holds-lock",
    ),
    pytest.param(
        # cloudpickle can store the lambda: the original exception arrives.
        Fault(
            fh.raise_lambda_holder,
            fh.LambdaError,
            ("bad input 3",),
            check=_remote_cause,
            threads=Expect(fh.LambdaError, ("bad input 3",)),
        ),
        id="exception-holds-lambda",
    ),
    pytest.param(
        Fault(
            fh.raise_two_arg,
            SerializationError,
            ("TwoArgError", "bad input 3"),
            check=_remote_cause,
            threads=Expect(fh.TwoArgError, ("bad input 3",)),
        ),
        id="exception-init-breaks-unpickling",
    ),
    pytest.param(
        Fault(fh.return_lock, SerializationError, ("result", "pickle"), threads=NOTHING_PICKLED),
        id="unpicklable-result",
    ),
    pytest.param(
        Fault(
            fh.identity,
            SerializationError,
            ("arguments of item 3", "pickle"),
            items=_unpicklable_args(),
            expected=lambda x: x,
            threads=NOTHING_PICKLED,
        ),
        id="unpicklable-argument",
    ),
]


FAULT_BACKENDS = ["processes", "threads", "dask"]
"""Where the table runs: each row on each backend, unless the row says why not."""


def fault_pool(
    backend: str, cluster: DaskTestCluster | None, **options: Any
) -> contextlib.AbstractContextManager[pp.Pool]:
    """A pool of ``WORKERS`` workers on ``backend`` (Dask: the session's cluster)."""
    if backend != "dask":
        return pp.Pool(backend, workers=WORKERS, progress=False, **options)
    if cluster is None:
        pytest.skip("distributed is not installed")
    return pp.Pool("dask", address=cluster.address, progress=False, **options)


def check_still_works(pool: pp.Pool, backend: str) -> None:
    """A second map on the same pool succeeds; on processes, with every worker back."""
    if backend == "processes":
        check_pool_still_works(pool)
    else:
        assert pool.map(fh.square, range(20)) == [x * x for x in range(20)]


@pytest.mark.parametrize("backend", FAULT_BACKENDS)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_fails_only_its_item(
    fault: Fault, backend: str, cluster_if_installed: DaskTestCluster | None
) -> None:
    expect = fault.on(backend)
    with fault_pool(backend, cluster_if_installed) as pool:
        # errors="return": the failed item's error takes its place, the rest come back.
        results = pool.map(fault.fn, fault.items, errors="return", **fault.options)
        assert len(results) == len(fault.items)
        for index, (item, result) in enumerate(zip(fault.items, results, strict=True)):
            if index != fault.bad:
                assert result == fault.expected(item), (index, result)
        error = results[fault.bad]
        assert type(error) is expect.error, repr(error)
        for text in expect.message:
            assert text in str(error), (text, str(error))
        expect.check(error)
        check_still_works(pool, backend)

        # errors="raise" (the default): the same error reaches the caller.
        with pytest.raises(expect.error) as raised:
            pool.map(fault.fn, fault.items, **fault.options)
        for text in expect.message:
            assert text in str(raised.value)
        expect.check(raised.value)
        check_still_works(pool, backend)


@pytest.mark.parametrize("backend", FAULT_BACKENDS)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_fails_only_its_future(
    fault: Fault, backend: str, cluster_if_installed: DaskTestCluster | None
) -> None:
    """The same faults through submit(): only that future fails."""
    expect = fault.on(backend)
    with fault_pool(backend, cluster_if_installed, **fault.options) as pool:
        futures = [pool.submit(fault.fn, item) for item in fault.items]
        for index, (item, future) in enumerate(zip(fault.items, futures, strict=True)):
            if index == fault.bad:
                error = future.exception(timeout=WAIT_S)
                assert type(error) is expect.error, repr(error)
                assert error is not None
                expect.check(error)
            else:
                assert future.result(timeout=WAIT_S) == fault.expected(item)
        check_still_works(pool, backend)


@pytest.mark.parametrize("backend", ["serial", "threads"])
def test_keyboard_interrupt_stops_only_in_the_callers_thread(backend: str) -> None:
    """serial runs items in the caller's thread: a KeyboardInterrupt there is the
    user's Ctrl-C and stops the run (even with errors="return"); on a worker
    thread it can only come from the function, and is that item's error."""
    with pp.Pool(backend, workers=WORKERS, progress=False) as pool:
        if backend == "serial":
            with pytest.raises(KeyboardInterrupt):
                pool.map(fh.raise_keyboard_interrupt, ITEMS, errors="return")
        else:
            results = pool.map(fh.raise_keyboard_interrupt, ITEMS, errors="return")
            assert isinstance(results[fh.BAD], KeyboardInterrupt)
        assert pool.map(fh.square, range(5)) == [x * x for x in range(5)]


# -- faults that need more than one row ----------------------------------------------


def test_sigkill_of_a_busy_worker_from_outside(tmp_path: Path) -> None:
    """kill -9 on the worker running an item (what the OOM killer does)."""
    pid_file = tmp_path / "pid"
    killed: list[int] = []

    def killer() -> None:
        if not wait_until(pid_file.exists):
            return
        pid = int(pid_file.read_text())
        assert pid in worker_pids()  # a child of this (the test) process
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
            fn = functools.partial(fh.pid_then_hang, str(pid_file))
            results = pool.map(fn, ITEMS, errors="return")
            check_pool_still_works(pool)
    finally:
        thread.join(WAIT_S)
    assert killed, "the busy worker's pid never appeared"
    error = results[fh.BAD]
    assert isinstance(error, WorkerCrashedError), repr(error)
    assert error.exitcode == -signal.SIGKILL
    assert "SIGKILL" in str(error)
    assert "out-of-memory" in str(error)
    assert str(killed[0]) in str(error)
    assert [r for i, r in enumerate(results) if i != fh.BAD] == [
        x * x for x in ITEMS if x != fh.BAD
    ]


def test_timeout_replaces_only_the_late_worker() -> None:
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        pool.map(fh.square, range(4))
        before = worker_pids()
        assert len(before) == WORKERS
        results = pool.map(fh.hang, ITEMS, timeout=1.0, errors="return")
        assert isinstance(results[fh.BAD], ItemTimeoutError)
        assert isinstance(results[fh.BAD], TimeoutError)
        assert wait_until(lambda: len(worker_pids()) == WORKERS)
        after = worker_pids()
        # Exactly one worker (the late one) was killed and replaced.
        assert len(before & after) == WORKERS - 1, (before, after)


def test_timeout_is_per_item_not_per_chunk() -> None:
    """Chunks that take longer than ``timeout`` in all are fine while each item is in time."""
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        pids = pool.map(fh.pid_after, [0.3] * 8, chunksize=4, timeout=1.0)
        assert set(pids) <= worker_pids()
        assert pool.stats().items_failed == 0


def test_lambda_argument_works_through_cloudpickle() -> None:
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        offset = 10
        calls = [lambda i=i: i + offset for i in range(6)]
        assert pool.map(fh.call_it, calls) == [i + offset for i in range(6)]


def test_unpicklable_function_fails_every_item_not_the_pool() -> None:
    lock = threading.Lock()

    def holds_lock(x: int) -> int:  # a closure over a lock: even cloudpickle refuses
        with lock:
            return x

    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        results = pool.map(holds_lock, ITEMS, errors="return")
        assert all(isinstance(r, SerializationError) for r in results), results
        assert "holds_lock" in str(results[0]) or "lock" in str(results[0])
        with pytest.raises(SerializationError):
            pool.map(holds_lock, ITEMS)
        check_pool_still_works(pool)


def test_function_that_fails_to_unpickle_in_the_worker_fails_its_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A function whose module exists only in this process (its file is gone): fresh
    (forkserver) workers cannot import it; its items fail, the pool keeps working."""
    import importlib
    import shutil

    name = f"vanishing_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)
    (tmp_path / f"{name}.py").unlink()
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
    with pp.Pool("processes", workers=WORKERS, progress=False, start_method="forkserver") as pool:
        results = pool.map(module.double, ITEMS, errors="return")
        assert all(isinstance(r, SerializationError) for r in results), results
        assert "could not be unpickled in the worker" in str(results[0])
        assert name in str(results[0])
        assert pool.map(fh.square, range(20)) == [x * x for x in range(20)]


def test_initializer_error_reaches_every_item_and_the_caller() -> None:
    with pp.Pool(
        "processes", workers=WORKERS, progress=False, initializer=fh.failing_initializer
    ) as pool:
        results = pool.map(fh.square, ITEMS, errors="return")
        assert all(isinstance(r, InitializerError) for r in results), results
        for error in results:
            assert isinstance(error.__cause__, fh.CustomError)
            assert "initializer failed on purpose" in str(error)
        with pytest.raises(InitializerError) as raised:
            pool.map(fh.square, ITEMS)
        assert isinstance(raised.value.__cause__, fh.CustomError)
        future = pool.submit(fh.square, 2)
        assert isinstance(future.exception(timeout=WAIT_S), InitializerError)


def test_initializer_that_kills_its_worker_fails_items_without_churn() -> None:
    """A worker that dies inside the initializer must not be blamed on item 0, nor be
    replaced forever: the pool is broken and every item says why."""
    with pp.Pool(
        "processes", workers=WORKERS, progress=False, initializer=fh.exiting_initializer
    ) as pool:
        results = pool.map(fh.square, ITEMS, errors="return")
        assert all(isinstance(r, InitializerError) for r in results), results
        assert "code 5" in str(results[0])
        # No replacement churn once the pool is known broken.
        assert wait_until(lambda: not worker_pids(), 5), worker_pids()
        time.sleep(0.5)
        assert not worker_pids()


def test_argument_that_fails_to_unpickle_in_the_worker_fails_alone() -> None:
    items: list[Any] = list(ITEMS)
    items[fh.BAD] = fh.make_two_arg_error()
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        results = pool.map(fh.identity, items, errors="return")
        assert isinstance(results[fh.BAD], SerializationError), results
        assert "TwoArgError" in str(results[fh.BAD])
        assert [r for i, r in enumerate(results) if i != fh.BAD] == [
            x for x in ITEMS if x != fh.BAD
        ]
        check_pool_still_works(pool)


@pytest.mark.parametrize(
    "make_bad", [threading.Lock, fh.make_two_arg_error], ids=["unpicklable", "fails-to-unpickle"]
)
def test_bad_arguments_in_multi_item_chunks_fail_alone(make_bad: Callable[[], Any]) -> None:
    """The chunk is split; the core must still get one result per chunk (no lost items)."""
    items: list[Any] = list(range(30))
    bad = {fh.BAD, 25}
    for index in bad:
        items[index] = make_bad()
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        results = pool.map(fh.identity, items, chunksize=10, errors="return")
        assert len(results) == len(items)
        for index, result in enumerate(results):
            if index in bad:
                assert isinstance(result, SerializationError), result
                assert f"item {index}" in str(result)
            else:
                assert result == index
        unordered = list(
            pool.imap_unordered(fh.identity, items, chunksize=10, errors="skip", with_index=True)
        )
        assert sorted(unordered) == [(i, i) for i in range(30) if i not in bad]
        check_pool_still_works(pool)


def test_initializer_time_does_not_count_against_the_item_timeout() -> None:
    with pp.Pool(
        "processes",
        workers=WORKERS,
        progress=False,
        timeout=1.0,
        initializer=fh.slow_initializer,
        initargs=(2.0,),
    ) as pool:
        assert pool.map(fh.square, range(6)) == [x * x for x in range(6)]


def test_retries_turn_a_crashing_item_into_a_success(tmp_path: Path) -> None:
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        fn = functools.partial(fh.flaky, str(tmp_path))
        assert pool.map(fn, ITEMS, retries=1) == [x * x for x in ITEMS]
        stats = pool.stats()
        assert stats.items_retried == 1
        assert stats.items_failed == 0
        assert stats.items_done == len(ITEMS)
        check_pool_still_works(pool)


@pytest.mark.parametrize(
    ("record", "error", "options"),
    [
        (fh.record_then_exit, WorkerCrashedError, {}),
        (fh.record_then_hang, ItemTimeoutError, {"timeout": 1.0}),
    ],
    ids=["crash", "timeout"],
)
def test_fault_in_a_multi_item_chunk_fails_only_its_item(
    tmp_path: Path, record: Callable[..., Any], error: type[Exception], options: dict[str, Any]
) -> None:
    fn = functools.partial(record, str(tmp_path))
    items = list(range(10))
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        results = pool.map(fn, items, chunksize=10, errors="return", **options)
        check_pool_still_works(pool)
    assert isinstance(results[fh.BAD], error), results[fh.BAD]
    assert f"item {fh.BAD}" in str(results[fh.BAD]) or error is WorkerCrashedError
    assert [r for i, r in enumerate(results) if i != fh.BAD] == [
        x * x for x in items if x != fh.BAD
    ]
    runs = {x: len(list(tmp_path.glob(f"run-{x}-*"))) for x in items}
    # Items before the crash finished but their results died with the worker:
    # re-run once. The crashing item ran once. Items after it never ran: once.
    assert runs == {x: 2 if x < fh.BAD else 1 for x in items}, runs


def test_crash_with_keyword_arguments_fails_only_its_future() -> None:
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        futures = [pool.submit(fh.add, x, y=1, scale=2) for x in ITEMS]
        for x, future in zip(ITEMS, futures, strict=True):
            if x == fh.BAD:
                assert isinstance(future.exception(timeout=WAIT_S), WorkerCrashedError)
            else:
                assert future.result(timeout=WAIT_S) == (x + 1) * 2
        assert pool.map(fh.add, [1, 2], [10, 20]) == [11, 22]  # several iterables: f(*args)


def test_an_idle_worker_killed_from_outside_is_replaced() -> None:
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        pool.map(fh.square, range(4))
        victim = next(iter(worker_pids()))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: gone(victim))
        check_pool_still_works(pool)
        assert victim not in worker_pids()


def test_a_worker_killed_before_reading_its_chunk_blames_no_item() -> None:
    """The worker's "item now running" slot must not keep the position of its previous
    chunk: a death before the new chunk starts is nobody's fault (all items re-run)."""
    with pp.Pool("processes", workers=1, progress=False) as pool:
        assert pool.map(fh.square, range(8), chunksize=8) == [x * x for x in range(8)]
        (victim,) = worker_pids()
        os.kill(victim, signal.SIGSTOP)  # idle, and it will not read the next chunk
        # As if it had stopped after sending its results but before clearing its
        # slot (CI once caught it there): the position of its last item remains.
        (backend,) = pool._backends.values()
        backend._status[0] = 7.0  # type: ignore[attr-defined]
        killer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))
        killer.start()
        try:
            results = pool.map(fh.square, range(10), chunksize=10, errors="return")
        finally:
            killer.join(WAIT_S)
        assert results == [x * x for x in range(10)]


def test_many_functions_keep_the_worker_function_caches_in_step() -> None:
    """More distinct functions than the caches hold, then the first ones again."""
    from powerpool._backends._worker import WORKER_FN_CACHE

    functions = [functools.partial(fh.len_plus, bytes(i)) for i in range(WORKER_FN_CACHE + 6)]
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        for i, fn in enumerate(functions):
            assert pool.map(fn, range(4), chunksize=2) == [i + x for x in range(4)]
        for i, fn in enumerate(functions[:8]):
            assert pool.map(fn, range(4), chunksize=2) == [i + x for x in range(4)]


def test_result_that_fails_to_unpickle_in_the_caller_fails_alone() -> None:
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        results = pool.map(fh.return_two_arg_error, ITEMS, chunksize=8, errors="return")
    assert isinstance(results[fh.BAD], SerializationError)
    assert [r for i, r in enumerate(results) if i != fh.BAD] == [
        x * x for x in ITEMS if x != fh.BAD
    ]


@pytest.mark.parametrize("kind", ["imap", "imap_unordered"])
def test_infinite_input_runs_in_bounded_memory(kind: str) -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled = i + 1
            yield i

    chunksize = 10
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        results = getattr(pool, kind)(fh.square, endless(), chunksize=chunksize)
        taken = list(itertools.islice(results, 1000))
        results.close()
        if kind == "imap":
            assert taken == [x * x for x in range(1000)]
        else:
            assert len(taken) == 1000
        # At most a few windows (2 chunks per worker) beyond what was taken.
        window_items = 2 * WORKERS * chunksize
        assert pulled <= 1000 + 3 * window_items, pulled
        check_pool_still_works(pool)


def test_infinite_input_with_adaptive_chunks_stays_bounded() -> None:
    """Without a chunksize the sizer grows chunks; the window still bounds the pull."""
    from powerpool._chunking import MAX_CHUNK_ITEMS

    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled = i + 1
            yield i

    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        results = pool.imap(fh.square, endless())
        taken = list(itertools.islice(results, 20_000))
        results.close()
    assert taken[-1] == 19_999**2
    assert pulled <= 20_000 + 3 * 2 * WORKERS * MAX_CHUNK_ITEMS, pulled


# -- whole-process faults: child scripts ---------------------------------------------------

_CHILD_PRELUDE = """\
import functools, json, os, sys, time
from pathlib import Path

import psutil
import powerpool as pp


def slow(directory, x):
    Path(directory, f"started-{x}-{os.getpid()}").touch()
    time.sleep(60)
    return x


def wait_started(directory, n):
    deadline = time.monotonic() + 30
    while len(list(Path(directory).glob("started-*"))) < n:
        if time.monotonic() > deadline:
            sys.exit("workers never started")
        time.sleep(0.02)
"""


def _read_line(proc: subprocess.Popen[str], timeout_s: float = WAIT_S) -> str:
    """One line of the child's stdout, or fail (never block past the bound)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        _, stderr = proc.communicate(timeout=WAIT_S)
        pytest.fail(f"the child script printed nothing in time; its stderr:\n{stderr}")
    return line


def _start_child(tmp_path: Path, body: str, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD_PRELUDE + textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # our Ctrl-C goes to the child alone, not to pytest
    )


def _kill(proc: subprocess.Popen[str], pids: set[int]) -> None:
    """Leave nothing behind, whatever the test found."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=WAIT_S)


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["pool-context", "pool-forkserver", "module-map"])
def test_ctrl_c_during_a_map_stops_everything_promptly(tmp_path: Path, how: str) -> None:
    body = """
    if __name__ == "__main__":
        directory, how = sys.argv[1], sys.argv[2]
        fn = functools.partial(slow, directory)
        if how.startswith("pool-"):
            method = None if how == "pool-context" else how.removeprefix("pool-")
            with pp.Pool("processes", workers=2, start_method=method) as pool:
                pool.map(fn, range(8))
        else:
            pp.map(fn, range(8), backend="processes", workers=2)
    """
    proc = _start_child(tmp_path, body, how)
    pids: set[int] = set()
    try:
        assert wait_until(lambda: len(list(tmp_path.glob("started-*"))) >= 2), "never started"
        pids = {int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("started-*")}
        pids |= _descendants(proc.pid)
        assert pids
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - sent
        assert proc.returncode in (1, -signal.SIGINT, 128 + signal.SIGINT), stderr
        assert "KeyboardInterrupt" in stderr, stderr
        assert took < 10
        assert wait_until(lambda: all(gone(pid) for pid in pids), 5), [
            pid for pid in pids if not gone(pid)
        ]
    finally:
        _kill(proc, pids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("busy", [True, False], ids=["busy", "idle"])
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_workers_exit_when_the_parent_is_sigkilled(
    tmp_path: Path, start_method: str, busy: bool
) -> None:
    body = """
    if __name__ == "__main__":
        directory, method, busy = sys.argv[1], sys.argv[2], sys.argv[3] == "busy"
        pool = pp.Pool("processes", workers=2, start_method=method)
        pool.map(abs, range(4))  # starts the workers
        if busy:
            futures = [pool.submit(slow, directory, i) for i in range(2)]
            wait_started(directory, 2)
        workers = [p.pid for p in psutil.Process().children(recursive=True)]
        print(json.dumps(workers), flush=True)
        time.sleep(60)
    """
    proc = _start_child(tmp_path, body, start_method, "busy" if busy else "idle")
    pids: set[int] = set()
    try:
        pids = set(json.loads(_read_line(proc)))
        pids |= _descendants(proc.pid)
        assert len(pids) >= 2, pids
        proc.kill()
        proc.communicate(timeout=WAIT_S)
        assert wait_until(lambda: all(gone(pid) for pid in pids), 5), [
            (pid, psutil.Process(pid).cmdline()) for pid in pids if not gone(pid)
        ]
    finally:
        _kill(proc, pids)

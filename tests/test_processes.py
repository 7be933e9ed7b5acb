"""The process engine's own behaviour (faults are in ``test_faults.py``).

What travels to workers and how often, per-worker state, native thread
limits, warm reuse, the start method, cooperative stop, and the lifecycle
calls (``terminate``, ``shutdown(wait=True)``). Worker functions live in
``fault_helpers`` so that forkserver and spawn workers can import them.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy  # noqa: F401 - loaded here so fork workers inherit a sized BLAS pool
import pytest

import fault_helpers as fh
import powerpool as pp
from powerpool._backends import _proc_functions
from powerpool._backends._proc_workers import choose_context
from powerpool._system import usable_cores
from test_faults import (  # older_processes: an autouse fixture
    WAIT_S,
    WORKERS,
    gone,
    older_processes,  # noqa: F401
    wait_until,
    worker_pids,
)

pytestmark = pytest.mark.timeout(60)


# -- what reaches the workers --------------------------------------------------------


def test_lambdas_closures_and_partials_run_in_workers() -> None:
    offset = 7

    def closure(x: int) -> int:
        return x + offset

    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        assert pool.map(lambda x: x * 3, range(10)) == [x * 3 for x in range(10)]
        assert pool.map(closure, range(10)) == [x + offset for x in range(10)]
        fn = functools.partial(fh.len_plus, b"abc")
        assert pool.map(fn, range(10)) == [3 + x for x in range(10)]
        assert pool.submit(lambda: offset).result(timeout=WAIT_S) == offset


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_functions_and_classes_defined_in_main_work(tmp_path: Path, start_method: str) -> None:
    """``__main__``'s functions, classes and exceptions work whatever the start method:
    they travel by value (workers never import the script), and instances come back
    as the caller's own classes."""
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            import powerpool as pp

            def cube(x):
                return x ** 3

            class Box:
                def __init__(self, v):
                    self.v = v

            class Refused(Exception):
                pass

            def boxed(x):
                return Box(x)

            def refuse(x):
                raise Refused(f"no {x}")

            if __name__ == "__main__":
                with pp.Pool("processes", workers=2, start_method=sys.argv[1]) as pool:
                    cubes = pool.map(cube, range(10))
                    # Instances and exceptions of __main__'s classes come back as such.
                    boxes = pool.map(boxed, range(3))
                    assert all(type(b) is Box for b in boxes), boxes
                    errors = pool.map(refuse, range(2), errors="return")
                    assert all(type(e) is Refused for e in errors), errors
                    doubled = pool.map(lambda x: 2 * x, range(3))
                print(json.dumps([cubes, [b.v for b in boxes], doubled]))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), start_method],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    cubes, boxes, doubled = json.loads(done.stdout)
    assert cubes == [x**3 for x in range(10)]
    assert boxes == [0, 1, 2]
    assert doubled == [0, 2, 4]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_an_initializer_in_main_sets_state_the_function_sees(
    tmp_path: Path, start_method: str
) -> None:
    """The per-worker model pattern in a script: initializer and function share the
    script's globals in each worker (by-value copies would each get their own)."""
    script = tmp_path / "model.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import powerpool as pp

            MODEL = None

            def load(factor):
                global MODEL
                MODEL = factor

            def use(x):
                if MODEL is None:
                    raise RuntimeError("model not loaded")
                return x * MODEL

            if __name__ == "__main__":
                with pp.Pool("processes", workers=2, start_method=sys.argv[1],
                             initializer=load, initargs=(3,)) as pool:
                    print(pool.map(use, range(5)))
                print(pp.map(use, range(5), initializer=load, initargs=(4,)))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), start_method],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[0, 3, 6, 9, 12]", "[0, 4, 8, 12, 16]"]


@pytest.mark.timeout(90)
def test_forkserver_workers_start_with_the_callers_heavy_libraries(tmp_path: Path) -> None:
    """The fork server imports the heavy libraries the caller has (numpy here),
    so a worker it forks starts with them instead of importing them for its
    first function (~130 ms per worker on every cold pool)."""
    script = tmp_path / "preloaded.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import numpy
            import powerpool as pp

            def loaded(_):
                return "numpy" in sys.modules  # this function itself needs no numpy

            if __name__ == "__main__":
                with pp.Pool("processes", workers=2, start_method="forkserver") as pool:
                    print(all(pool.map(loaded, range(4), chunksize=1)))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_the_function_is_pickled_once_and_sent_once_per_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """functools.partial(fn, big) is pickled once per map, not once per chunk, and
    ships ``big`` to each worker once: the second map's pickle has the same
    content, which the workers already hold."""
    big = bytes(2_000_000)
    fn = functools.partial(fh.len_plus, big)
    pickled: list[int] = []
    real_dumps = _proc_functions.dumps_function

    def counting_dumps(f: Any) -> bytes:
        blob = real_dumps(f)
        pickled.append(len(blob))
        return blob

    monkeypatch.setattr(_proc_functions, "dumps_function", counting_dumps)
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        pool.map(fh.square, range(4))  # workers up before counting what is sent
        large_sends: list[int] = []
        real_send = Connection.send_bytes

        def counting_send(self: Connection, buf: Any, *args: Any) -> None:
            if len(buf) >= len(big):
                large_sends.append(len(buf))
            real_send(self, buf, *args)

        monkeypatch.setattr(Connection, "send_bytes", counting_send)
        assert pool.map(fn, range(200), chunksize=1) == [len(big) + x for x in range(200)]
        assert pool.map(fn, range(50), chunksize=5) == [len(big) + x for x in range(50)]
    assert len([n for n in pickled if n >= len(big)]) == 2, pickled
    assert 1 <= len(large_sends) <= WORKERS, large_sends


# -- per-worker state ------------------------------------------------------------------


def test_initializer_runs_once_per_worker_and_its_state_is_seen(tmp_path: Path) -> None:
    with pp.Pool(
        "processes",
        workers=WORKERS,
        progress=False,
        initializer=fh.recording_initializer,
        initargs=(str(tmp_path), "ready"),
    ) as pool:
        results = pool.map(fh.read_state, range(60), chunksize=1)
        results += pool.map(fh.read_state, range(60), chunksize=7)
    assert {value for value, _, _ in results} == {"ready"}
    assert {calls for _, calls, _ in results} == {1}  # once per worker, not per item
    pids = {pid for _, _, pid in results}
    assert 1 <= len(pids) <= WORKERS
    assert len(list(tmp_path.glob("init-*"))) == WORKERS  # every worker, exactly once


@pytest.mark.parametrize(
    ("workers", "native_threads", "start_method"),
    [(1, None, "fork"), (2, None, "fork"), (2, 3, "fork"), (2, None, "forkserver")],
)
def test_native_threads_are_limited_in_workers(
    workers: int, native_threads: int | None, start_method: str
) -> None:
    expected = native_threads or max(1, usable_cores() // workers)
    with pp.Pool(
        "processes",
        workers=workers,
        progress=False,
        native_threads=native_threads,
        start_method=start_method,
    ) as pool:
        seen = pool.map(fh.native_threads, range(2 * workers), chunksize=1)
    for env, blas in seen:
        assert env == str(expected)
        assert blas, "threadpoolctl found no BLAS in the worker"
        # OpenBLAS may cap a larger request at its own maximum; never above the limit.
        assert all(1 <= n <= expected for n in blas), blas
        if expected <= usable_cores():
            assert all(n == expected for n in blas), blas


def test_a_cold_start_leaves_no_blas_pool_spinning(tmp_path: Path) -> None:
    """With numpy loaded, a fresh worker capped to its share of BLAS threads burns
    no CPU while its item sleeps, and the caller's BLAS thread count is unchanged.
    Resizing OpenBLAS after a fork re-creates its whole pool, whose threads spin
    ~0.1 s each; where the library exports its count variable the caller is not
    touched either, so it too is idle after the map (elsewhere it pays that
    spin once, for all its workers: see _native_threads.capped_for_fork)."""
    script = tmp_path / "cold.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, time
            import numpy
            from threadpoolctl import threadpool_info
            import powerpool as pp
            from powerpool._backends import _native_threads

            def blas():
                return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

            def idle_cpu(seconds):
                started = time.process_time()
                time.sleep(seconds)
                return time.process_time() - started

            before = blas()
            _native_threads.prepare()
            scanner = _native_threads._scanner
            libraries = scanner.lib_controllers if scanner is not None else []
            respawns = any(_native_threads._respawns(lib) for lib in libraries)
            with pp.Pool("processes", workers=2, progress=False) as pool:
                workers = pool.map(idle_cpu, [0.3, 0.3], chunksize=1)
                caller = idle_cpu(0.3)
            print(json.dumps({"before": before, "after": blas(), "workers": workers,
                              "caller": caller, "respawns": respawns}))
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(out.stdout)
    assert report["after"] == report["before"]
    # Idle means idle: a spinning BLAS pool burns ~0.1 s of CPU per thread here.
    assert max(report["workers"]) < 0.05, report
    if not report["respawns"]:
        assert report["caller"] < 0.05, report


# -- warm reuse and start methods ---------------------------------------------------------


def test_module_level_map_reuses_its_warm_workers() -> None:
    first = pp.map(fh.pid_after, [0.05] * 8, backend="processes", workers=WORKERS)
    workers = worker_pids()
    second = pp.map(fh.pid_after, [0.05] * 8, backend="processes", workers=WORKERS)
    assert set(first) <= workers
    assert set(second) <= workers
    assert worker_pids() == workers  # nobody started or lost in between


def test_start_method_is_fork_only_while_single_threaded() -> None:
    assert choose_context("spawn").get_start_method() == "spawn"
    assert choose_context("forkserver").get_start_method() == "forkserver"
    alone = threading.active_count() == 1
    assert choose_context(None).get_start_method() == ("fork" if alone else "forkserver")
    release = threading.Event()
    other = threading.Thread(target=release.wait, args=(WAIT_S,))
    other.start()
    try:
        # Another thread may hold a lock (logging, an allocator...) that a fork would copy
        # locked forever: never fork now.
        assert choose_context(None).get_start_method() == "forkserver"
    finally:
        release.set()
        other.join(WAIT_S)


# -- cooperative stop and lifecycle -------------------------------------------------------


def test_should_stop_turns_true_in_a_worker_after_cancel(tmp_path: Path) -> None:
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        future = pool.submit(fh.poll_until_stopped, str(tmp_path))
        assert wait_until((tmp_path / "started").exists)
        time.sleep(0.2)  # it is polling now
        pool.cancel()
        polled_s = future.result(timeout=WAIT_S)
        assert 0.2 <= polled_s < WAIT_S, polled_s
        # Work submitted after the cancel is a new epoch: not stopped.
        assert pool.submit(fh.stop_requested, 0).result(timeout=WAIT_S) is False
        assert pool.map(fh.stop_requested, range(4)) == [False] * 4


def test_cancel_from_another_thread_stops_a_running_map(tmp_path: Path) -> None:
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        canceller = threading.Thread(
            target=lambda: wait_until((tmp_path / "started").exists) and pool.cancel()
        )
        canceller.start()
        try:
            started = time.monotonic()
            with pytest.raises(CancelledError):
                pool.map(fh.poll_until_stopped, [str(tmp_path)] * 6)
            assert time.monotonic() - started < WAIT_S
        finally:
            canceller.join(WAIT_S)
        # The workers saw should_stop() and are free again: the pool keeps working.
        assert pool.map(fh.square, range(10)) == [x * x for x in range(10)]


def test_submit_futures_survive_a_crash_of_another_item() -> None:
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        futures = [pool.submit(fh.square, x) for x in range(20)]
        crashing = pool.submit(fh.exit_3, fh.BAD)
        futures += [pool.submit(fh.square, x) for x in range(20, 40)]
        assert [f.result(timeout=WAIT_S) for f in futures] == [x * x for x in range(40)]
        error = crashing.exception(timeout=WAIT_S)
        assert isinstance(error, pp.WorkerCrashedError)
        assert error.exitcode == 3


def test_terminate_kills_busy_workers_and_fails_their_work_promptly(tmp_path: Path) -> None:
    pool = pp.Pool("processes", workers=WORKERS, progress=False)
    map_error: list[BaseException] = []

    def run_map() -> None:
        try:
            pool.map(functools.partial(fh.started_then_hang, str(tmp_path)), [100, 101])
        except BaseException as exc:
            map_error.append(exc)

    try:
        future = pool.submit(fh.started_then_hang, str(tmp_path), 0)
        mapper = threading.Thread(target=run_map)
        mapper.start()
        # One worker runs the future's item, the other a map item.
        assert wait_until(lambda: len(list(tmp_path.glob("started-*"))) >= WORKERS)
        busy = worker_pids()
        assert len(busy) == WORKERS
        started = time.monotonic()
        pool.terminate()
        with pytest.raises((CancelledError, pp.WorkerError)):
            future.result(timeout=10)
        mapper.join(10)
        assert not mapper.is_alive(), "the map still hangs after terminate()"
        assert map_error
        assert isinstance(map_error[0], (CancelledError, pp.WorkerError))
        assert time.monotonic() - started < 10
        assert wait_until(lambda: all(gone(pid) for pid in busy), 5)
        assert pool.state is pp.PoolState.CLOSED
    finally:
        pool.terminate()


def test_shutdown_wait_waits_for_running_work(tmp_path: Path) -> None:
    pool = pp.Pool("processes", workers=WORKERS, progress=False)
    try:
        future = pool.submit(fh.started_then_sleep, str(tmp_path), 1.0)
        queued = [pool.submit(fh.square, x) for x in range(5)]
        assert wait_until((tmp_path / "started").exists)
        pool.shutdown(wait=True)
        assert future.done()
        assert future.result(timeout=0) == 1.0
        assert [f.result(timeout=0) for f in queued] == [x * x for x in range(5)]
        assert not worker_pids()
        with pytest.raises(pp.PoolClosedError):
            pool.submit(fh.square, 1)
    finally:
        pool.terminate()


def test_workers_ignore_sigint_sent_to_them() -> None:
    """Ctrl-C reaches the whole process group; workers leave the decision to the parent."""
    with pp.Pool("processes", workers=WORKERS, progress=False) as pool:
        pool.map(fh.square, range(4))
        pids = worker_pids()
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        assert set(pool.map(fh.pid_of, range(20))) <= pids
        assert worker_pids() == pids


@pytest.mark.timeout(60)
def test_big_arguments_and_results_do_not_deadlock_the_pipes() -> None:
    # A chunk queued behind a running one must never fill the worker's pipe:
    # the dispatcher would block writing it while the worker blocks writing
    # its (big) results back. Big messages wait for an idle worker instead.
    blobs = [bytes([i]) * 300_000 for i in range(12)]
    with pp.Pool("processes", workers=1, progress=False) as pool:
        assert pool.map(bytes.upper, blobs, chunksize=1) == blobs
        assert pool.map(bytes.upper, blobs, chunksize=3) == blobs

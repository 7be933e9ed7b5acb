"""The dask backend against a real scheduler and real worker processes.

Most tests drive :class:`DaskBackend` through the backend protocol (submit
chunks, collect ChunkResults), the way the pool core does. Functions the
workers run are defined at module level here: the workers import this module
by name (the cluster fixture puts ``tests/`` on their ``PYTHONPATH``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from itertools import count, islice
from pathlib import Path
from typing import Any

import pytest

import powerpool as pp
from powerpool._backends import load
from powerpool._backends._base import BackendConfig
from powerpool._chunk import Chunk, ChunkResult, ItemLost
from powerpool._errors import (
    BackendUnavailableError,
    InitializerError,
    PoolClosedError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashedError,
)
from powerpool._stop import should_stop

distributed = pytest.importorskip("distributed")
pytest.importorskip("distributed.diagnostics.plugin")
dask = pytest.importorskip("dask")
with contextlib.suppress(ImportError):  # workers importing this module load BLAS with it
    import numpy  # noqa: F401

from dask_cluster import (  # noqa: E402
    ENV_VAR,
    DaskTestCluster,
    dask_helper_threads,  # noqa: F401  (session fixture used by pytestmark)
    session_cluster_pids,
    wait_until,
)
from powerpool._backends._dask import INSTALL_HINT, DaskBackend  # noqa: E402

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("dask_helper_threads")]

RESULT_TIMEOUT_S = 30.0
"""Bound on waiting for any one chunk: generous for a shared 2-core machine."""


# -- functions the workers run -------------------------------------------------


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0) -> int:
    return x + y


class CustomError(Exception):
    pass


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise CustomError(f"odd input {x}")
    return x


def sleep_polling(seconds: float) -> str:
    """Sleep, but return early once the pool cancels this work."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_stop():
            return "stopped"
        time.sleep(0.01)
    return "done"


def hang_first_time(item: int, marks: str) -> tuple[int, int]:
    """Leave a file saying which process runs ``item``; item 0 hangs on its first run."""
    first = not any(Path(marks).glob(f"{item}-*"))
    Path(marks, f"{item}-{os.getpid()}").touch()
    time.sleep(30.0 if item == 0 and first else 0.1)  # 30 s: killed long before
    return item, os.getpid()


def exit_worker(_x: int) -> None:
    os._exit(13)


_INIT_TAGS: list[str] = []


def record_init(tag: str) -> None:
    _INIT_TAGS.append(tag)


def init_count(tag: str) -> tuple[int, int]:
    return os.getpid(), _INIT_TAGS.count(tag)


def failing_init() -> None:
    raise RuntimeError("no model file")


_LOADS: dict[str, int] = {}


class CountsLoads:
    """Counts how many times this process unpickled a copy with this tag."""

    def __init__(self, tag: str, payload: bytes) -> None:
        self.tag = tag
        self.payload = payload

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _LOADS[self.tag] = _LOADS.get(self.tag, 0) + 1


def loads_of(big: CountsLoads, _x: int) -> tuple[int, int, int]:
    return os.getpid(), _LOADS[big.tag], len(big.payload)


class HoldsLock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class BadInit(Exception):
    def __init__(self, a: int, b: int) -> None:  # unpickling calls BadInit(message): TypeError
        super().__init__(f"{a}+{b}")


def misbehave(x: Any) -> Any:
    """Return ``x``, except for the one input that asks for trouble."""
    if x == "result":
        return threading.Lock()
    if x == "exception":
        raise HoldsLock("cannot travel")
    if x == "bad-init":
        raise BadInit(1, 2)
    return x


_LOCK = threading.Lock()
holds_a_lock = functools.partial(add, y=_LOCK)  # a function value that cannot be pickled


# -- driving the backend through its protocol ----------------------------------


class Collector:
    """The ``deliver`` callback: a queue of ChunkResults."""

    def __init__(self) -> None:
        self.results: queue.SimpleQueue[ChunkResult] = queue.SimpleQueue()

    def __call__(self, result: ChunkResult) -> None:
        self.results.put(result)

    def take(self, n: int) -> list[ChunkResult]:
        return [self.results.get(timeout=RESULT_TIMEOUT_S) for _ in range(n)]


_ids = count()


def chunk_of(fn: Callable[..., Any], xs: list[Any], *, epoch: int = 0, start: int = 0) -> Chunk:
    return Chunk(next(_ids), fn, [(start + i, (x,), {}) for i, x in enumerate(xs)], epoch=epoch)


def by_index(results: list[ChunkResult]) -> dict[int, tuple[bool, Any]]:
    out: dict[int, tuple[bool, Any]] = {}
    for result in results:
        for (index, _args, _kwargs), outcome in zip(
            result.chunk.items, result.outcomes, strict=True
        ):
            out[index] = outcome
    return out


@pytest.fixture
def make_backend() -> Iterator[Callable[..., tuple[DaskBackend, Collector]]]:
    """Build DaskBackends; each is shut down at teardown."""
    made: list[DaskBackend] = []

    def make(**config: Any) -> tuple[DaskBackend, Collector]:
        collector = Collector()
        config.setdefault("workers", 2)
        backend = DaskBackend(BackendConfig(**config), collector)
        made.append(backend)
        return backend, collector

    yield make
    for backend in made:
        backend.shutdown(wait=False)


@pytest.fixture
def on_cluster(
    dask_cluster: DaskTestCluster, make_backend: Callable[..., tuple[DaskBackend, Collector]]
) -> Callable[..., tuple[DaskBackend, Collector]]:
    """Like make_backend, connected to the session cluster by address."""

    def make(**config: Any) -> tuple[DaskBackend, Collector]:
        options = {"address": dask_cluster.address, **config.pop("options", {})}
        return make_backend(options=options, **config)

    return make


# -- tests -----------------------------------------------------------------------


def test_registry_loads_the_dask_backend() -> None:
    assert load("dask") is DaskBackend
    assert DaskBackend.name == "dask"
    assert 0.1 <= DaskBackend.chunk_target_s <= 1.0
    assert DaskBackend.supports_timeout is True


def test_map_by_address_equals_serial(on_cluster: Any) -> None:
    backend, collector = on_cluster()
    assert backend.workers == 2  # two single-threaded workers
    xs = list(range(300))
    chunks = [chunk_of(square, xs[i : i + 25], start=i) for i in range(0, len(xs), 25)]
    for chunk in chunks:
        backend.submit(chunk)
    results = collector.take(len(chunks))
    assert {r.chunk.id for r in results} == {c.id for c in chunks}
    outcomes = by_index(results)
    assert [outcomes[i] for i in range(len(xs))] == [(True, square(x)) for x in xs]
    assert all(r.worker.startswith("tcp://127.0.0.1:") and r.busy_s >= 0 for r in results)


def test_session_cluster_pids_cover_its_workers(dask_cluster: DaskTestCluster) -> None:
    if os.environ.get(ENV_VAR):
        pytest.skip("an external cluster's processes are not ours")
    assert set(dask_cluster.worker_pids().values()) <= session_cluster_pids()


def test_identical_chunks_are_not_merged(on_cluster: Any) -> None:
    backend, collector = on_cluster()
    twins = [Chunk(next(_ids), add, [(0, (1,), {"y": 2})]) for _ in range(3)]
    for chunk in twins:
        backend.submit(chunk)
    results = collector.take(3)
    assert sorted(r.chunk.id for r in results) == sorted(c.id for c in twins)
    assert all(r.outcomes == [(True, 3)] for r in results)


def test_scheduler_file_and_borrowed_client(
    dask_cluster: DaskTestCluster, make_backend: Any
) -> None:
    backend, collector = make_backend(options={"scheduler_file": dask_cluster.scheduler_file})
    backend.submit(chunk_of(square, [3]))
    assert collector.take(1)[0].outcomes == [(True, 9)]

    client = distributed.Client(dask_cluster.address, set_as_default=False)
    try:
        backend, collector = make_backend(options={"client": client})
        backend.submit(chunk_of(square, [4]))
        assert collector.take(1)[0].outcomes == [(True, 16)]
        backend.shutdown()
        assert client.status == "running"  # powerpool never closes a client it was given
        assert client.submit(square, 5).result(timeout=RESULT_TIMEOUT_S) == 25
    finally:
        client.close()


def test_security_option_passes_through(dask_cluster: DaskTestCluster, make_backend: Any) -> None:
    # No TLS on the test cluster: a default Security() shows the option
    # reaches Client without changing how it connects.
    security = distributed.Security()
    backend, collector = make_backend(
        options={"address": dask_cluster.address, "security": security}
    )
    assert backend._client.security is security
    backend.submit(chunk_of(square, [2]))
    assert collector.take(1)[0].outcomes == [(True, 4)]


def test_streaming_from_an_iterator_keeps_a_bounded_window(on_cluster: Any) -> None:
    backend, collector = on_cluster()
    window, per_chunk, wanted = 3, 10, 200
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for x in count():
            pulled += 1
            yield x

    source = endless()
    in_flight = done = most_in_flight = 0
    got: dict[int, tuple[bool, Any]] = {}
    start = 0
    while done < wanted // per_chunk:
        while in_flight < window and start < wanted:
            xs = list(islice(source, per_chunk))
            backend.submit(chunk_of(square, xs, start=start))
            start += per_chunk
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)
        got.update(by_index(collector.take(1)))
        in_flight -= 1
        done += 1
    assert most_in_flight <= window
    assert pulled <= wanted + 1  # nothing read ahead beyond what was submitted
    assert [got[i] for i in range(wanted)] == [(True, x * x) for x in range(wanted)]


def test_errors_keep_type_and_remote_traceback(on_cluster: Any) -> None:
    backend, collector = on_cluster()
    backend.submit(chunk_of(fail_on_odd, [0, 1, 2, 3]))
    (result,) = collector.take(1)
    assert [ok for ok, _ in result.outcomes] == [True, False, True, False]
    err = result.outcomes[1][1]
    assert type(err) is CustomError
    assert str(err) == "odd input 1"
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "fail_on_odd" in err.__cause__.tb
    assert 'raise CustomError(f"odd input {x}")' in err.__cause__.tb
    assert result.outcomes[3][1] is not err  # one exception object per item


@pytest.mark.parametrize(
    ("fn", "arg", "expected"),
    [
        pytest.param(misbehave, threading.Lock(), "arguments of item 1", id="argument"),
        pytest.param(misbehave, "result", "could not be pickled", id="result"),
        pytest.param(misbehave, "exception", "HoldsLock: cannot travel", id="exception"),
        pytest.param(misbehave, "bad-init", "BadInit", id="exception-bad-init"),
        pytest.param(holds_a_lock, 1, "could not be pickled", id="function"),
    ],
)
def test_unpicklable_values_fail_with_serialization_error(
    on_cluster: Any, fn: Callable[..., Any], arg: Any, expected: str, request: Any
) -> None:
    backend, collector = on_cluster()
    whole_chunk = request.node.callspec.id == "function"
    backend.submit(Chunk(next(_ids), fn, [(0, (2,), {}), (1, (arg,), {}), (2, (3,), {})]))
    (result,) = collector.take(1)
    assert len(result.outcomes) == 3
    ok, err = result.outcomes[1]
    assert not ok
    assert isinstance(err, SerializationError)
    assert expected in str(err)
    if whole_chunk:  # no item can run without the function
        assert not any(ok for ok, _ in result.outcomes)
    else:  # the others still ran
        assert result.outcomes[0] == (True, 2)
        assert result.outcomes[2] == (True, 3)


def test_cancel_stops_the_clusters_tasks(dask_cluster: DaskTestCluster, on_cluster: Any) -> None:
    backend, collector = on_cluster()
    # Two long items occupy both workers, a third waits in the queue; the
    # fourth belongs to a later epoch and must survive cancel(0).
    doomed = [chunk_of(sleep_polling, [40.0], epoch=0) for _ in range(3)]
    survivor = chunk_of(sleep_polling, [0.05], epoch=1)
    for chunk in [*doomed, survivor]:
        backend.submit(chunk)
    wait_until(
        lambda: (
            len(dask_cluster.client.processing()) == 2
            and all(dask_cluster.client.processing().values())
        ),
        RESULT_TIMEOUT_S,
        "both workers to start a long item",
    )
    cancelled_at = time.monotonic()
    backend.cancel(0)
    results = {r.chunk.id: r for r in collector.take(4)}
    for chunk in doomed:
        (outcome,) = results[chunk.id].outcomes
        assert not outcome[0]
        assert isinstance(outcome[1], CancelledError)
    # The survivor needs a free worker: it gets one only because the running
    # items saw should_stop() and returned (they would sleep for 40 s).
    assert results[survivor.id].outcomes == [(True, "done")]
    assert time.monotonic() - cancelled_at < 20.0
    wait_until(
        lambda: not dask_cluster.scheduler_keys(backend._token),
        RESULT_TIMEOUT_S,
        "the scheduler to forget the cancelled tasks",
    )


def test_a_worker_killed_mid_run_is_replaced_and_its_items_rerun(
    make_backend: Any, tmp_path: Path
) -> None:
    # A cluster of its own: the worker the nanny starts in place of the
    # killed one must be gone by the end of the test, with the cluster.
    with dask.config.set({"temporary-directory": str(tmp_path)}):  # dask's scratch space
        backend, collector = make_backend(workers=2)
    marks = tmp_path / "marks"
    marks.mkdir()
    n = 8
    for i in range(n):  # item 0 hangs on its first run, until we kill its worker
        backend.submit(Chunk(next(_ids), hang_first_time, [(i, (i, str(marks)), {})]))
    wait_until(lambda: any(marks.glob("0-*")), RESULT_TIMEOUT_S, "item 0 to start")
    (first_run,) = marks.glob("0-*")
    victim_pid = int(first_run.name.split("-")[1])
    os.kill(victim_pid, signal.SIGKILL)

    outcomes = by_index(collector.take(n))
    assert sorted(outcomes) == list(range(n))
    assert all(ok for ok, _ in outcomes.values()), outcomes
    runs_of_item_0 = sorted(int(m.name.split("-")[1]) for m in marks.glob("0-*"))
    assert len(runs_of_item_0) == 2  # dask ran it again, on a live worker
    assert outcomes[0] == (True, (0, next(p for p in runs_of_item_0 if p != victim_pid)))


def test_initializer_runs_once_per_worker(dask_cluster: DaskTestCluster, on_cluster: Any) -> None:
    tag = f"init-{time.monotonic_ns()}"
    backend, collector = on_cluster(initializer=record_init, initargs=(tag,))
    chunks = [Chunk(next(_ids), init_count, [(i, (tag,), {})]) for i in range(12)]
    for chunk in chunks:
        backend.submit(chunk)
    outcomes = by_index(collector.take(len(chunks)))
    seen = [value for ok, value in outcomes.values() if ok]
    assert len(seen) == len(chunks)
    assert {calls for _pid, calls in seen} == {1}
    assert {pid for pid, _ in seen} <= set(dask_cluster.worker_pids().values())


def blas_threads(_x: int) -> set[int]:
    from threadpoolctl import threadpool_info

    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_native_threads_caps_blas_in_the_workers(on_cluster: Any) -> None:
    pytest.importorskip("numpy")  # the workers load it with this module: BLAS is there
    backend, collector = on_cluster(native_threads=2)
    backend.submit(chunk_of(blas_threads, [0]))
    assert collector.take(1)[0].outcomes == [(True, {2})]
    backend, collector = on_cluster()  # no cap: dask's own default, one thread
    backend.submit(chunk_of(blas_threads, [0]))
    assert collector.take(1)[0].outcomes == [(True, {1})]


def test_initializer_failure_reaches_the_caller(on_cluster: Any) -> None:
    backend, collector = on_cluster(initializer=failing_init)
    backend.submit(chunk_of(square, [1, 2]))
    (result,) = collector.take(1)
    for ok, err in result.outcomes:
        assert not ok
        assert isinstance(err, InitializerError)
        assert type(err.__cause__) is RuntimeError
        assert str(err.__cause__) == "no model file"
        assert isinstance(err.__cause__.__cause__, RemoteTraceback)
        assert "failing_init" in err.__cause__.__cause__.tb


def test_a_partials_big_argument_ships_once_per_worker(on_cluster: Any) -> None:
    backend, collector = on_cluster()
    big = CountsLoads(f"big-{time.monotonic_ns()}", b"x" * 2_000_000)
    fn = functools.partial(loads_of, big)
    chunks = [Chunk(next(_ids), fn, [(i, (i,), {})]) for i in range(10)]
    for chunk in chunks:
        backend.submit(chunk)
    seen = [value for ok, value in by_index(collector.take(len(chunks))).values() if ok]
    assert len(seen) == len(chunks)
    assert {loads for _pid, loads, _size in seen} == {1}  # unpickled once in each process
    assert {size for _pid, _loads, size in seen} == {2_000_000}


def test_shutdown_is_idempotent_and_submit_after_it_raises(on_cluster: Any) -> None:
    backend, _collector = on_cluster()
    backend.shutdown()
    backend.shutdown()
    with pytest.raises(PoolClosedError):
        backend.submit(chunk_of(square, [1]))


def test_shutdown_without_wait_reports_in_flight_chunks_cancelled(on_cluster: Any) -> None:
    backend, collector = on_cluster()
    backend.submit(chunk_of(sleep_polling, [40.0]))
    backend.shutdown(wait=False)
    (result,) = collector.take(1)
    assert isinstance(result.outcomes[0][1], CancelledError)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"adress": "tcp://x:1"}, "unknown dask option"),
        ({"address": "tcp://x:1", "scheduler_file": "f"}, "at most one"),
        ({"address": "tcp://x:1", "cluster_kwargs": {"n_workers": 1}}, "LocalCluster"),
    ],
)
def test_bad_options_are_rejected_before_connecting(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DaskBackend(BackendConfig(workers=1, options=options), Collector())


def test_missing_distributed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    with pytest.raises(BackendUnavailableError) as info:
        DaskBackend(BackendConfig(workers=1), Collector())
    assert INSTALL_HINT == 'pip install "powerpool[dask]"'
    assert INSTALL_HINT in str(info.value)
    assert isinstance(info.value, ImportError)


def test_importing_the_backend_module_does_not_import_distributed() -> None:
    code = "import sys; import powerpool._backends._dask; sys.exit('distributed' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=RESULT_TIMEOUT_S)


def test_local_cluster_when_no_address(make_backend: Any, tmp_path: Path) -> None:
    # allowed-failures=0: the first worker death is final (KilledWorker), so
    # the crash below costs one worker restart, not four.
    with dask.config.set(
        {"distributed.scheduler.allowed-failures": 0, "temporary-directory": str(tmp_path)}
    ):
        backend, collector = make_backend(workers=2)
    assert backend._cluster is not None
    assert len(backend._client.nthreads()) == 2
    assert set(backend._client.nthreads().values()) == {1}
    backend.submit(chunk_of(square, [1, 2, 3]))
    assert collector.take(1)[0].outcomes == [(True, 1), (True, 4), (True, 9)]

    backend.submit(chunk_of(exit_worker, [0, 1]))
    (result,) = collector.take(1)
    for ok, err in result.outcomes:
        assert not ok
        assert isinstance(err, WorkerCrashedError)
        assert "died" in str(err)
    cluster = backend._cluster
    backend.shutdown()
    assert cluster.status.name == "closed"
    assert backend._client.status == "closed"


def die_on_rerun(marks: str, x: int) -> int:
    """Succeed on the first run; kill the worker on any later one (a recompute)."""
    mark = Path(marks, str(x))
    if mark.exists():
        os._exit(13)
    mark.touch()
    return x


class KillHolderOnce(distributed.diagnostics.plugin.SchedulerPlugin):  # type: ignore[misc]
    """Scheduler plugin: SIGKILL the worker that holds a key's result, once.

    It runs inside the scheduler as the key turns "memory", before the
    client hears of it: the client's fetch then finds the worker gone, and
    the scheduler must compute the result again.
    """

    def __init__(self, contains: str, pids: dict[str, int]) -> None:
        self.contains = contains
        self.pids = pids
        self.killed: list[int] = []

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish != "memory" or self.contains not in str(key) or self.killed:
            return
        holder = kwargs.get("worker")
        pid = self.pids.get(str(holder)) if holder else None
        if pid is not None:
            self.killed.append(pid)
            os.kill(pid, signal.SIGKILL)


def test_a_lost_result_whose_recompute_kills_its_worker_fails_the_item(
    make_backend: Any, tmp_path: Path
) -> None:
    # allowed-failures=0: the recompute's worker death is final (KilledWorker).
    with dask.config.set(
        {"distributed.scheduler.allowed-failures": 0, "temporary-directory": str(tmp_path)}
    ):
        backend, collector = make_backend(workers=2)
    marks = tmp_path / "marks"
    marks.mkdir()
    plugin = KillHolderOnce(f"-{backend._token}-", backend._client.run(os.getpid))
    backend._cluster.scheduler.add_plugin(plugin, name="kill-holder-once")
    fn = functools.partial(die_on_rerun, str(marks))
    backend.submit(Chunk(next(_ids), fn, [(0, (7,), {})]))
    (result,) = collector.take(1)  # bounded: never a hang
    assert plugin.killed  # the result really was lost after it was computed
    ((ok, err),) = result.outcomes
    assert not ok
    assert isinstance(err, WorkerCrashedError)
    assert "died" in str(err)


def test_workers_follow_the_cluster_as_it_grows(make_backend: Any, tmp_path: Path) -> None:
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        backend, collector = make_backend(
            workers=1, options={"cluster_kwargs": {"processes": False}}
        )
    assert backend.workers == 1
    backend._cluster.scale(3)
    backend._client.wait_for_workers(3, timeout=RESULT_TIMEOUT_S)

    def grown() -> bool:
        # Results arriving make the backend read the thread count again.
        backend.submit(chunk_of(square, [2]))
        assert collector.take(1)[0].outcomes == [(True, 4)]
        return backend.workers == 3

    wait_until(grown, RESULT_TIMEOUT_S, "the backend to see the new workers")


def test_shipped_box_can_be_copied_again_after_loading() -> None:
    # _Shipped drops its bytes once loaded but can still be copied on.
    from powerpool._backends._dask_worker import _dumps, _Shipped

    box = pickle.loads(pickle.dumps(_Shipped(_dumps(square), "t")))
    assert box.load() is square
    again = pickle.loads(pickle.dumps(box))
    assert again.load() is square


# -- end to end: the public API on the session cluster ---------------------------


def flaky(marker_dir: str, x: int) -> int:
    """Odd items fail their first call (the call count lives in a file)."""
    calls = Path(marker_dir) / f"calls-{x}"
    with calls.open("a") as f:
        f.write(".")
    if x % 2 and calls.stat().st_size == 1:
        raise OSError(f"transient failure for {x}")
    return x


def test_powerpool_map_on_the_cluster_equals_serial(dask_cluster: DaskTestCluster) -> None:
    xs = list(range(500))
    assert pp.map(square, xs, backend="dask", address=dask_cluster.address) == [
        square(x) for x in xs
    ]


def test_powerpool_imap_streams_an_endless_iterator(dask_cluster: DaskTestCluster) -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for x in count():
            pulled += 1
            yield x

    results = pp.imap(square, endless(), backend="dask", address=dask_cluster.address, chunksize=5)
    assert list(islice(results, 60)) == [x * x for x in range(60)]
    # The window is 2 chunks per worker: 2 workers x 2 chunks x 5 items ahead,
    # plus what the ordered results hold; far from unbounded.
    assert pulled <= 60 + 10 * 5
    results.close()  # type: ignore[attr-defined]


def test_powerpool_errors_keep_type_and_retries_cure_flaky_items(
    dask_cluster: DaskTestCluster, tmp_path: Path
) -> None:
    with pytest.raises(CustomError, match="odd input 1") as info:
        pp.map(fail_on_odd, range(4), backend="dask", address=dask_cluster.address)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on_odd" in info.value.__cause__.tb

    fn = functools.partial(flaky, str(tmp_path))
    assert pp.map(fn, range(6), backend="dask", address=dask_cluster.address, retries=1) == list(
        range(6)
    )
    assert (tmp_path / "calls-1").read_text() == ".."  # failed once, retried once
    assert (tmp_path / "calls-2").read_text() == "."


def test_pool_imap_unordered_and_submit_on_the_cluster(dask_cluster: DaskTestCluster) -> None:
    with pp.Pool("dask", address=dask_cluster.address) as pool:
        pairs = dict(pool.imap_unordered(square, range(40), with_index=True))
        assert pairs == {i: i * i for i in range(40)}
        assert pool.submit(add, 2, y=3).result(timeout=RESULT_TIMEOUT_S) == 5


def test_pool_cancel_cancels_the_clusters_tasks(dask_cluster: DaskTestCluster) -> None:
    with pp.Pool("dask", address=dask_cluster.address, chunksize=1) as pool:
        outcome: list[BaseException] = []

        def consume() -> None:
            try:
                pool.map(sleep_polling, [40.0] * 4)
            except BaseException as exc:  # the test inspects it
                outcome.append(exc)

        consumer = threading.Thread(target=consume)
        consumer.start()
        wait_until(
            lambda: sum(map(len, dask_cluster.client.processing().values())) >= 2,
            RESULT_TIMEOUT_S,
            "the long items to start",
        )
        pool.cancel()
        consumer.join(timeout=RESULT_TIMEOUT_S)
        assert not consumer.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], CancelledError)
        wait_until(
            lambda: not dask_cluster.scheduler_keys("powerpool-sleep_polling"),
            RESULT_TIMEOUT_S,
            "the scheduler to drop the cancelled tasks",
        )
        # The pool stays usable, and the workers are free again at once.
        assert pool.map(square, range(4)) == [0, 1, 4, 9]


def sleep_on_zero(x: int) -> int:
    if x == 0:
        time.sleep(30.0)  # abandoned after 1 s; its worker is restarted
    return x * 10


def test_a_late_item_times_out_and_the_others_complete(tmp_path: Path) -> None:
    # A LocalCluster of its own (nanny-run worker processes): the worker that
    # replaces the restarted one must be gone by the end of the test.
    with (
        dask.config.set({"temporary-directory": str(tmp_path)}),
        pp.Pool("dask", workers=2, timeout=1.0, errors="return") as pool,
    ):
        pool.map(square, range(2))  # the cluster is up: time the map alone
        (backend,) = pool._backends.values()
        client = backend._client  # type: ignore[attr-defined]
        workers_before = set(client.nthreads())
        started = time.monotonic()
        out = pool.map(sleep_on_zero, range(10))
        took = time.monotonic() - started
        assert isinstance(out[0], pp.ItemTimeoutError)
        assert "restarted" in str(out[0])
        assert out[1:] == [x * 10 for x in range(1, 10)]
        assert took < 25.0  # not the 30 s the late item asked for

        def restarted() -> bool:
            now = set(client.nthreads())
            return len(now) == 2 and now != workers_before

        # The late item's thread ends with its worker process; a new one joins.
        wait_until(restarted, RESULT_TIMEOUT_S, "the late item's worker to be restarted")
        assert pool.map(square, range(20)) == [x * x for x in range(20)]


def test_a_late_item_on_a_worker_without_nanny_is_abandoned(make_backend: Any) -> None:
    backend, collector = make_backend(workers=2, options={"cluster_kwargs": {"processes": False}})
    chunk = Chunk(
        next(_ids), sleep_polling, [(i, (s,), {}) for i, s in enumerate([0.0, 30.0, 0.0])]
    )
    chunk.timeout_s = 0.5
    backend.submit(chunk)
    (result,) = collector.take(1)
    done, late, lost = result.outcomes
    assert done == (True, "done")
    assert not late[0]
    assert isinstance(late[1], pp.ItemTimeoutError)
    assert "abandoned" in str(late[1])
    assert not lost[0]
    assert isinstance(lost[1], ItemLost)  # never ran: the core re-queues it
    # The abandoned item sees should_stop() and ends: the worker thread is free.
    backend.submit(chunk_of(square, [3]))
    assert collector.take(1)[0].outcomes == [(True, 9)]


@pytest.mark.parametrize("how", ["--address", "--scheduler-file"])
def test_command_line_runs_on_the_cluster(
    dask_cluster: DaskTestCluster, tmp_path: Path, how: str
) -> None:
    where = dask_cluster.address if how == "--address" else dask_cluster.scheduler_file
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f"{x}\n" for x in range(20)))
    proc = subprocess.run(
        [
            sys.executable, "-m", "powerpool", "run", "math:factorial", str(source),
            how, where, "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=RESULT_TIMEOUT_S * 2,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["index"], r["result"]) for r in lines] == [(x, math.factorial(x)) for x in range(20)]


def test_bench_and_profile_take_the_cluster(dask_cluster: DaskTestCluster, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f"{x}\n" for x in range(8)))
    cluster = ["--scheduler-file", dask_cluster.scheduler_file]
    bench = subprocess.run(
        [sys.executable, "-m", "powerpool", "bench", "math:factorial", str(source),
         "--backends", "serial", "--workers", "2", *cluster],
        capture_output=True, text=True, timeout=RESULT_TIMEOUT_S * 2, check=False,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    assert any(line.split()[:1] == ["dask"] for line in bench.stdout.splitlines()), bench.stdout
    profile = subprocess.run(
        [sys.executable, "-m", "powerpool", "profile", "math:factorial", str(source),
         "--no-hotspots", *cluster],
        capture_output=True, text=True, timeout=RESULT_TIMEOUT_S * 2, check=False,
    )  # fmt: skip
    assert profile.returncode == 0, profile.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "powerpool", "run", "math:factorial", str(source),
         "--scheduler-file", str(tmp_path / "nope.json")],
        capture_output=True, text=True, timeout=RESULT_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert missing.returncode != 0
    assert "no scheduler file" in missing.stderr


# -- worker limits (issue: big data) -------------------------------------------------


@pytest.mark.timeout(120)
def test_max_worker_memory_becomes_the_local_clusters_memory_limit() -> None:
    import fault_helpers as fh

    with pp.Pool("dask", workers=1, max_worker_memory=700_000_000, progress=False) as pool:
        assert pool.map(fh.dask_memory_limit, [0]) == [700_000_000]

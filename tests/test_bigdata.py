"""Large data through the process engine: shared-memory buffers, and no leaks.

Arguments and results of ``_shm.OUT_OF_BAND_BYTES`` or more travel as
anonymous shared memory (memfd) whose descriptors are passed over the
workers' pipes. These tests check what arrives (types, values, read-only
by default), that a run writes a shared object once, and that no segment
outlives its users: not in ``/dev/shm``, not as an open descriptor, after a
clean run, a worker crash, Ctrl-C or a SIGKILLed parent.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fault_helpers as fh
import powerpool as pp
from powerpool._backends import _shm, _transfer
from test_faults import WAIT_S, _descendants, _kill, _start_child, gone, wait_until

pytestmark = pytest.mark.timeout(60)

BIG = 400_000
"""Float64 elements of a "large" array: 3.2 MB, well above the threshold."""


def _memfds(pid: int | str = "self", maps: bool = False) -> list[str]:
    """powerpool's shared-memory segments a process holds open (or, with
    ``maps``, has mapped)."""
    if maps:
        path = Path(f"/proc/{pid}/maps")
        text = path.read_text() if path.exists() else ""
        return [line for line in text.splitlines() if "memfd:powerpool" in line]
    found = []
    directory = Path(f"/proc/{pid}/fd")
    for fd in directory.iterdir() if directory.exists() else []:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "powerpool" in target and ("memfd" in target or "/dev/shm" in target):
            found.append(target)
    return found


def _dev_shm() -> set[str]:
    """Named shared memory in /dev/shm, semaphores left out: any multiprocessing
    program on the machine (other test runs) makes and drops those at any time."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}


def test_large_arguments_arrive_read_only_and_equal() -> None:
    a = np.arange(BIG, dtype=float)
    with pp.Pool("processes", workers=2, progress=False) as pool:
        out = pool.map(fh.array_info, [a] * 6)
        assert out == [(float(a.sum()), False, "ndarray")] * 6
        with pytest.raises(ValueError, match="read-only"):
            pool.map(fh.write_first, [a])
    assert a[0] == 0.0
    assert not _memfds()


def test_writable_arguments_are_copy_on_write() -> None:
    a = np.arange(BIG, dtype=float)
    with pp.Pool("processes", workers=2, progress=False, writable_arguments=True) as pool:
        assert pool.map(fh.write_first, [a] * 4) == [-1.0] * 4
        assert pool.map(fh.array_info, [a])[0][1] is True
    assert a[0] == 0.0  # the caller's array never changes


@pytest.mark.parametrize(
    "value",
    [bytes(BIG * 8), bytearray(BIG * 8), np.ones((700, 700)), np.ones(BIG)[::2]],
    ids=["bytes", "bytearray", "2d-array", "strided-array"],
)
def test_large_values_keep_their_type_both_ways(value: object) -> None:
    with pp.Pool("processes", workers=2, progress=False) as pool:
        back = pool.map(fh.same, [value] * 3)
    for result in back:
        assert type(result) is type(value)
        if isinstance(value, np.ndarray):
            assert np.array_equal(result, value)
            # Contiguous: the argument came back as it was in the worker,
            # read-only; strided ones travel as a (copied) bytes object.
            assert result.flags.writeable is not value.flags.c_contiguous
        else:
            assert result == value
    del back
    assert not _memfds()


def test_large_results_are_shared_memory_and_writable() -> None:
    with pp.Pool("processes", workers=2, progress=False) as pool:
        results = pool.map(np.ones, [BIG] * 4)
        assert all(r.sum() == BIG and r.flags.writeable for r in results)
        assert len(_memfds()) == 0  # mapped, descriptors already closed
        assert len(_memfds(maps=True)) == 4
        results[0][:] = 2.0
        assert results[1].sum() == BIG  # each result its own memory
        del results
        assert not _memfds(maps=True)  # unmapped with the last array


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Pids of the processes that create a segment, from now on (this test's
    process, and workers forked after it)."""
    pids: list[int] = []
    real = _shm._anonymous_file

    def counting() -> int:
        pids.append(os.getpid())
        return real()

    monkeypatch.setattr(_shm, "_anonymous_file", counting)
    return pids


def test_one_object_is_written_once_per_run(created: list[int]) -> None:
    a = np.arange(BIG, dtype=float)
    with pp.Pool("processes", workers=2, progress=False) as pool:
        pool.map(fh.array_info, [a] * 20, chunksize=1)
        mine = [pid for pid in created if pid == os.getpid()]
        assert len(mine) == 1, created
        pool.map(fh.array_info, [a] * 20, chunksize=1)  # a new run: written again
        mine = [pid for pid in created if pid == os.getpid()]
        assert len(mine) == 2
    assert not _memfds()


def test_small_values_stay_in_band() -> None:
    packed = _shm.pack([np.ones(10), b"x" * 1000])
    assert packed.table is None
    assert not packed.segments


def test_a_worker_crash_leaks_no_segment() -> None:
    before = _dev_shm()
    arrays = [np.full(BIG, float(i)) for i in range(6)]
    with pp.Pool("processes", workers=2, progress=False) as pool:
        out = pool.map(fh.big_then_crash, arrays, errors="return", chunksize=1)
    assert isinstance(out[fh.BAD], pp.WorkerCrashedError)
    assert [v for i, v in enumerate(out) if i != fh.BAD] == [0, 1, 2, 4, 5]
    del out, arrays
    assert not _memfds()
    assert _dev_shm() <= before


_LEAK_CHILD = """
import numpy as np


def hold(directory, a):
    Path(directory, f"started-{os.getpid()}").touch()
    time.sleep(60)
    return float(a.sum())


if __name__ == "__main__":
    directory = sys.argv[1]
    a = np.ones(400_000)
    with pp.Pool("processes", workers=2) as pool:
        pool.map(functools.partial(hold, directory), [a] * 4, chunksize=1)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_no_segment_outlives_an_interrupted_or_killed_parent(tmp_path: Path, how: str) -> None:
    before = _dev_shm()
    proc = _start_child(tmp_path, _LEAK_CHILD)
    pids: set[int] = set()
    try:
        assert wait_until(lambda: len(list(tmp_path.glob("started-*"))) >= 2), "never started"
        pids = {int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("started-*")}
        pids |= _descendants(proc.pid)
        # While it runs, the segment exists only as descriptors and mappings.
        assert _memfds(proc.pid), "the argument did not travel through shared memory"
        assert _dev_shm() <= before
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            proc.kill()
        proc.communicate(timeout=WAIT_S)
        assert wait_until(lambda: all(gone(pid) for pid in pids), 10)
        # Every holder is gone, so the kernel has freed the memory; nothing has a name.
        assert _dev_shm() <= before
    finally:
        _kill(proc, pids)


# -- bytes, not only items, bound the window --------------------------------------


@pytest.mark.parametrize("name", ["threads", "processes"])
def test_imap_of_big_results_keeps_memory_bounded_in_bytes(name: str) -> None:
    import itertools
    import threading
    import time

    import psutil

    me = psutil.Process()
    peak = [me.memory_info().rss]
    base = peak[0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pp.Pool(name, workers=2, progress=False) as pool:
            for i, result in enumerate(pool.imap(fh.megabyte, itertools.count())):
                assert len(result) == 1_000_000
                if i == 399:
                    break
    finally:
        done.set()
        watcher.join()
    # Before byte-bounded chunks: 2.4-2.8 GB (chunks of ~600 results).
    assert peak[0] - base <= 400e6, (peak[0] - base) / 1e6


# -- worker recycling and out-of-memory deaths ------------------------------------


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_max_tasks_per_child_replaces_workers(start_method: str) -> None:
    with pp.Pool(
        "processes", workers=2, max_tasks_per_child=2, start_method=start_method, progress=False
    ) as pool:
        pids = pool.map(fh.pid_of, range(20))
    assert len(pids) == 20
    assert len(set(pids)) >= 10
    assert max(pids.count(pid) for pid in set(pids)) <= 2


def test_max_worker_memory_retires_leaking_workers_before_the_limit() -> None:
    limit = 200_000_000
    # forkserver: workers start small, whatever this test process has grown to.
    with pp.Pool(
        "processes",
        workers=2,
        max_worker_memory=limit,
        start_method="forkserver",
        progress=False,
    ) as pool:
        out = pool.map(fh.leak_40mb, range(20))
    assert [x for x, _, _ in out] == list(range(20))
    assert len({pid for _, pid, _ in out}) >= 4
    assert max(rss for _, _, rss in out) <= limit


def test_module_map_and_executor_take_worker_limits() -> None:
    pids = pp.map(fh.pid_of, range(6), backend="processes", workers=2, max_tasks_per_child=1)
    assert len(set(pids)) == 6
    with pp.Executor(backend="processes", max_workers=1, max_tasks_per_child=1) as ex:
        assert len({ex.submit(fh.pid_of, i).result(timeout=WAIT_S) for i in range(3)}) == 3


def test_worker_limits_need_worker_processes() -> None:
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        pp.Pool("threads", max_tasks_per_child=2)
    with pytest.raises(ValueError, match="positive"):
        pp.Pool("processes", max_worker_memory=0)
    with pytest.raises(ValueError, match="task-count"):
        pp.Pool("dask", max_tasks_per_child=2)


def test_an_oom_death_is_explained_and_retried_with_fewer_workers(tmp_path: Path) -> None:
    import functools

    fn = functools.partial(fh.oom_once, str(tmp_path / "marker"))
    with pp.Pool("processes", workers=2, progress=False) as pool:
        out = pool.map(fn, range(8), chunksize=1, errors="return")
        error = out[fh.BAD]
        assert isinstance(error, pp.WorkerCrashedError), error
        assert "out-of-memory" in str(error)
        assert " MB" in str(error)
        (tmp_path / "marker").unlink()
        died = [0.0]

        out = pool.map(fn, range(8), chunksize=1, retries=1)
    assert [x for x, _, _ in out] == list(range(8))
    # After the death, the retried item and those after it ran one at a time.
    retried = out[fh.BAD]
    died[0] = retried[1]
    later = sorted((start, end) for _, start, end in out if start >= died[0])
    assert len(later) >= 2
    for (_, end), (start, _) in itertools.pairwise(later):
        assert start >= end - 0.01, later


def test_cli_run_takes_memory_options(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from powerpool._cli.app import cli

    source = tmp_path / "items.jsonl"
    source.write_text("".join(f"{i}\n" for i in range(6)))
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "fault_helpers:pid_of",
            str(source),
            "--backend",
            "processes",
            "--workers",
            "2",
            "--max-worker-memory",
            "4GB",
            "--max-tasks-per-child",
            "1",
            "--max-inflight-bytes",
            "16MiB",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    pids = {json.loads(line)["result"] for line in result.output.splitlines() if line}
    assert len(pids) == 6  # one worker per item
    bad = CliRunner().invoke(
        cli, ["run", "fault_helpers:pid_of", str(source), "--max-worker-memory", "lots"]
    )
    assert bad.exit_code == 2
    assert "500MB" in bad.output


def test_auto_with_worker_limits_runs_on_processes() -> None:
    with pp.Pool(max_tasks_per_child=1, workers=2, progress=False) as pool:
        pids = pool.map(fh.pid_of, range(4))
        assert pool.last_plan is not None
        assert pool.last_plan.backend == "processes"
        assert "max_tasks_per_child" in pool.last_plan.reasons[0]
    assert len(set(pids)) == 4


def test_dask_refuses_a_memory_limit_for_a_cluster_it_did_not_start() -> None:
    with pytest.raises(ValueError, match="memory-limit"):
        pp.Pool("dask", address="tcp://127.0.0.1:1", max_worker_memory=10**9)


def test_more_buffers_than_one_message_can_pass() -> None:
    # Linux passes at most 253 descriptors per message: 300 go in two batches.
    arrays = [np.full(40_000, float(i)) for i in range(300)]
    with pp.Pool("processes", workers=1, progress=False) as pool:
        sums = pool.map(fh.array_info, arrays, chunksize=300)
        ones = pool.map(np.ones, [40_000] * 300, chunksize=300)
    assert [s for s, _, _ in sums] == [40_000.0 * i for i in range(300)]
    assert all(o.sum() == 40_000 for o in ones)


def test_big_bytes_results_are_piped_into_the_result_itself() -> None:
    import multiprocessing

    values: list[Any] = [bytes(BIG * 8), bytearray(b"x" * BIG * 8), np.ones(BIG)]
    packed = _shm.pack(("values", values), items=3, pipe_bytes=True, pipe_below=0)
    assert packed.table is not None
    assert [kind for kind, _ in packed.table] == [
        _shm.PIPED_BYTES,
        _shm.PIPED_BYTEARRAY,
        _shm.PICKLE_BUFFER,
    ]
    assert len(packed.segments) == 1  # the array only
    sender, receiver = multiprocessing.Pipe()
    try:
        thread = threading.Thread(target=_transfer.send_buffers, args=(sender, packed))
        thread.start()
        received = _transfer.open_buffers(
            packed.table, _transfer.receive_buffers(receiver, packed.table), _shm.OWN
        )
        thread.join(timeout=30)
    finally:
        sender.close()
        receiver.close()
    _, got = _shm.unpack(packed.inband, packed.table, received)
    assert got[0] is received[0]  # read from the pipe into the result: no copy
    assert got[1] is received[1]
    assert type(got[1]) is bytearray
    assert got[:2] == values[:2]
    assert np.array_equal(got[2], values[2])
    assert got[2].flags.writeable
    del packed, received, got
    assert not _memfds(maps=True)


@pytest.mark.parametrize("writable", [False, True])
def test_distinct_mid_size_arguments_are_piped_and_repeated_ones_shared(
    created: list[int], writable: bool
) -> None:
    assert BIG * 8 < _shm.PIPE_BELOW_BYTES
    arrays = [np.full(BIG, float(i)) for i in range(6)]
    with pp.Pool("processes", workers=2, progress=False, writable_arguments=writable) as pool:
        out = pool.map(fh.array_info, arrays, chunksize=2)
        assert out == [(float(BIG * i), writable, "ndarray") for i in range(6)]
        assert [pid for pid in created if pid == os.getpid()] == []  # all piped
        shared = arrays[0]
        pool.map(fh.array_info, [shared] * 6, chunksize=1)
        assert [pid for pid in created if pid == os.getpid()] == [os.getpid()]  # one segment
    assert not _memfds()

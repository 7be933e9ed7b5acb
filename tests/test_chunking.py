"""Chunk sizing and the in-flight window: the taper's floor, and following a backend's capacity."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, ClassVar

import pytest

from powerpool._chunk import Chunk, ChunkResult
from powerpool._chunking import CHUNKS_PER_WORKER, ChunkSizer
from powerpool._ledger import StatsLedger
from powerpool._run import CHUNKS_IN_FLIGHT_PER_WORKER, Run, RunOptions

pytestmark = pytest.mark.timeout(30)


def test_the_taper_never_goes_below_the_floor() -> None:
    sizer = ChunkSizer(fixed=None, target_s=0.5, workers=4, total=10_000, floor_s=0.25)
    sizer.seed(0.01)  # 10 ms items: the target is 50 items, the floor 25
    sizes = []
    while (size := sizer.next_size()) and sum(sizes) < 10_000:
        sizes.append(size)
        sizer.taken(size)
    assert max(sizes) == 50
    # Without a floor the last chunks would shrink to one item; with it the
    # smallest is 25 (except what is left at the very end).
    assert min(sizes[:-1]) >= 25


def test_without_a_floor_the_taper_goes_down_to_one_item() -> None:
    sizer = ChunkSizer(fixed=None, target_s=0.5, workers=4, total=1000)
    sizer.seed(0.01)
    sizes = []
    while sum(sizes) < 1000:
        size = sizer.next_size()
        sizes.append(size)
        sizer.taken(size)
    assert sizes[-1] == 1


def test_resize_changes_the_load_balancing_cap() -> None:
    sizer = ChunkSizer(fixed=None, target_s=10.0, workers=1, total=800)
    sizer.seed(0.001)  # the target alone would take every item at once
    assert sizer.next_size() == 800 // CHUNKS_PER_WORKER
    sizer.resize(workers=8, target_s=10.0)
    assert sizer.next_size() == 800 // (8 * CHUNKS_PER_WORKER)


class GrowingBackend:
    """A backend whose capacity grows mid-run, like a cluster whose workers join.

    A helper thread runs the submitted chunks one at a time; after a few it
    raises ``workers``. Records how many chunks were in flight at each submit.
    """

    name: ClassVar[str] = "growing"
    chunk_target_s: ClassVar[float] = 0.0
    supports_timeout: ClassVar[bool] = False

    def __init__(self, before: int, after: int, grow_after: int) -> None:
        self.workers = before
        self._after = after
        self._grow_after = grow_after
        self._pending: deque[Chunk] = deque()
        self._cond = threading.Condition()
        self.in_flight_at_submit: list[tuple[int, int]] = []  # (workers, chunks in flight)
        self._done = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def submit(self, chunk: Chunk) -> None:
        with self._cond:
            self._pending.append(chunk)
            self.in_flight_at_submit.append((self.workers, len(self._pending)))
            self._cond.notify()

    def _serve(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._stop)
                if self._stop:
                    return
            time.sleep(0.002)  # let the core fill its window meanwhile
            with self._cond:
                chunk = self._pending.popleft()
                self._done += 1
                if self._done == self._grow_after:
                    self.workers = self._after
            values = [chunk.fn(*args, **kwargs) for _, args, kwargs in chunk.items]
            assert chunk.on_done is not None
            chunk.on_done(ChunkResult(chunk, values=values, worker="w", busy_s=0.0))

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()


def test_the_window_follows_the_backends_capacity() -> None:
    backend = GrowingBackend(before=2, after=8, grow_after=10)
    ids = itertools.count()
    try:
        run = Run(
            backend=backend,
            fn=abs,
            source=iter(range(200)),
            star=False,
            options=RunOptions(chunksize=1),
            ordered=True,
            with_index=False,
            total=200,
            epoch=0,
            ledger=StatsLedger(),
            new_chunk_id=lambda: next(ids),
        )
        out: list[Any] = [v for block in run for v in block]
    finally:
        backend.close()
    assert out == list(range(200))
    before = [n for workers, n in backend.in_flight_at_submit if workers == 2]
    after = [n for workers, n in backend.in_flight_at_submit if workers == 8]
    assert max(before) <= 2 * CHUNKS_IN_FLIGHT_PER_WORKER
    assert max(after) > 2 * CHUNKS_IN_FLIGHT_PER_WORKER  # the window grew with the workers
    assert max(after) <= 8 * CHUNKS_IN_FLIGHT_PER_WORKER

"""What ``report=`` costs: the same maps with and without a recorder, side by side.

    python -m benchmarks.report_cost [--repeat N]

Two measurements per case, because on a loaded machine wall time varies by
more than the cost being measured:

* **wall**: runs with and without ``report=True`` alternate (ABBA) on one
  warm pool, so machine load affects both alike; medians and their ratio.
* **accounted**: the time actually spent recording, as a share of the run:
  the recorder's own calls in this process, timed around each call, plus,
  for the workers, the measured extra cost of a timed item (one clock read
  and one append) times the items timed and the cost of a chunk's timing
  record times the chunks, counted as if no worker ran in parallel (an upper
  bound). This one does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import statistics
import time
import timeit
from collections.abc import Callable, Iterable
from typing import Any

import powerpool as pp
from powerpool import _recorder
from powerpool._backends._worker import BARE, _run_chunk


def trivial(x: int) -> int:
    return x + 1


def spin_5ms(x: int) -> int:
    """About 5 ms of pure-Python work (a busy loop on the clock)."""
    end = time.perf_counter() + 0.005
    while time.perf_counter() < end:
        pass
    return x


CASES: dict[str, tuple[Callable[[int], int], Callable[[], Iterable[int]], dict[str, Any]]] = {
    "200 000 trivial items, auto": (trivial, lambda: range(200_000), {}),
    "200 000 trivial items, processes x2": (
        trivial,
        lambda: range(200_000),
        {"backend": "processes", "workers": 2},
    ),
    "200 x 5 ms CPU items, processes x2": (
        spin_5ms,
        lambda: range(200),
        {"backend": "processes", "workers": 2},
    ),
}

_spent = [0.0]  # seconds inside Recorder methods (this process)


def _timed(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            _spent[0] += time.perf_counter() - start

    return wrapper


def _count_recorder_time() -> None:
    for name in ("begin", "end", "chunk", "span", "event", "log", "snapshot"):
        setattr(_recorder.Recorder, name, _timed(getattr(_recorder.Recorder, name)))


def _worker_costs() -> tuple[float, float]:
    """(extra seconds per timed item, seconds per chunk's timing record) in a worker."""
    view = memoryview(bytearray(16)).cast("d")
    payload = list(range(100_000))
    plain = min(timeit.repeat(lambda: _run_chunk(trivial, payload, BARE, False, view, 0), number=3))
    timed = min(
        timeit.repeat(lambda: _run_chunk(trivial, payload, BARE, False, view, 0, []), number=3)
    )
    per_item = max(0.0, (timed - plain) / 3 / len(payload))
    now = time.perf_counter()

    def record() -> bytes:
        timing = (now, 1e-5, 1e-5, now, None, 1e-5)
        return pickle.dumps((1, 0.1, None, timing), pickle.HIGHEST_PROTOCOL)

    per_chunk = min(timeit.repeat(record, number=10_000)) / 10_000
    return per_item, per_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="runs of each kind per case")
    args = parser.parse_args()
    _count_recorder_time()
    per_item_s, per_chunk_s = _worker_costs()
    print(
        f"worker: +{per_item_s * 1e9:.0f} ns per timed item, {per_chunk_s * 1e6:.1f} us per chunk"
    )
    for name, (fn, items, options) in CASES.items():
        backend = options.get("backend", "auto")
        with pp.Pool(backend, workers=options.get("workers"), progress=False) as pool:
            pool.map(fn, items())  # start the workers
            plain: list[float] = []
            recorded: list[float] = []
            shares: list[float] = []
            parts: list[tuple[float, int, int]] = []
            for i in range(args.repeat):
                # ABBA order: neither kind always runs first after the other.
                for report in (False, True) if i % 2 else (True, False):
                    _spent[0] = 0.0
                    start = time.perf_counter()
                    pool.map(fn, items(), report=report)
                    wall = time.perf_counter() - start
                    if not report:
                        plain.append(wall)
                        continue
                    recorded.append(wall)
                    last = pool.last_report
                    assert last is not None
                    timed_items = sum(len(s.item_ends_s or ()) for s in last.spans)
                    chunks = sum(1 for s in last.spans if s.measured)
                    cost = _spent[0] + timed_items * per_item_s + chunks * per_chunk_s
                    shares.append(cost / wall)
                    parts.append((_spent[0], timed_items, chunks))
        off, on = statistics.median(plain), statistics.median(recorded)
        print(
            f"{name}\n  wall: without {off:.4f} s, with report {on:.4f} s, ratio {on / off:.3f}"
            f"\n  accounted: recording took {statistics.median(shares):.2%} of the run "
            f"(recorder {statistics.median(p[0] for p in parts) * 1e3:.2f} ms, "
            f"{statistics.median(p[1] for p in parts):.0f} items and "
            f"{statistics.median(p[2] for p in parts):.0f} chunks timed in workers)"
        )


if __name__ == "__main__":
    main()

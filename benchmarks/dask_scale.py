"""Scale-out benchmark: powerpool on a Dask cluster against Dask's own ``client.map``.

Run from the repository root::

    python -m benchmarks.dask_scale --quick        # what fits a 2-core machine
    python -m benchmarks.dask_scale                # 2, 8, 16 and 32 workers
    python -m benchmarks.dask_scale --out scale.json --repeats 5

Two workloads, each on a fresh ``LocalCluster`` per worker count:

* **cpu**: pure-Python items of ~5 ms (a calibrated loop) on worker
  *processes* with one thread each, the way a CPU-bound cluster is run;
* **wait**: items that sleep 20 ms on *in-process* workers (one thread each),
  a stand-in for a big cluster whose workers mostly wait: the scheduler's and
  the client's per-task costs are what is measured, not this machine's cores.

Contenders, on the same client, alternated within each repeat so that a
noisy neighbour hurts all of them alike:

* ``client.map``: one Dask task per item (``pure=False``), then ``gather``;
* ``client.map batched``: items cut by hand into 4 batches per worker thread;
* ``powerpool``: ``pp.map(fn, items, backend="dask", client=client)`` at its
  defaults (its function scatter and chunk sizing are inside the timing).

The cluster's start and a warm-up map (every worker imports and runs the
function once) are outside the timing. Efficiency is ideal / measured, where
ideal = items x item time / worker threads. JSON goes to ``--out`` (default
``benchmarks/results-dask-scale.json``) and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CPU_ITEM_S = 0.005
"""Target compute time of one cpu item (the issue's ~5 ms pure-Python items)."""

WAIT_ITEM_S = 0.020
"""Sleep of one wait item: long enough that the scheduler, not the sleep, is measured."""

BATCHES_PER_THREAD = 4
"""Manual batching baseline: 4 batches per worker thread, the usual advice."""


def spin(n: int) -> int:
    """Pure-Python work: ``n`` loop turns (holds the GIL all along)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _batch(fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
    return [fn(x) for x in xs]


def calibrate(target_s: float = CPU_ITEM_S) -> int:
    """Loop turns that take ``target_s`` here (best of several, so load counts less)."""
    n = 20_000
    while True:
        best = min(_timed(spin, n) for _ in range(3))
        if best >= 0.02:
            return max(1, int(n * target_s / best))
        n *= 2


def _timed(fn: Callable[[int], Any], n: int) -> float:
    start = time.perf_counter()
    fn(n)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Row:
    """One contender on one cluster size: medians over repeats."""

    workload: str
    """``cpu`` (process workers) or ``wait`` (in-process workers)."""
    workers: int
    """Dask workers, one thread each."""
    items: int
    """Items in the map."""
    item_s: float
    """Seconds of work (or sleep) per item."""
    contender: str
    """``client.map``, ``client.map batched`` or ``powerpool``."""
    median_s: float
    """Median wall time of the map, seconds."""
    times_s: tuple[float, ...]
    """Every repeat, seconds."""
    ideal_s: float
    """items x item_s / workers: perfect division of the work."""
    efficiency: float
    """ideal_s / median_s."""
    vs_client_map: float
    """median_s / client.map's median_s in the same run (lower is better)."""


def _contenders(
    client: Any, threads: int
) -> dict[str, Callable[[Callable[..., Any], list[Any]], list[Any]]]:
    import functools

    import powerpool as pp

    def plain(fn: Callable[..., Any], xs: list[Any]) -> list[Any]:
        out: list[Any] = client.gather(client.map(fn, xs, pure=False))
        return out

    def batched(fn: Callable[..., Any], xs: list[Any]) -> list[Any]:
        size = max(1, math.ceil(len(xs) / (threads * BATCHES_PER_THREAD)))
        parts = [xs[i : i + size] for i in range(0, len(xs), size)]
        futures = client.map(functools.partial(_batch, fn), parts, pure=False)
        return [r for part in client.gather(futures) for r in part]

    def powerpool(fn: Callable[..., Any], xs: list[Any]) -> list[Any]:
        return pp.map(fn, xs, backend="dask", client=client)

    return {"client.map": plain, "client.map batched": batched, "powerpool": powerpool}


def run_one(workload: str, workers: int, items: int, repeats: int, turns: int) -> list[Row]:
    from distributed import Client, LocalCluster

    processes = workload == "cpu"
    fn: Callable[..., Any]
    if processes:
        fn, arg, item_s = spin, turns, CPU_ITEM_S
    else:
        fn, arg, item_s = nap, WAIT_ITEM_S, WAIT_ITEM_S
    xs = [arg] * items
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=processes,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.wait_for_workers(workers)
        threads = sum(client.nthreads().values())
        # Warm-up: every worker has imported and run the function once.
        client.gather(client.map(fn, [arg] * (threads * 2), pure=False))
        runs = _contenders(client, threads)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                out = run(fn, xs)
                times[name].append(time.perf_counter() - start)
                assert len(out) == items, (name, len(out))
    ideal = items * item_s / threads
    base = statistics.median(times["client.map"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            Row(
                workload,
                workers,
                items,
                item_s,
                name,
                med,
                tuple(ts),
                ideal,
                ideal / med,
                med / base,
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dask_scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 process workers (cpu) and 16 in-process (wait)"
    )
    parser.add_argument("--workers", default="2,8,16,32", help="worker counts (without --quick)")
    parser.add_argument("--workloads", default="cpu,wait", help="cpu, wait or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results-dask-scale.json")
    )
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    turns = calibrate()
    plan: list[tuple[str, int, int]] = []
    for workload in workloads:
        if workload not in ("cpu", "wait"):
            parser.error(f"unknown workload {workload!r}")
        if args.quick:
            plan.append(("cpu", 2, 400) if workload == "cpu" else ("wait", 16, 1600))
        else:
            per = 200 if workload == "cpu" else 100
            plan.extend((workload, int(w), int(w) * per) for w in args.workers.split(","))
    rows: list[Row] = []
    head = ("workload", "workers", "items", "contender", "median s", "eff", "vs map")
    print("{:8} {:>7} {:>6} {:20} {:>9} {:>5} {:>7}".format(*head))
    for workload, workers, items in plan:
        for row in run_one(workload, workers, items, args.repeats, turns):
            rows.append(row)
            print(
                f"{row.workload:8} {row.workers:7d} {row.items:6d} {row.contender:20} "
                f"{row.median_s:9.2f} {row.efficiency:5.0%} {row.vs_client_map:7.2f}"
            )
            sys.stdout.flush()
    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "command": " ".join(
            ["python -m benchmarks.dask_scale", *(argv if argv is not None else sys.argv[1:])]
        ),
        "cpu_turns_per_item": turns,
        "rows": [asdict(r) for r in rows],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

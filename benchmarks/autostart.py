"""How ``backend="auto"`` starts: time until every core is busy, items run in the caller.

``python -m benchmarks.autostart [--quick] [--json PATH]``

For each workload, every measurement runs in a fresh interpreter (a cold
start is what a user's script pays), one after the other, so the ratios in
one table come from the same run of the same machine:

* **auto, stamped**: ``pp.map`` over the workload with each item reporting
  ``(pid, start time)``: when the first item started on a worker, when every
  core had started one (``all_busy_s``: the ``min(cores, n)``-th distinct
  worker's first item), how many items ran in the caller's process, and the
  plan auto ended with.
* **timed, unstamped**: auto cold and its second call in the same
  interpreter, against ``multiprocessing.Pool`` and joblib at their defaults
  (cold: a fresh pool in a fresh interpreter; second call: the same pool
  again), each the median of ``--repeat`` fresh interpreters, the peers taken
  in turn (auto, mp, joblib, auto, ...) so a drifting load hits them alike;
  every run's figures are kept in the JSON.
* **phase times** for a projection to more cores: the cost of starting a
  process pool of W workers (W = 1, 2, 4, 8 and the core count), fitted to ``a + b * W``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

PRIMES_04S = [
    110000000000027,
    110000000000071,
    110000000000081,
    110000000000089,
    110000000000101,
    110000000000119,
    110000000000131,
    110000000000251,
]
"""Eight 15-digit primes near 1.1e14: trial division (~5.2 million odd divisors) takes
~0.4 s each on the 2-core VM (0.35-0.44 s measured at load 0.4). The
first version used primes near 4e12, which took ~80 ms each: not the issue's workload."""


def stamp(fn: Callable[[Any], Any], x: Any) -> tuple[int, float, float, Any]:
    """Run ``fn(x)``; return (pid, wall-clock start, seconds it took, result)."""
    started = time.time()
    clock = time.perf_counter()
    result = fn(x)
    return os.getpid(), started, time.perf_counter() - clock, result


def _workload(name: str, quick: bool) -> tuple[Callable[[Any], Any], list[Any]]:
    from .workloads import WORKLOADS, is_prime

    if name == "primes04":
        return is_prime, list(PRIMES_04S)
    if name == "svd300":  # the numpy case: 200 SVDs of 300 x 300
        from .workloads import svd300_sum

        return svd300_sum, list(range(8 if quick else 200))
    w = WORKLOADS[name]
    return w.fn, w.make_items(w.size(quick), "")


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh-interpreter measurement (see the module docstring)."""
    fn, items = _workload(spec["workload"], spec["quick"])
    mode = spec["mode"]
    out: dict[str, Any] = {}
    if mode == "stamped":
        import powerpool as pp

        called = time.time()
        with pp.Pool(progress=False) as pool:
            got = pool.map(functools.partial(stamp, fn), items)
            plan = pool.last_plan
        me = os.getpid()
        firsts: dict[int, float] = {}
        for pid, started, _, _ in got:
            if pid != me:
                firsts[pid] = min(firsts.get(pid, started), started)
        cores = len(os.sched_getaffinity(0))
        need = min(cores, len(items))
        order = sorted(firsts.values())
        out["first_worker_item_s"] = order[0] - called if order else None
        out["all_busy_s"] = order[need - 1] - called if len(order) >= need else None
        out["items_in_caller"] = sum(1 for pid, _, _, _ in got if pid == me)
        # What one item really took here, in the run (the workload's size check:
        # the primes are meant to take ~0.4 s each).
        out["item_s"] = statistics.median(took for _, _, took, _ in got)
        out["plan"] = f"{plan.backend} x{plan.workers}" if plan else "?"
        out["switches"] = [r for r in (plan.reasons if plan else ()) if r.startswith("switches")]
        return out
    started = time.perf_counter()
    if mode == "auto":
        import powerpool as pp

        pp.map(fn, items)
        out["cold_s"] = time.perf_counter() - started
        out["cold_plan"] = _warm_plan()
        again = time.perf_counter()
        pp.map(fn, items)
        out["second_s"] = time.perf_counter() - again
        out["second_plan"] = _warm_plan()
    elif mode == "mp":
        import multiprocessing

        with multiprocessing.Pool() as mp_pool:
            mp_pool.map(fn, items)
            out["cold_s"] = time.perf_counter() - started
            again = time.perf_counter()
            mp_pool.map(fn, items)
            out["second_s"] = time.perf_counter() - again
    elif mode == "joblib":
        import joblib

        with joblib.Parallel(n_jobs=-1) as parallel:
            parallel(joblib.delayed(fn)(x) for x in items)
            out["cold_s"] = time.perf_counter() - started
            again = time.perf_counter()
            parallel(joblib.delayed(fn)(x) for x in items)
            out["second_s"] = time.perf_counter() - again
    elif mode == "loop":
        list(map(fn, items))
        out["cold_s"] = time.perf_counter() - started
        again = time.perf_counter()
        list(map(fn, items))
        out["second_s"] = time.perf_counter() - again
    elif mode == "pool-start":
        import queue

        from powerpool._backends import BackendConfig
        from powerpool._backends._processes import ProcessBackend
        from powerpool._chunk import Chunk

        cores = len(os.sched_getaffinity(0))
        for workers in sorted({1, 2, 4, 8, cores}):
            inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
            t0 = time.perf_counter()
            backend = ProcessBackend(BackendConfig(workers=workers), inbox.put)
            for i in range(workers):  # every worker runs one item: all started
                backend.submit(Chunk(i, abs, [(i, (-1,), {})]))
            for _ in range(workers):
                inbox.get()
            out[f"start_{workers}_s"] = time.perf_counter() - t0
            backend.shutdown()
    return out


def _env() -> dict[str, str]:
    """The children's environment, with bytecode caching on.

    An installed powerpool has its ``.pyc`` files, as the stdlib, joblib and
    numpy have theirs; a shell with ``PYTHONDONTWRITEBYTECODE=1`` (this
    project's helpers run under one) would make every cold child compile
    powerpool's ~40 modules from source (~0.1-0.3 s on the 2-core VM), a
    cost no user pays and no peer was charged.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _compile() -> None:
    """Write powerpool's bytecode once, before anything is timed (see _env)."""
    code = (
        "import compileall, os, powerpool; "
        "compileall.compile_dir(os.path.dirname(powerpool.__file__), quiet=1)"
    )
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=600)


def _warm_plan() -> str:
    """The plan pp.map's warm pool ended with (a diagnostic; reads a private registry)."""
    from powerpool import _warm_pools

    plans = [pool.last_plan for pool in _warm_pools._warm.values() if pool.last_plan is not None]
    if not plans:
        return "?"
    plan = plans[-1]
    ran = [r for r in plan.reasons if r.startswith(("ran:", "switches:"))]
    return f"{plan.backend} x{plan.workers} chunks of {plan.chunksize}; " + "; ".join(ran)


def _fresh(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.autostart", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env=_env(),
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.autostart")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only", default="primes04,cpu5ms,heavytail,svd300,sleep,trivial", help="workloads"
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument(
        "--peers", default="auto,mp,joblib,loop", help="what to time besides the stamped run"
    )
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    _compile()
    report: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "workloads": {}}
    for name in args.only.split(","):
        base = {"workload": name, "quick": args.quick}
        row: dict[str, Any] = {"stamped": _fresh({**base, "mode": "stamped"})}
        peers = tuple(args.peers.split(","))
        if name == "sleep":  # the process pools are n/workers x 20 ms: not worth the wait
            peers = tuple(p for p in peers if p in ("auto", "loop"))
        # Round-robin (auto, mp, joblib, auto, mp, ...), not one peer's repeats
        # in a block: on a shared machine the load drifts, and a block would
        # hand one peer the quiet minute and another the busy one.
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in peers}
        for _ in range(args.repeat):
            for mode in peers:
                runs[mode].append(_fresh({**base, "mode": mode}))
        for mode in peers:
            row[mode] = {
                key: statistics.median(r[key] for r in runs[mode]) for key in ("cold_s", "second_s")
            }
            row[mode]["runs"] = runs[mode]
        report["workloads"][name] = row
        s = row["stamped"]
        line = [
            f"{name:10s} first item on a worker {_ms(s['first_worker_item_s'])}",
            f"all cores busy {_ms(s['all_busy_s'])}",
            f"items in caller {s['items_in_caller']}",
            f"item {_ms(s['item_s'])}",
            f"plan {s['plan']}",
        ]
        for mode in peers:
            line.append(f"{mode} {row[mode]['cold_s']:.3f}/{row[mode]['second_s']:.3f} s")
        print(" | ".join(line), flush=True)
    report["pool_start"] = _fresh({"workload": "trivial", "quick": True, "mode": "pool-start"})
    print("process pool start (W workers, each ran one item):", report["pool_start"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


if __name__ == "__main__":
    main()

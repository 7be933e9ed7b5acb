"""The contenders: each one maps a workload the way its documentation shows.

Every ``run`` function starts its pool, maps, collects the results in input
order, and shuts the pool down: start-up and shutdown are inside the timed
region, as a user pays them. Options are left at their defaults unless the
contender's ``how`` says otherwise; ``workers`` is only passed in the worker
sweep.

Pools that keep workers alive between calls (powerpool's warm pools, joblib's
loky executor) are shut down before each timed run of their cold row, so that
every row pays its own start; their "(warm)" rows are timed right after the
cold row, with the pool left running, and say so.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .workloads import Workload

__all__ = [
    "CONTENDERS",
    "SWEEP_CONTENDERS",
    "Contender",
    "Job",
    "has_warm_shutdown",
    "powerpool_version",
    "shutdown_loky",
    "shutdown_powerpool_warm_pools",
]


@dataclass(frozen=True)
class Job:
    """What one timed run maps."""

    workload: Workload
    """The workload (its functions and initializer)."""
    items: list[Any]
    """The inputs, already made (making them is not timed)."""
    workers: int | None = None
    """Worker count for the sweep; None leaves the contender at its default."""


@dataclass(frozen=True)
class Contender:
    """One way of running a map, as its users write it."""

    slug: str
    """Short id for ``--contenders``."""
    name: str
    """Row label in the tables and plots."""
    how: str
    """The call, as code, for the report."""
    run: Callable[[Job], list[Any]]
    """Start, map, collect in input order, shut down."""
    coroutine: bool = False
    """Maps the workload's coroutine variant; not applicable where there is none."""
    prepare: Callable[[], None] | None = None
    """Called (untimed) before each timed run: makes the run cold."""
    cleanup: Callable[[], None] | None = None
    """Called (untimed) after the contender's last run on a workload."""
    warm_of: str | None = None
    """Slug of the cold row whose pool this row reuses, timed right after it."""
    item_caps: Mapping[str, int] = field(default_factory=dict)
    """Workload name -> most items to run; the time is extrapolated and marked."""
    note: str = ""
    """Caveat shown under the table."""


# ------------------------------------------------------------------ stdlib


def _serial(job: Job) -> list[Any]:
    w = job.workload
    if w.initializer is not None:
        w.initializer()
    fn = w.fn
    return [fn(x) for x in job.items]


def _threads(job: Job) -> list[Any]:
    w = job.workload
    with ThreadPoolExecutor(max_workers=job.workers, initializer=w.initializer) as ex:
        return list(ex.map(w.fn, job.items))


def _processes(job: Job) -> list[Any]:
    w = job.workload
    with ProcessPoolExecutor(max_workers=job.workers, initializer=w.initializer) as ex:
        return list(ex.map(w.fn, job.items))


def _tuned_chunksize(n_items: int, workers: int) -> int:
    return max(1, math.ceil(n_items / (4 * workers)))


def _processes_tuned(job: Job) -> list[Any]:
    w = job.workload
    # What ProcessPoolExecutor() itself picks on Python <= 3.12.
    workers = job.workers or os.cpu_count() or 1
    chunksize = _tuned_chunksize(len(job.items), workers)
    with ProcessPoolExecutor(max_workers=workers, initializer=w.initializer) as ex:
        return list(ex.map(w.fn, job.items, chunksize=chunksize))


def _mp_pool(job: Job) -> list[Any]:
    w = job.workload
    with multiprocessing.Pool(processes=job.workers, initializer=w.initializer) as pool:
        return pool.map(w.fn, job.items)


async def _gather_all(afn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*(afn(x) for x in items)))


def _asyncio_gather(job: Job) -> list[Any]:
    afn = job.workload.afn
    assert afn is not None  # the runner skips contenders that need a coroutine
    return asyncio.run(_gather_all(afn, job.items))


# ------------------------------------------------------------------ joblib / MPIRE / dask


def _joblib(job: Job) -> list[Any]:
    from joblib import Parallel, delayed

    w = job.workload
    fn = w.lazy_fn or w.fn  # joblib has no initializer: users cache lazily in the module
    out: list[Any] = Parallel(n_jobs=job.workers or -1)(delayed(fn)(x) for x in job.items)
    return out


def shutdown_loky() -> None:
    """Stop joblib's reusable loky executor, if one is running."""
    # joblib keeps loky's executor alive between Parallel calls; reaching into
    # the module global (rather than get_reusable_executor()) avoids starting
    # one just to stop it.
    from joblib.externals.loky import reusable_executor

    executor = getattr(reusable_executor, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True)


def _mpire(job: Job) -> list[Any]:
    from mpire import WorkerPool

    w = job.workload
    with WorkerPool(n_jobs=job.workers) as pool:
        out: list[Any] = pool.map(w.fn, job.items, worker_init=w.initializer)
        return out


def _dask(job: Job) -> list[Any]:
    from distributed import Client, LocalCluster

    w = job.workload
    fn = w.lazy_fn or w.fn  # a lazily-initialized module global, as dask users do
    with LocalCluster(n_workers=job.workers) as cluster, Client(cluster) as client:
        futures = client.map(fn, job.items)
        out: list[Any] = client.gather(futures)
        return out


# ------------------------------------------------------------------ powerpool


def powerpool_version() -> str | None:
    """powerpool's version, or None where it is not importable yet."""
    try:
        import powerpool
    except ImportError:
        return None
    version = getattr(powerpool, "__version__", None)
    if version is None:
        from importlib import metadata

        version = metadata.version("powerpool")
    return str(version)


# Names under which the core may expose "stop every warm pool"; the first found wins.
_WARM_SHUTDOWN_NAMES = (
    ("powerpool", "shutdown_warm_pools"),
    ("powerpool._warm_pools", "shutdown_warm_pools"),
    ("powerpool._warm_pools", "_shutdown_warm_pools"),
    ("powerpool._pool", "shutdown_warm_pools"),
    ("powerpool._pool", "_shutdown_warm_pools"),
)


def _find_warm_shutdown() -> Callable[[], Any] | None:
    import importlib

    for module_name, attr in _WARM_SHUTDOWN_NAMES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        fn = getattr(module, attr, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


def has_warm_shutdown() -> bool:
    """Whether powerpool exposes a way to stop its warm pools."""
    return _find_warm_shutdown() is not None


def shutdown_powerpool_warm_pools() -> bool:
    """Stop powerpool's warm pools; False where no such function was found."""
    fn = _find_warm_shutdown()
    if fn is None:
        return False
    fn()
    return True


def _pp_shutdown() -> None:
    shutdown_powerpool_warm_pools()


def _powerpool(backend: str) -> Callable[[Job], list[Any]]:
    def run(job: Job) -> list[Any]:
        import powerpool as pp

        w = job.workload
        fn = w.afn if backend == "asyncio" else w.fn
        assert fn is not None  # the runner skips coroutine contenders where there is none
        kwargs: dict[str, Any] = {"backend": backend}
        if job.workers is not None:
            kwargs["workers"] = job.workers
        if w.initializer is not None:
            kwargs["initializer"] = w.initializer
        out: list[Any] = pp.map(fn, job.items, **kwargs)
        return out

    run.__name__ = f"powerpool_{backend}"
    return run


# ------------------------------------------------------------------ the list

_TRIVIAL_CAP_PPE = 20_000
_TRIVIAL_CAP_DASK = 2_000

CONTENDERS: dict[str, Contender] = {
    c.slug: c
    for c in [
        Contender(
            slug="serial",
            name="serial loop",
            how="[fn(x) for x in items]",
            run=_serial,
        ),
        Contender(
            slug="tpe",
            name="ThreadPoolExecutor",
            how="with ThreadPoolExecutor() as ex: list(ex.map(fn, items))",
            run=_threads,
        ),
        Contender(
            slug="ppe",
            name="ProcessPoolExecutor",
            how="with ProcessPoolExecutor() as ex: list(ex.map(fn, items))  # chunksize=1",
            run=_processes,
            item_caps={"trivial": _TRIVIAL_CAP_PPE},
            note="ProcessPoolExecutor at chunksize=1 pays ~0.2 ms per item here; on the "
            f"trivial workload it runs the first {_TRIVIAL_CAP_PPE:,} items, and the time "
            "beyond its one-item time (start-up) is scaled linearly to the full size "
            "(marked ≈).",
        ),
        Contender(
            slug="ppe-tuned",
            name="ProcessPoolExecutor (tuned)",
            how="ex.map(fn, items, chunksize=ceil(n / (4 * workers)))",
            run=_processes_tuned,
        ),
        Contender(
            slug="mp-pool",
            name="multiprocessing.Pool",
            how="with multiprocessing.Pool() as p: p.map(fn, items)",
            run=_mp_pool,
        ),
        Contender(
            slug="joblib",
            name="joblib",
            how="Parallel(n_jobs=-1)(delayed(fn)(x) for x in items)",
            run=_joblib,
            prepare=shutdown_loky,
            cleanup=shutdown_loky,
            note="joblib rows: loky's reusable executor is shut down before each cold run; "
            "the (warm) row reuses it. joblib has no initializer, so the init workload "
            "uses a lazy module-level cache.",
        ),
        Contender(
            slug="joblib-warm",
            name="joblib (warm)",
            how="same, loky executor left running from the previous call",
            run=_joblib,
            cleanup=shutdown_loky,
            warm_of="joblib",
        ),
        Contender(
            slug="mpire",
            name="MPIRE",
            how="with WorkerPool() as p: p.map(fn, items, worker_init=init)",
            run=_mpire,
        ),
        Contender(
            slug="dask",
            name="dask LocalCluster",
            how="with LocalCluster() as c, Client(c) as cl: cl.gather(cl.map(fn, items))",
            run=_dask,
            item_caps={"trivial": _TRIVIAL_CAP_DASK},
            note="dask: the cluster start is timed like every pool's start; on the trivial "
            f"workload it runs the first {_TRIVIAL_CAP_DASK:,} items (~2 ms of scheduler "
            "time per task here), and the time beyond its one-item time (cluster start) "
            "is scaled linearly to the full size (marked ≈). The init "
            "workload uses a lazily-initialized module global.",
        ),
        Contender(
            slug="asyncio-gather",
            name="asyncio.gather",
            how="asyncio.run(gather(*(afn(x) for x in items)))  # unbounded",
            run=_asyncio_gather,
            coroutine=True,
        ),
        Contender(
            slug="pp-auto",
            name="powerpool auto",
            how="pp.map(fn, items)",
            run=_powerpool("auto"),
            prepare=_pp_shutdown,
            cleanup=_pp_shutdown,
            note="powerpool rows are cold: its warm pools are shut down before each timed "
            "run. 'powerpool auto (warm)' is timed right after, reusing the warm pool "
            "that the previous pp.map call left.",
        ),
        Contender(
            slug="pp-auto-warm",
            name="powerpool auto (warm)",
            how="pp.map(fn, items)  # warm pool from the previous call",
            run=_powerpool("auto"),
            cleanup=_pp_shutdown,
            warm_of="pp-auto",
        ),
        Contender(
            slug="pp-serial",
            name="powerpool serial",
            how='pp.map(fn, items, backend="serial")',
            run=_powerpool("serial"),
            prepare=_pp_shutdown,
            cleanup=_pp_shutdown,
        ),
        Contender(
            slug="pp-threads",
            name="powerpool threads",
            how='pp.map(fn, items, backend="threads")',
            run=_powerpool("threads"),
            prepare=_pp_shutdown,
            cleanup=_pp_shutdown,
        ),
        Contender(
            slug="pp-processes",
            name="powerpool processes",
            how='pp.map(fn, items, backend="processes")',
            run=_powerpool("processes"),
            prepare=_pp_shutdown,
            cleanup=_pp_shutdown,
        ),
        Contender(
            slug="pp-asyncio",
            name="powerpool asyncio",
            how='pp.map(afn, items, backend="asyncio")',
            run=_powerpool("asyncio"),
            coroutine=True,
            prepare=_pp_shutdown,
            cleanup=_pp_shutdown,
        ),
    ]
}
"""All contenders, in table order (a warm row right after its cold row)."""

SWEEP_CONTENDERS = ("pp-processes", "ppe-tuned", "joblib")
"""Contenders in the worker-count sweep, called with an explicit worker count."""

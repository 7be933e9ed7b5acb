"""Runs the contenders over the workloads and measures them.

Flow, per workload::

    setup (HTTP server) -> make items (untimed) -> serial reference results
        -> for each contender: [prepare (untimed) -> timed run -> check] x repeat
        -> cell record (median, status)           -> results.json rewritten

then the worker sweep over the CPU workloads, then the report.

A timed run is guarded by a watchdog: past ``budget_s`` it sends SIGINT to the
main thread (the run is recorded as "timeout"), 10 s later it kills this
process's children (a pool that ignores the interrupt), and 10 s after that it
writes what it has and exits. Every run happens in the main thread of this one
process, as a user's script would run it.
"""

from __future__ import annotations

import contextlib
import cProfile
import faulthandler
import io
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from . import httpserver
from .contenders import (
    CONTENDERS,
    SWEEP_CONTENDERS,
    Contender,
    Job,
    has_warm_shutdown,
    shutdown_loky,
    shutdown_powerpool_warm_pools,
)
from .workloads import WORKLOADS, Workload

__all__ = [
    "ABANDONED",
    "Cell",
    "Config",
    "Results",
    "SweepPoint",
    "default_sweep",
    "machine_info",
    "run_suite",
]

_GRACE_S = 10.0
"""Watchdog: seconds between the interrupt and killing children, and between
that and giving up; long enough for a pool to shut down after Ctrl-C."""

_PACKAGES = (
    "powerpool",
    "numpy",
    "joblib",
    "mpire",
    "distributed",
    "dask",
    "cloudpickle",
    "psutil",
    "threadpoolctl",
    "matplotlib",
)


@dataclass(frozen=True)
class Config:
    """What to run and how often."""

    quick: bool = False
    """Use the workloads' small sizes."""
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    """Workload names, in run order."""
    contenders: tuple[str, ...] = tuple(CONTENDERS)
    """Contender slugs, in run order."""
    sweep_workers: tuple[int, ...] = ()
    """Worker counts for the sweep; empty = no sweep."""
    repeat: int = 3
    """Timed runs per cell (fewer when a cell would exceed ``cell_s``)."""
    budget_s: float = 60.0
    """A run longer than this is stopped and recorded as "timeout"."""
    cell_s: float = 6.0
    """Stop repeating a cell when another run would take it past this many seconds."""
    sizes: Mapping[str, int] = field(default_factory=dict)
    """Workload name -> item count, overriding the default/quick size."""
    profile_powerpool: bool = False
    """Also write cProfile reports of pp.map's own overhead."""


@dataclass(frozen=True)
class Cell:
    """One contender on one workload."""

    workload: str
    """Workload name."""
    contender: str
    """Contender slug."""
    status: str
    """``ok``, ``FAIL`` (results differ from serial), ``timeout``, ``error`` or ``n/a``."""
    times_s: tuple[float, ...] = ()
    """Wall time of each timed run that finished, pool start and shutdown included."""
    median_s: float | None = None
    """Median of ``times_s`` (on ``n_items`` items)."""
    n_items: int = 0
    """Items actually run (fewer than ``n_total`` where the contender is capped)."""
    n_total: int = 0
    """Items in the workload."""
    scaled_s: float | None = None
    """Estimate for ``n_total`` items, set only when capped: ``fixed_s`` plus the
    rest of ``median_s`` scaled linearly by ``n_total / n_items``."""
    fixed_s: float | None = None
    """Time of the same contender on one item (start-up and shutdown), when capped."""
    detail: str = ""
    """Error message, or where results first differ from serial."""

    @property
    def time_s(self) -> float | None:
        """The time to compare: the scaled time where capped, else the median."""
        return self.scaled_s if self.scaled_s is not None else self.median_s


@dataclass(frozen=True)
class SweepPoint:
    """One contender at one worker count on one CPU workload."""

    workload: str
    """Workload name."""
    contender: str
    """Contender slug."""
    workers: int
    """Worker count asked for."""
    status: str
    """As in :class:`Cell`."""
    times_s: tuple[float, ...] = ()
    """Wall time of each timed run."""
    median_s: float | None = None
    """Median of ``times_s``."""
    serial_s: float | None = None
    """The serial loop's median on the same items."""
    speedup: float | None = None
    """``serial_s / median_s``."""
    efficiency: float | None = None
    """``speedup / min(workers, cores)``: the share of the usable cores turned into speed."""
    detail: str = ""
    """Error message, if any."""


@dataclass
class Results:
    """Everything a run produced; the report is made from this alone."""

    config: Config
    machine: dict[str, Any]
    command: str
    started: str
    cells: list[Cell] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    workload_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    finished: str | None = None


# ------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, Python, package versions and BLAS thread pools."""
    import numpy  # noqa: F401  (loads BLAS so threadpoolctl can see it)
    import psutil
    from threadpoolctl import threadpool_info

    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    affinity: int | None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    env_keys = (
        "OPENBLAS_CORETYPE",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "PYTHONHASHSEED",
    )
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": affinity,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "start_method": _default_start_method(),
        "packages": versions,
        "threadpools": threadpool_info(),
        "env": {k: os.environ[k] for k in env_keys if k in os.environ},
        "git_commit": _git_commit(),
        # Other processes on a shared machine skew every number: say how busy it was.
        "loadavg_start": list(os.getloadavg()),
    }


def _default_start_method() -> str:
    import multiprocessing

    return multiprocessing.get_start_method(allow_none=False)


def default_sweep(cores: int | None = None) -> tuple[int, ...]:
    """1, 2, 4, 8, 16 workers, capped at twice the cores."""
    n = cores or os.cpu_count() or 1
    return tuple(w for w in (1, 2, 4, 8, 16) if w <= 2 * n)


# ------------------------------------------------------------------ watchdog


def _kill_children() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        if child.pid in httpserver.PROTECTED_PIDS:
            continue
        with contextlib.suppress(psutil.Error):
            child.kill()


ABANDONED: list[str] = []
"""Runs the watchdog had to interrupt. Their pools may have left threads that
never end, so the command line exits with os._exit once results are written."""


class _Watchdog:
    """Stops one timed run that outlives its budget (see the module docstring)."""

    def __init__(self, budget_s: float, on_abort: Callable[[], None]) -> None:
        self.budget_s = budget_s
        self.fired = False
        self._on_abort = on_abort
        self._done = threading.Event()
        # Held while deciding to interrupt, so that finish() never races a late SIGINT.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="benchmarks-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        with self._lock:
            self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.budget_s):
            return
        with self._lock:
            if self._done.is_set():
                return
            self.fired = True
            ABANDONED.append(f"interrupted after {self.budget_s:g} s")
            # A real signal to the main thread, so that a blocking wait there
            # returns EINTR and raises KeyboardInterrupt, as a user's Ctrl-C would.
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        if self._done.wait(_GRACE_S):
            return
        print("watchdog: run ignored the interrupt; killing child processes", file=sys.stderr)
        _kill_children()
        if self._done.wait(_GRACE_S):
            return
        print("watchdog: run still stuck; writing partial results and exiting", file=sys.stderr)
        faulthandler.dump_traceback(all_threads=True)
        try:
            self._on_abort()
        finally:
            os._exit(3)


# ------------------------------------------------------------------ measuring


@dataclass
class _Outcome:
    status: str
    elapsed_s: float | None = None
    out: list[Any] | None = None
    detail: str = ""


def _first_difference(workload: Workload, got: Sequence[Any], want: Sequence[Any]) -> str:
    if len(got) != len(want):
        return f"{len(got)} results, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if not workload.same([g], [w]):
            return f"item {i}: got {g!r:.60}, expected {w!r:.60}"
    return "results differ"


def _guarded(fn: Callable[[], object], budget_s: float, on_abort: Callable[[], None]) -> str:
    """Run an untimed step (a pool's prepare or cleanup) under a watchdog.

    Returns "" on success, else what went wrong: a shutdown that hangs must
    not hang the whole suite.
    """
    watchdog = _Watchdog(budget_s, on_abort)
    try:
        with watchdog:
            fn()
            watchdog.finish()
    except KeyboardInterrupt:
        if not watchdog.fired:
            raise
        return f"{getattr(fn, '__name__', fn)} hung for {budget_s:g} s and was interrupted"
    except Exception as exc:
        return f"{getattr(fn, '__name__', fn)} raised {type(exc).__name__}: {exc}"[:300]
    return ""


def _timed(
    contender: Contender,
    job: Job,
    budget_s: float,
    on_abort: Callable[[], None],
) -> _Outcome:
    reset = job.workload.reset
    if contender.prepare is not None:
        problem = _guarded(contender.prepare, budget_s, on_abort)
        if problem:
            return _Outcome("error", detail=f"before the run: {problem}")
    if reset is not None:
        reset()
    watchdog = _Watchdog(budget_s, on_abort)
    outcome: _Outcome
    try:
        with watchdog:
            t0 = time.perf_counter()
            out = contender.run(job)
            elapsed_s = time.perf_counter() - t0
            watchdog.finish()
        outcome = _Outcome("ok", elapsed_s, list(out))
    except KeyboardInterrupt:
        if not watchdog.fired:
            raise
        outcome = _Outcome("timeout", detail=f"stopped after {budget_s:g} s")
    except Exception as exc:
        if watchdog.fired:
            outcome = _Outcome("timeout", detail=f"stopped after {budget_s:g} s ({exc!r:.80})")
        else:
            outcome = _Outcome("error", detail=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        if reset is not None:
            reset()
    return outcome


def _measure(
    contender: Contender,
    *,
    job: Job,
    reference: Sequence[Any] | None,
    config: Config,
    on_abort: Callable[[], None],
    first: _Outcome | None = None,
) -> tuple[str, list[float], str, list[Any] | None]:
    """Repeat timed runs; returns (status, times, detail, first output)."""
    times: list[float] = []
    first_out: list[Any] | None = None
    status, detail = "ok", ""
    for i in range(config.repeat):
        outcome = first if (i == 0 and first is not None) else None
        if outcome is None:
            outcome = _timed(contender, job, config.budget_s, on_abort)
        if outcome.status != "ok" or outcome.elapsed_s is None or outcome.out is None:
            status, detail = outcome.status, outcome.detail
            break
        if first_out is None:
            first_out = outcome.out
        if reference is not None and not job.workload.same(outcome.out, reference):
            status = "FAIL"
            detail = _first_difference(job.workload, outcome.out, reference)
        times.append(outcome.elapsed_s)
        if status == "FAIL":
            break
        spent = sum(times)
        if spent + times[-1] > config.cell_s:
            break
    return status, times, detail, first_out


def _selected_contenders(config: Config) -> list[Contender]:
    chosen = [CONTENDERS[s] for s in config.contenders]
    # The serial loop gives the reference results: run it first when chosen.
    chosen.sort(key=lambda c: c.slug != "serial")
    return chosen


class _Suite:
    def __init__(
        self,
        config: Config,
        out_dir: Path,
        command: str,
        contenders: Sequence[Contender] | None,
        write: Callable[[Results, Path], object],
    ) -> None:
        self.config = config
        self.out_dir = out_dir
        self.contenders = list(contenders) if contenders else _selected_contenders(config)
        self.write = write
        self.results = Results(
            config=config,
            machine=machine_info(),
            command=command,
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def save(self) -> None:
        self.write(self.results, self.out_dir)

    def cleanup(self, contender: Contender, workload: str) -> None:
        if contender.cleanup is None:
            return
        problem = _guarded(contender.cleanup, self.config.budget_s, self.save)
        if problem:
            note = f"{contender.name} on {workload}, after the runs: {problem}"
            self.results.notes.append(note)
            self.log(f"  ! {note}")

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def run_workload(self, workload: Workload) -> None:
        n = self.config.sizes.get(workload.name, workload.size(self.config.quick))
        with workload.setup() as base:
            items = workload.make_items(n, base)
            serial = CONTENDERS["serial"]
            self.log(f"[{workload.name}] {n} items: serial reference")
            ref_run = _timed(serial, Job(workload, items), self.config.budget_s, self.save)
            if ref_run.out is None:
                raise RuntimeError(f"serial reference failed on {workload.name}: {ref_run.detail}")
            reference = ref_run.out
            info: dict[str, Any] = {
                "title": workload.title,
                "description": workload.description,
                "kind": workload.kind,
                "n_items": n,
                "coroutine_variant": workload.afn is not None,
            }
            if ref_run.elapsed_s is not None:
                info["serial_per_item_ms"] = 1e3 * ref_run.elapsed_s / n
            self.results.workload_info[workload.name] = info
            previous: str | None = None
            for idx, contender in enumerate(self.contenders):
                cell = self._run_cell(
                    workload=workload,
                    contender=contender,
                    items=items,
                    reference=reference,
                    ref_run=ref_run,
                    previous=previous,
                )
                self.results.cells.append(cell)
                previous = contender.slug if cell.status == "ok" else None
                if cell.median_s is not None:
                    self.log(
                        f"  {contender.name:32} {cell.status:7} {cell.median_s:9.3f} s"
                        f"  ({len(cell.times_s)} run(s){', capped' if cell.scaled_s else ''})"
                    )
                else:
                    self.log(f"  {contender.name:32} {cell.status:7} {cell.detail}")
                nxt = self.contenders[idx + 1] if idx + 1 < len(self.contenders) else None
                if contender.cleanup is not None and not (nxt and nxt.warm_of == contender.slug):
                    self.cleanup(contender, workload.name)
            serial_cell = next(
                (
                    c
                    for c in self.results.cells
                    if c.workload == workload.name and c.contender == "serial"
                ),
                None,
            )
            if serial_cell is not None and serial_cell.median_s is not None:
                info["serial_per_item_ms"] = 1e3 * serial_cell.median_s / n
        self.save()

    def _run_cell(
        self,
        *,
        workload: Workload,
        contender: Contender,
        items: list[Any],
        reference: list[Any],
        ref_run: _Outcome,
        previous: str | None,
    ) -> Cell:
        n_total = len(items)
        if contender.coroutine and workload.afn is None:
            return Cell(workload.name, contender.slug, "n/a", n_total=n_total)
        cap = contender.item_caps.get(workload.name)
        n_items = min(n_total, cap) if cap else n_total
        job = Job(workload, items[:n_items])
        if contender.warm_of is not None and previous != contender.warm_of:
            # Not right after its cold row: warm the pool with one untimed run.
            _timed(replace(contender, prepare=None), job, self.config.budget_s, self.save)
        first = ref_run if contender.slug == "serial" else None
        status, times, detail, _ = _measure(
            contender,
            job=job,
            reference=reference[:n_items],
            config=self.config,
            on_abort=self.save,
            first=first,
        )
        median_s = statistics.median(times) if times else None
        scaled_s = fixed_s = None
        if median_s is not None and n_items < n_total:
            # Scale only the per-item part: the pool's start and shutdown are
            # paid once whatever the size, so time one item for that fixed cost.
            one = _timed(contender, Job(workload, items[:1]), self.config.budget_s, self.save)
            fixed_s = min(one.elapsed_s or 0.0, median_s)
            scaled_s = fixed_s + (median_s - fixed_s) * n_total / n_items
        return Cell(
            workload=workload.name,
            contender=contender.slug,
            status=status,
            times_s=tuple(times),
            median_s=median_s,
            n_items=n_items,
            n_total=n_total,
            scaled_s=scaled_s,
            fixed_s=fixed_s,
            detail=detail,
        )

    def run_sweep(self, workload: Workload) -> None:
        cores = self.results.machine.get("usable_cores") or os.cpu_count() or 1
        n = self.config.sizes.get(workload.name, workload.size(self.config.quick))
        items = workload.make_items(n, "")
        # The serial baseline is timed again here, next to the points it
        # divides: on a shared machine the load drifts between the main table
        # and the sweep, and a stale baseline shows speedups above the core count.
        _, serial_times, _, reference = _measure(
            CONTENDERS["serial"],
            job=Job(workload, items),
            reference=None,
            config=self.config,
            on_abort=self.save,
        )
        serial_s = statistics.median(serial_times) if serial_times else None
        if reference is None:
            raise RuntimeError(f"serial reference failed on {workload.name}")
        slugs = [s for s in SWEEP_CONTENDERS if s in self.config.contenders]
        for slug in slugs:
            contender = CONTENDERS[slug]
            for workers in self.config.sweep_workers:
                job = Job(workload, items, workers=workers)
                status, times, detail, _ = _measure(
                    contender, job=job, reference=reference, config=self.config, on_abort=self.save
                )
                if contender.cleanup is not None:
                    self.cleanup(contender, workload.name)
                median_s = statistics.median(times) if times else None
                speedup = efficiency = None
                if median_s and serial_s:
                    speedup = serial_s / median_s
                    efficiency = speedup / min(workers, cores)
                self.results.sweep.append(
                    SweepPoint(
                        workload=workload.name,
                        contender=slug,
                        workers=workers,
                        status=status,
                        times_s=tuple(times),
                        median_s=median_s,
                        serial_s=serial_s,
                        speedup=speedup,
                        efficiency=efficiency,
                        detail=detail,
                    )
                )
                shown = f"{median_s:.3f} s x{speedup:.2f}" if median_s and speedup else detail
                self.log(f"  sweep {workload.name} {contender.name:28} w={workers:<3} {shown}")
        self.save()


def _profile_powerpool(config: Config, out_dir: Path, log: Callable[[str], None]) -> list[str]:
    """cProfile of pp.map in this process (the parent's share of the overhead)."""
    import powerpool as pp

    written: list[str] = []
    for name in ("trivial", "cpu5ms"):
        workload = WORKLOADS[name]
        n = config.sizes.get(name, workload.size(config.quick))
        items = workload.make_items(n, "")
        shutdown_powerpool_warm_pools()
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        pp.map(workload.fn, items)
        profiler.disable()
        elapsed_s = time.perf_counter() - t0
        shutdown_powerpool_warm_pools()
        text = io.StringIO()
        text.write(f"pp.map({workload.fn.__name__}, {n} items): {elapsed_s:.3f} s wall\n\n")
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        path = out_dir / f"profile-{name}.txt"
        path.write_text(text.getvalue())
        written.append(path.name)
        log(f"profile written: {path}")
    return written


def run_suite(
    config: Config,
    out_dir: Path,
    *,
    command: str = "",
    contenders: Sequence[Contender] | None = None,
    write: Callable[[Results, Path], object] | None = None,
) -> Results:
    """Run every selected workload with every selected contender, then the sweep.

    ``contenders`` replaces the registry lookup (tests inject their own);
    ``write`` is called after each workload with the results so far.
    """
    from . import report

    writer = write or report.write_json
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = _Suite(config, out_dir, command, contenders, writer)
    if any(c.slug.startswith("pp-") for c in suite.contenders) and not has_warm_shutdown():
        suite.results.notes.append(
            "powerpool exposes no warm-pool shutdown function the suite could find: "
            "'cold' powerpool rows may have reused a warm pool."
        )
    try:
        for name in config.workloads:
            suite.run_workload(WORKLOADS[name])
        if config.sweep_workers:
            for name in config.workloads:
                if WORKLOADS[name].sweep:
                    suite.run_sweep(WORKLOADS[name])
        if config.profile_powerpool:
            for path in _profile_powerpool(config, out_dir, suite.log):
                suite.results.notes.append(f"cProfile of pp.map's parent-side overhead: {path}")
    finally:
        for fn in (shutdown_powerpool_warm_pools, shutdown_loky):
            problem = _guarded(fn, config.budget_s, suite.save)
            if problem:
                suite.results.notes.append(f"final cleanup: {problem}")
    suite.results.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    suite.results.machine["loadavg_end"] = list(os.getloadavg())
    suite.save()
    return suite.results

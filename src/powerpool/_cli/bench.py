"""``powerpool bench``: time a function across backends and worker counts, and fit a model.

For every (backend, workers) pair the whole sample runs on a fresh pool, and
the time includes starting it (``warm=True`` leaves start-up out), because
that is what a real run pays. Results are compared with the serial run's.

Two scaling models are fitted to each backend's speedups ``S(n)``:

* Amdahl: ``S(n) = 1 / ((1 - p) + p / n)``, where ``p`` is the parallel
  fraction; fitted by least squares on ``S`` itself (1-D, bounded to [0, 1]).
* USL (Gunther's Universal Scalability Law):
  ``S(n) = n / (1 + a (n - 1) + b n (n - 1))``; ``a`` is contention, ``b``
  coherency (the cost that makes more workers *slower*); fitted by linear
  least squares on ``n / S - 1 = a (n - 1) + b n (n - 1)``, with a, b >= 0.

Both are pure Python: the CLI needs no numpy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .inputs import Call, InputError

if TYPE_CHECKING:
    from .._recorder import RunReport

__all__ = [
    "AmdahlFit",
    "BackendFit",
    "BenchReport",
    "BenchRow",
    "UslFit",
    "default_workers_list",
    "fit_amdahl",
    "fit_usl",
    "format_bench",
    "require_matplotlib",
    "run_bench",
    "write_plot",
]

PLOT_INSTALL_HINT = "--plot needs matplotlib: pip install 'powerpool[plot]'"


@dataclass(frozen=True)
class BenchRow:
    """One measured (backend, workers) run."""

    backend: str
    """Backend name."""
    workers: int
    """Workers it used."""
    wall_s: float
    """Best wall seconds over the repeats."""
    speedup: float
    """Serial seconds / ``wall_s``."""
    efficiency: float
    """``speedup / workers``: 1.0 means every worker was fully useful."""
    agree: bool
    """Whether its results equal the serial run's."""
    failed: int = 0
    """Items that raised (or crashed, or timed out) in this run."""
    first_error: str = ""
    """``Type: message`` of the first failure, or ""."""


@dataclass(frozen=True)
class AmdahlFit:
    """Amdahl's law fitted to measured speedups."""

    parallel_fraction: float
    """``p``: the share of serial time that parallelizes, 0..1."""
    rmse: float
    """Root-mean-square error of the fit, in speedup units."""

    @property
    def serial_fraction(self) -> float:
        """``1 - p``: the share that does not parallelize."""
        return 1.0 - self.parallel_fraction

    @property
    def max_speedup(self) -> float:
        """The limit on infinitely many workers: ``1 / (1 - p)`` (inf when p == 1)."""
        return math.inf if self.serial_fraction <= 0 else 1.0 / self.serial_fraction

    def speedup(self, workers: float) -> float:
        """The model's speedup on ``workers`` workers."""
        return 1.0 / (self.serial_fraction + self.parallel_fraction / workers)


@dataclass(frozen=True)
class UslFit:
    """The Universal Scalability Law fitted to measured speedups."""

    contention: float
    """``a``: serialization, like Amdahl's serial fraction."""
    coherency: float
    """``b``: per-pair cost of keeping workers in step; > 0 means a peak."""

    @property
    def peak_workers(self) -> float | None:
        """Worker count with the highest modelled speedup (None: no peak, more always helps)."""
        if self.coherency <= 0:
            return None
        return math.sqrt(max(0.0, 1.0 - self.contention) / self.coherency)

    def speedup(self, workers: float) -> float:
        """The model's speedup on ``workers`` workers."""
        n = workers
        return n / (1.0 + self.contention * (n - 1) + self.coherency * n * (n - 1))


@dataclass(frozen=True)
class BackendFit:
    """The models and the best measured point for one backend."""

    backend: str
    """Backend name."""
    amdahl: AmdahlFit
    """Amdahl's law fit."""
    usl: UslFit
    """USL fit."""
    best_workers: int
    """Measured worker count with the highest speedup."""
    best_speedup: float
    """That speedup."""


@dataclass(frozen=True)
class BenchReport:
    """Everything ``bench`` measured and concluded."""

    function: str
    """The function, as typed."""
    n_items: int
    """Items in the (sampled) input."""
    cpu_count: int
    """Cores this process may use."""
    warm: bool
    """Whether pool start-up was left out of the times."""
    serial_s: float
    """Best serial seconds (the baseline)."""
    rows: tuple[BenchRow, ...]
    """Every measured pair, baseline first."""
    fits: tuple[BackendFit, ...]
    """One per parallel backend."""

    @property
    def all_agree(self) -> bool:
        """Every run gave the serial run's results."""
        return all(row.agree for row in self.rows)

    @property
    def best(self) -> BenchRow:
        """The fastest row."""
        return min(self.rows, key=lambda row: row.wall_s)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``--json`` (infinities become None)."""
        data = asdict(self)
        for fit, raw in zip(self.fits, data["fits"], strict=True):
            raw["amdahl"]["serial_fraction"] = fit.amdahl.serial_fraction
            raw["amdahl"]["max_speedup"] = _finite(fit.amdahl.max_speedup)
            raw["usl"]["peak_workers"] = fit.usl.peak_workers
        best = self.best
        data["best"] = {"backend": best.backend, "workers": best.workers, "wall_s": best.wall_s}
        data["all_agree"] = self.all_agree
        return data


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# -- fitting ------------------------------------------------------------------------


def fit_amdahl(points: Sequence[tuple[int, float]]) -> AmdahlFit:
    """Least-squares ``p`` for ``S(n) = 1 / ((1 - p) + p / n)`` over (workers, speedup) points."""
    if not points:
        return AmdahlFit(parallel_fraction=0.0, rmse=0.0)

    def sse(p: float) -> float:
        return sum((s - 1.0 / ((1.0 - p) + p / n)) ** 2 for n, s in points)

    # A grid first (the error can be flat where all n are small), then golden
    # section inside the best cell: robust and needs no derivatives.
    grid = [i / 200 for i in range(201)]
    best = min(grid, key=sse)
    lo, hi = max(0.0, best - 0.005), min(1.0, best + 0.005)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a = hi - ratio * (hi - lo)
        b = lo + ratio * (hi - lo)
        if sse(a) <= sse(b):
            hi = b
        else:
            lo = a
    p = (lo + hi) / 2
    # The optimum is often exactly at a bound (no parallelism, or perfect
    # scaling), which the search only approaches; snap to it when no worse.
    for bound in (0.0, 1.0):
        if sse(bound) <= sse(p) + 1e-12:
            p = bound
    return AmdahlFit(parallel_fraction=p, rmse=math.sqrt(sse(p) / len(points)))


def fit_usl(points: Sequence[tuple[int, float]]) -> UslFit:
    """Least squares for ``n / S - 1 = a (n - 1) + b n (n - 1)`` with a, b >= 0."""
    rows = [(n - 1.0, n * (n - 1.0), n / s - 1.0) for n, s in points if s > 0 and n > 1]
    if not rows:
        return UslFit(contention=0.0, coherency=0.0)

    def one(k: int) -> float:  # fit a single coefficient through the origin
        den = sum(r[k] ** 2 for r in rows)
        return max(0.0, sum(r[k] * r[2] for r in rows) / den) if den else 0.0

    sxx = sum(x * x for x, _, _ in rows)
    sxz = sum(x * z for x, z, _ in rows)
    szz = sum(z * z for _, z, _ in rows)
    sxy = sum(x * y for x, _, y in rows)
    szy = sum(z * y for _, z, y in rows)
    det = sxx * szz - sxz * sxz
    if abs(det) > 1e-12 * max(1.0, sxx * szz):
        a = (sxy * szz - szy * sxz) / det
        b = (szy * sxx - sxy * sxz) / det
        if a >= 0 and b >= 0:
            return UslFit(contention=a, coherency=b)
    # The unconstrained optimum breaks a >= 0 or b >= 0 (or only one n > 1 was
    # measured): the constrained optimum then lies on an edge; take the better one.
    edges = [UslFit(one(0), 0.0), UslFit(0.0, one(1))]

    def err(fit: UslFit) -> float:
        return sum((y - fit.contention * x - fit.coherency * z) ** 2 for x, z, y in rows)

    return min(edges, key=err)


def _fit_backend(backend: str, rows: Sequence[BenchRow]) -> BackendFit:
    points = [(row.workers, row.speedup) for row in rows]
    best = max(rows, key=lambda row: row.speedup)
    return BackendFit(
        backend=backend,
        amdahl=fit_amdahl(points),
        usl=fit_usl(points),
        best_workers=best.workers,
        best_speedup=best.speedup,
    )


# -- measuring ----------------------------------------------------------------------


def default_workers_list(cores: int) -> list[int]:
    """1, 2, 4, ... up to the core count, and the core count itself."""
    counts = []
    n = 1
    while n < cores:
        counts.append(n)
        n *= 2
    counts.append(cores)
    return counts


def _comparable(values: list[Any]) -> tuple[list[str], int, str]:
    """Results as comparable strings, the number of failures, and the first one."""
    out: list[str] = []
    failed = 0
    first = ""
    for value in values:
        if isinstance(value, BaseException):
            text = f"{type(value).__name__}: {value}"
            failed += 1
            first = first or text
            out.append("!" + text)
        else:
            out.append(str(value))
    return out, failed, first


def run_bench(
    fn: Callable[[Call], Any],
    calls: Sequence[Call],
    *,
    function: str,
    backends: Sequence[str],
    workers_list: Sequence[int],
    repeat: int = 1,
    warm: bool = False,
    is_async: bool = False,
    chunksize: int | None = None,
    on_row: Callable[[BenchRow], None] | None = None,
    on_report: Callable[[tuple[str, int], RunReport], None] | None = None,
    **backend_options: Any,
) -> BenchReport:
    """Measure ``fn`` over ``calls`` on a serial baseline and every (backend, workers) pair.

    With ``on_report``, every run is recorded and the report of the fastest
    repeat of each pair is handed to it (the recorder costs a few percent).
    """
    import powerpool as pp

    from .._options import backend_name
    from .._system import usable_cores

    if not calls:
        raise InputError("the input has no records to benchmark")

    def measure(backend: str, workers: int) -> tuple[float, tuple[list[str], int, str]]:
        best = math.inf
        results: tuple[list[str], int, str] = ([], 0, "")
        for _ in range(repeat):
            start = time.perf_counter()
            with pp.Pool(
                backend_name(backend),
                workers=workers,
                chunksize=chunksize,
                errors="return",
                progress=False,
                **(backend_options if backend == "dask" else {}),
            ) as pool:
                if warm:
                    pool.map(fn, calls[:1])
                    start = time.perf_counter()
                values = pool.map(fn, calls, report=on_report is not None)
                recorded = pool.last_report
            elapsed = time.perf_counter() - start
            if on_report is not None and recorded is not None and elapsed < best:
                on_report((backend, workers), recorded)
            best = min(best, elapsed)
            results = _comparable(values)
        return best, results

    # An async function can only run on the asyncio backend; one coroutine at a
    # time is its "serial".
    baseline = "asyncio" if is_async else "serial"
    serial_s, (expected, failed, first) = measure(baseline, 1)
    rows = [BenchRow(baseline, 1, serial_s, 1.0, 1.0, True, failed, first)]
    if on_row is not None:
        on_row(rows[0])
    for backend in backends:
        if backend == "serial":
            continue
        for workers in workers_list:
            wall_s, (results, failed, first) = measure(backend, workers)
            speedup = serial_s / wall_s if wall_s > 0 else math.inf
            agree = results == expected
            row = BenchRow(
                backend, workers, wall_s, speedup, speedup / workers, agree, failed, first
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    fits = tuple(
        _fit_backend(backend, [row for row in rows[1:] if row.backend == backend])
        for backend in dict.fromkeys(row.backend for row in rows[1:])
    )
    return BenchReport(
        function=function,
        n_items=len(calls),
        cpu_count=usable_cores(),
        warm=warm,
        serial_s=serial_s,
        rows=tuple(rows),
        fits=fits,
    )


# -- showing ------------------------------------------------------------------------


def format_row(row: BenchRow) -> str:
    """One table line."""
    agree = "same" if row.agree else "DIFFERENT"
    if row.failed:
        agree += f" ({row.failed} failed, first: {row.first_error.splitlines()[0][:60]})"
    return (
        f"{row.backend:<10} {row.workers:>7} {row.wall_s:>9.3f}s {row.speedup:>7.2f}x "
        f"{row.efficiency:>10.0%}  {agree}"
    )


TABLE_HEADER = (
    f"{'backend':<10} {'workers':>7} {'time':>10} {'speedup':>8} {'efficiency':>10}  results"
)


def format_bench(report: BenchReport, *, with_rows: bool = True) -> str:
    """The summary ``bench`` prints (the rows are printed as they are measured)."""
    lines: list[str] = []
    if with_rows:
        lines += [TABLE_HEADER, *(format_row(row) for row in report.rows), ""]
    for fit in report.fits:
        amdahl = fit.amdahl
        limit = amdahl.max_speedup
        limit_text = (
            "no limit in sight" if math.isinf(limit) else f"at most {limit:.1f}x with any workers"
        )
        peak = fit.usl.peak_workers
        peak_text = "no peak in range" if peak is None else f"peaks near {peak:.0f} workers"
        lines.append(
            f"{fit.backend}: Amdahl serial fraction {amdahl.serial_fraction:.1%} "
            f"(fit rmse {amdahl.rmse:.2f}) -> {limit_text}; USL {peak_text}; "
            f"best measured {_workers(fit.best_workers)} ({fit.best_speedup:.2f}x)"
        )
    best = report.best
    lines.append(
        f"best: {best.backend} with {_workers(best.workers)}, {best.speedup:.2f}x as fast as serial"
    )
    if not report.all_agree:
        lines.append("RESULTS DIFFER from the serial run (see the results column)")
    return "\n".join(lines)


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def require_matplotlib() -> None:
    """Fail early, before measuring, when --plot can't be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(PLOT_INSTALL_HINT) from None


def write_plot(report: BenchReport, path: str) -> None:
    """A PNG of speedup against workers, one line per backend, the ideal and Amdahl's fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        top = max(row.workers for row in report.rows)
        ax.plot([1, top], [1, top], color="gray", linestyle="--", label="ideal (speedup = workers)")
        for fit in report.fits:
            rows = [row for row in report.rows if row.backend == fit.backend]
            line = ax.plot(
                [row.workers for row in rows],
                [row.speedup for row in rows],
                marker="o",
                label=f"{fit.backend} (measured)",
            )
            xs = [1 + i * (top - 1) / 50 for i in range(51)]
            ax.plot(
                xs,
                [fit.amdahl.speedup(x) for x in xs],
                color=line[0].get_color(),
                linestyle=":",
                label=f"{fit.backend} Amdahl fit, serial {fit.amdahl.serial_fraction:.0%}",
            )
        ax.axhline(1.0, color="black", linewidth=0.5)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("workers")
        ax.set_ylabel("speedup over serial")
        ax.set_title(f"{report.function}: {report.n_items} items, {report.cpu_count} cores")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)

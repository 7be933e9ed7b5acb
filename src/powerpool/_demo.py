"""``powerpool demo``: the classic exercise, timed side by side.

Check a built-in list of large numbers for primality by trial division in pure
Python, four ways: sequentially, with threads, with processes and with
``auto``; then say why each took as long as it did.

The numbers are primes and products of two primes close to the square root,
so every check runs the whole loop (tens of milliseconds each): the work is
pure-Python CPU, evenly spread. :func:`is_prime` lives here, in an importable
module, so process workers can import it by name.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._plan import Plan

__all__ = [
    "DemoReport",
    "DemoRow",
    "Size",
    "expected",
    "format_demo",
    "format_report",
    "format_rows",
    "is_prime",
    "numbers",
    "python_version",
    "run_demo",
    "why_auto",
]

Size = Literal["small", "full"]

# Each near 10**12: about 55 ms of trial division on a 2020s core.
_SMALL_PRIMES = (
    1023493860743, 1080437282657, 1027074405937, 1074153560141, 1086952328699, 1049384828399,
    1070505633803, 1084730080319, 1029906929533, 1074343861951, 1045973586769, 1010820528979,
)  # fmt: skip
# Products of two primes within 3% of 10**6: the smallest factor is near the
# square root, so trial division costs as much as for a prime.
_SMALL_COMPOSITES = (
    1019207118191, 1005177298211, 1017071271833, 1009117545211, 1020309524813, 1019968430077,
    991859651257, 1004773693067, 985414130629, 1006727596957, 1004173916401, 989293974329,
)  # fmt: skip
# Each near 2 * 10**12: about 80 ms.
_FULL_PRIMES = (
    2104484173391, 2095910168351, 2054948345077, 2117362054771, 2087679111241, 2058272777689,
    2061877487149, 2009468217049, 2063350376341, 2007567380149, 2088071054591, 2114697775901,
)  # fmt: skip
_FULL_COMPOSITES = (
    2007268222121, 2026128825533, 1982848198997, 2016661981811, 1971013090073, 2019360604633,
    2053282166917, 1976815987603, 2033002332863, 2001910435873, 1998711452581, 1982306262683,
)  # fmt: skip


def is_prime(n: int) -> bool:
    """Trial division by 2, 3 and then 6k +/- 1 up to sqrt(n): slow on purpose, pure Python."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    if n % 3 == 0:
        return n == 3
    i = 5
    while i * i <= n:
        if n % i == 0 or n % (i + 2) == 0:
            return False
        i += 6
    return True


def _interleave(primes: Sequence[int], composites: Sequence[int]) -> list[int]:
    return [n for pair in zip(primes, composites, strict=True) for n in pair]


def numbers(size: Size = "small") -> list[int]:
    """The demo's input: 24 numbers (small) or 48 (full), primes and composites alternating."""
    out = _interleave(_SMALL_PRIMES, _SMALL_COMPOSITES)
    if size == "full":
        out += _interleave(_FULL_PRIMES, _FULL_COMPOSITES)
    return out


def expected(size: Size = "small") -> list[bool]:
    """The right answers, known in advance, in the order of :func:`numbers`."""
    return [n in _SMALL_PRIMES or n in _FULL_PRIMES for n in numbers(size)]


@dataclass(frozen=True)
class DemoRow:
    """One way of running the check, measured."""

    mode: str
    """``sequential``, ``threads``, ``asyncio`` (I/O demo), ``processes`` or ``auto``."""
    backend: str
    """The powerpool backend that did the work."""
    workers: int
    """Workers (threads or processes) that backend used."""
    wall_s: float
    """Seconds from creating the pool to having every answer (start-up included)."""
    speedup: float
    """Sequential seconds divided by this row's seconds."""
    agree: bool
    """Whether every answer was right."""
    why: str
    """One line: why it took as long as it did."""


@dataclass(frozen=True)
class DemoReport:
    """The whole demo, ready to print or to dump as JSON."""

    size: str
    """``small`` or ``full``."""
    n_numbers: int
    """How many numbers were checked."""
    n_primes: int
    """How many of them are prime."""
    cpu_count: int
    """Cores this process may use."""
    python: str
    """Python implementation and version, with the GIL's state."""
    rows: tuple[DemoRow, ...]
    """Sequential, threads, processes, auto: in that order."""
    span: str = ""
    """Where the numbers lie, in words (``near 10^12``)."""

    @property
    def all_agree(self) -> bool:
        """Every row gave every right answer."""
        return all(row.agree for row in self.rows)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``--json``."""
        return {**asdict(self), "all_agree": self.all_agree}


def gil_enabled() -> bool:
    """False on a free-threaded build running without the GIL."""
    check = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def python_version() -> str:
    """``CPython 3.11.7 (GIL enabled)``."""
    gil = "GIL enabled" if gil_enabled() else "no GIL"
    return f"{platform.python_implementation()} {platform.python_version()} ({gil})"


def run_demo(size: Size = "small") -> DemoReport:
    """Run the check four ways and return what was measured."""
    import powerpool as pp

    from ._options import backend_name
    from ._system import usable_cores

    cores = usable_cores()
    data = numbers(size)
    truth = expected(size)

    def timed(backend: str, workers: int | None) -> tuple[float, list[bool], Plan | None]:
        start = time.perf_counter()
        with pp.Pool(backend_name(backend), workers=workers, progress=False) as pool:
            results = pool.map(is_prime, data)
            plan = pool.last_plan
        return time.perf_counter() - start, results, plan

    rows: list[DemoRow] = []
    base_s, results, _ = timed("serial", None)
    rows.append(
        DemoRow("sequential", "serial", 1, base_s, 1.0, results == truth,
                "the baseline: one core, one number after another")
    )  # fmt: skip
    for mode in ("threads", "processes"):
        wall_s, results, _ = timed(mode, cores)
        speedup = base_s / wall_s
        why = _why_threads(cores, speedup) if mode == "threads" else _why_processes(cores, speedup)
        rows.append(DemoRow(mode, mode, cores, wall_s, speedup, results == truth, why))
    wall_s, results, plan = timed("auto", None)
    backend = plan.backend if plan is not None else "?"
    workers = plan.workers if plan is not None else 0
    rows.append(
        DemoRow("auto", backend, workers, wall_s, base_s / wall_s, results == truth,
                why_auto(plan))
    )  # fmt: skip
    return DemoReport(
        size=size,
        n_numbers=len(data),
        n_primes=sum(truth),
        cpu_count=cores,
        python=python_version(),
        rows=tuple(rows),
        span="near 10^12" if size == "small" else "between 10^12 and 2.1 * 10^12",
    )


def format_rows(rows: Sequence[DemoRow]) -> list[str]:
    """The table of rows (time, speedup, answers), then one line per row saying why."""
    lines = [f"{'mode':<11} {'backend':<10} {'workers':>7} {'time':>8} {'speedup':>8}  answers"]
    for row in rows:
        lines.append(
            f"{row.mode:<11} {row.backend:<10} {row.workers:>7} {row.wall_s:>7.2f}s "
            f"{row.speedup:>7.2f}x  {'right' if row.agree else 'WRONG'}"
        )
    lines += ["", "why:"]
    lines += [f"  {row.mode:<11} {row.why}" for row in rows]
    return lines


def _why_threads(cores: int, speedup: float) -> str:
    if cores == 1:
        return "one core: there is nothing to run in parallel on"
    if not gil_enabled():
        return f"this Python runs without the GIL, so {cores} threads computed at once"
    verdict = "slower" if speedup < 0.9 else "no faster"
    return (
        f"{verdict}: pure-Python CPU work holds the GIL, so the {cores} threads "
        "took turns on one core"
    )


def _why_processes(cores: int, speedup: float) -> str:
    if cores == 1:
        return "one core: processes only add start-up cost"
    why = f"each process has its own interpreter and GIL, so {cores} cores computed at once"
    if speedup < 0.65 * cores:
        return (
            f"{why}; only {speedup:.1f}x here: other programs are using the cores, "
            "or start-up took a big share"
        )
    return f"{why} (minus the cost of starting them)"


def why_auto(plan: Plan | None, measured: str = "the first items") -> str:
    """The auto row's "why": what it measured and what it chose."""
    if plan is None:
        return "auto chose without measuring"
    from ._cli.profile import describe_auto

    chose = plan.backend if plan.backend == "serial" else f"{plan.backend} x{plan.workers}"
    return f"measured {measured} ({describe_auto(plan)}) and chose {chose}"


def format_report(report: DemoReport) -> str:
    """The table ``powerpool demo`` prints, then one line per row saying why."""
    headline = (
        f"Is each of {report.n_numbers} numbers {report.span} prime? "
        f"({report.n_primes} are; trial division in pure Python)"
    )
    return format_demo(headline, report.cpu_count, report.python, report.rows)


def format_demo(headline: str, cores: int, python: str, rows: Sequence[DemoRow]) -> str:
    """A demo's whole text: what it does, the machine, the table, the why lines, the verdict."""
    count = {4: "four", 5: "five"}.get(len(rows), str(len(rows)))
    return "\n".join(
        [
            headline,
            f"machine: {cores} usable cores ({os.cpu_count()} logical), {python}",
            "",
            *format_rows(rows),
            "",
            f"All {count} ways gave the same, right answers."
            if all(row.agree for row in rows)
            else "RESULTS DISAGREE: some way gave a wrong answer (a bug: please report it).",
        ]
    )

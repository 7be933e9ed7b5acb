"""Command line: ``python -m benchmarks [--quick] [--only ...] [--contenders ...] ...``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from . import report
from .contenders import CONTENDERS
from .runner import ABANDONED, Config, default_sweep, run_suite
from .workloads import WORKLOADS


def _names(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown)}; choose from: {', '.join(known)}"
        )
    return names


def _contender_names(text: str) -> tuple[str, ...]:
    # Accept the slug or the row label ("pp-auto" or "powerpool auto").
    by_name = {c.name.lower(): c.slug for c in CONTENDERS.values()}
    raw = [n.strip() for n in text.split(",") if n.strip()]
    slugs = ",".join(by_name.get(n.lower(), n) for n in raw)
    return _names(slugs, list(CONTENDERS), "contender")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("worker counts must be >= 1")
    return values


def _sizes(text: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in WORKLOADS or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected WORKLOAD=N[,...], got {part!r}")
        sizes[name.strip()] = int(value)
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time powerpool against serial, the stdlib pools, joblib, MPIRE and dask.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 run per cell")
    p.add_argument(
        "--only",
        type=lambda t: _names(t, list(WORKLOADS), "workload"),
        metavar="WORKLOAD,...",
        help=f"workloads to run (default all: {','.join(WORKLOADS)})",
    )
    p.add_argument(
        "--contenders",
        type=_contender_names,
        metavar="NAME,...",
        help=f"contenders to run (default all: {','.join(CONTENDERS)})",
    )
    p.add_argument(
        "--workers-sweep",
        type=_ints,
        metavar="N,...",
        help="worker counts for the CPU sweep (default 1,2,4,8,16 capped at 2 x cores)",
    )
    p.add_argument("--no-sweep", action="store_true", help="skip the worker sweep")
    p.add_argument("--repeat", type=int, help="timed runs per cell, median kept (default 3)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="stop a run after this long and record 'timeout' (default 60)",
    )
    p.add_argument(
        "--cell-s",
        type=float,
        default=6.0,
        help="stop repeating a cell once another run would pass this many seconds (default 6)",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default={},
        metavar="WORKLOAD=N,...",
        help="override item counts",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    p.add_argument(
        "--profile-powerpool",
        action="store_true",
        help="also cProfile pp.map on the trivial and 5 ms workloads (parent side)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="redraw results.md and the plots from OUT/results.json without running",
    )
    p.add_argument("--list", action="store_true", help="list workloads and contenders")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns the exit status (1 when any cell FAILed or errored)."""
    args = _parser().parse_args(argv)
    if args.list:
        for w in WORKLOADS.values():
            print(f"workload  {w.name:10} {w.n_default:>8,} items  {w.description}")
        for c in CONTENDERS.values():
            print(f"contender {c.slug:15} {c.name:30} {c.how}")
        return 0
    if args.report_only:
        for path in report.write_all(report.load(args.out), args.out):
            print(path)
        return 0
    if args.repeat is not None and args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    sweep: tuple[int, ...] = ()
    if not args.no_sweep:
        sweep = args.workers_sweep or (default_sweep()[:2] if args.quick else default_sweep())
    config = Config(
        quick=args.quick,
        workloads=args.only or tuple(WORKLOADS),
        contenders=args.contenders or tuple(CONTENDERS),
        sweep_workers=sweep,
        repeat=args.repeat or (1 if args.quick else 3),
        budget_s=args.budget_s,
        cell_s=args.cell_s,
        sizes=args.sizes,
        profile_powerpool=args.profile_powerpool,
    )
    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = run_suite(config, args.out, command=command.strip())
    data = report.to_json(results)
    written = [report.write_json(results, args.out), *report.write_all(data, args.out)]
    for path in written:
        print(path)
    bad = [c for c in results.cells if c.status in ("FAIL", "error")]
    status = 1 if bad else 0
    if ABANDONED:
        # An interrupted pool may have left a thread that never ends, which
        # would hang the interpreter's exit; the results are written already.
        print(f"{len(ABANDONED)} run(s) were interrupted; exiting hard", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())

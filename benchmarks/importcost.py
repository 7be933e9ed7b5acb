"""What a cold script pays for imports before its first ``pp.map`` starts work.

``python -m benchmarks.importcost [--repeat N] [--baseline SRC] [--json PATH]``

Every figure is the median of ``--repeat`` fresh interpreters, the rows taken
in turn (a, b, c, d, a, b, ...) so a drifting load hits them alike:

* **import powerpool**: ``import powerpool`` alone.
* **pp.map's imports**: ``import powerpool`` plus every module the caller's
  process holds after a first ``pp.map(f, range(8))`` (auto), imported in the
  order that run imported them. The list comes from one real run per
  session; timing the imports alone keeps the workers' start and the items
  out of the figure.
* **import multiprocessing.pool**, and **mp.Pool's imports**: the same two for
  ``with multiprocessing.Pool() as p: p.map(f, range(8))``, the peer.
* **cold script**: the whole script, the clock read before its first import:
  when the first item started on a worker (``first``) and when the map
  returned (``total``), for ``pp.map`` and ``multiprocessing.Pool``. This
  one counts what the workers import too, and the fork.
* with ``--baseline SRC``: the powerpool rows again for the powerpool
  package under the folder SRC (another checkout's ``src``), to compare a
  change with what it changed in the same run.

Bytecode must be compiled (Python writes it on the first import unless
``PYTHONDONTWRITEBYTECODE`` is set: unset it), or each run compiles from source.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_RECORD = """
import json, sys
before = set(sys.modules)
{body}
print(json.dumps([m for m in sys.modules if m not in before]))
"""

_PP_MAP = """
import powerpool as pp
def f(x):
    return x * x
if __name__ == "__main__":
    pp.map(f, range(8))
"""

_MP_MAP = """
import multiprocessing
def f(x):
    return x * x
if __name__ == "__main__":
    with multiprocessing.Pool() as pool:
        pool.map(f, range(8))
"""

# The cold script: each item returns when it started; the clock is read first.
_STAMPED = """
import time
t0 = time.time()
{imports}
def f(x):
    return time.time()
if __name__ == "__main__":
    {run}
    print(min(started) - t0, time.time() - t0)
"""
_PP_STAMPED = _STAMPED.format(imports="import powerpool as pp", run="started = pp.map(f, range(8))")
_MP_STAMPED = _STAMPED.format(
    imports="import multiprocessing",
    run="with multiprocessing.Pool() as pool:\n        started = pool.map(f, range(8))",
)

_TIME = """
import importlib, time
started = time.perf_counter()
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
print(time.perf_counter() - started)
"""


def _stdout(code: str, src: str | None) -> str:
    """What ``python -c code`` prints, with powerpool from ``src`` (None: this environment's)."""
    env = None if src is None else {**os.environ, "PYTHONPATH": src}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    ).stdout


def _loaded_by(script: str, src: str | None = None) -> list[str]:
    """The modules the caller's process imports running ``script`` as ``__main__``."""
    code = _RECORD.format(body=f"exec(compile({script!r}, '<script>', 'exec'))")
    names: list[str] = json.loads(_stdout(code, src).splitlines()[-1])
    # __main__ aliases and private modules a C extension registers under a
    # dotted name of its own cannot be imported again by name.
    return [n for n in names if not n.startswith("__") and "powerpool_" not in n]


def _run(code: str, src: str | None) -> list[float]:
    return [float(word) for word in _stdout(code, src).split()]


def _table(runs: dict[str, list[list[float]]], columns: list[str], peer: str) -> None:
    """Median and min (ms) of each column per row; the first column's median over ``peer``'s."""
    peer_median = statistics.median(run[0] for run in runs[peer])
    head = "".join(f" {c + ' med':>11} {c + ' min':>11}" for c in columns)
    print(f"{'':32}{head} {'x peer':>7}")
    for name, times in runs.items():
        cells = ""
        for column in range(len(columns)):
            values = [run[column] for run in times]
            cells += f" {statistics.median(values) * 1e3:11.1f} {min(values) * 1e3:11.1f}"
        ratio = statistics.median(run[0] for run in times) / peer_median
        print(f"{name:32}{cells} {ratio:7.2f}")
    print(f"(ms; x peer: the median over {peer}'s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--baseline", metavar="SRC", help="also time powerpool from SRC")
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        sys.exit("unset PYTHONDONTWRITEBYTECODE: every run would compile from source")
    # name -> (modules, PYTHONPATH for the row; None: this environment's)
    rows: dict[str, tuple[list[str], str | None]] = {
        "import powerpool": (["powerpool"], None),
        "pp.map's imports": (["powerpool", *_loaded_by(_PP_MAP)], None),
    }
    if args.baseline:
        base = os.path.abspath(args.baseline)
        rows["import powerpool (baseline)"] = (["powerpool"], base)
        rows["pp.map's imports (baseline)"] = (["powerpool", *_loaded_by(_PP_MAP, base)], base)
    rows["import multiprocessing.pool"] = (["multiprocessing.pool"], None)
    rows["mp.Pool's imports"] = (["multiprocessing.pool", *_loaded_by(_MP_MAP)], None)
    # name -> (script, PYTHONPATH), as above
    scripts: dict[str, tuple[str, str | None]] = {"cold script: pp.map": (_PP_STAMPED, None)}
    if args.baseline:
        scripts["cold script: pp.map (baseline)"] = (_PP_STAMPED, base)
    scripts["cold script: mp.Pool"] = (_MP_STAMPED, None)
    runs: dict[str, list[list[float]]] = {name: [] for name in rows}
    cold: dict[str, list[list[float]]] = {name: [] for name in scripts}
    for _ in range(args.repeat):
        for name, (modules, src) in rows.items():
            runs[name].append(_run(_TIME.format(modules=modules), src))
        for name, (script, src) in scripts.items():
            cold[name].append(_run(script, src))
    print(f"median of {args.repeat} fresh interpreters each, {os.cpu_count()} cores\n")
    _table(runs, ["import"], "import multiprocessing.pool")
    lists = [f"{name} {len(modules)}" for name, (modules, _) in rows.items() if len(modules) > 1]
    print("modules imported: " + ", ".join(lists) + "\n")
    _table(cold, ["first", "total"], "cold script: mp.Pool")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"runs": runs, "cold": cold, "modules": rows}, out, indent=1)


if __name__ == "__main__":
    main()

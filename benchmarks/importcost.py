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
* with ``--baseline SRC``: the two powerpool rows again for the powerpool
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


def _env(src: str | None) -> dict[str, str] | None:
    return None if src is None else {**os.environ, "PYTHONPATH": src}


def _loaded_by(script: str, src: str | None = None) -> list[str]:
    """The modules the caller's process imports running ``script`` as ``__main__``."""
    code = _RECORD.format(body=f"exec(compile({script!r}, '<script>', 'exec'))")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=_env(src),
    )
    names: list[str] = json.loads(out.stdout.splitlines()[-1])
    # __main__ aliases and private modules a C extension registers under a
    # dotted name of its own cannot be imported again by name.
    return [n for n in names if not n.startswith("__") and "powerpool_" not in n]


def _time(modules: list[str], src: str | None) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _TIME.format(modules=modules)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=_env(src),
    )
    return float(out.stdout)


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
    runs: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeat):
        for name, (modules, src) in rows.items():
            runs[name].append(_time(modules, src))
    peer = statistics.median(runs["import multiprocessing.pool"])
    print(f"{'':32} {'median ms':>10} {'min ms':>8} {'x mp.pool':>10} {'modules':>8}")
    for name, times in runs.items():
        median = statistics.median(times)
        print(
            f"{name:32} {median * 1e3:10.1f} {min(times) * 1e3:8.1f}"
            f" {median / peer:10.2f} {len(rows[name][0]):8}"
        )
    print(f"(median of {args.repeat} fresh interpreters each, {os.cpu_count()} cores)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"runs": runs, "modules": rows}, out, indent=1)


if __name__ == "__main__":
    main()

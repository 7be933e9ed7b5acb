"""The benchmark suite's machinery still works (tiny sizes, a few contenders).

This does not benchmark anything: it runs the real runner, checker, watchdog
and report writers end to end on workloads of a handful of items, so that the
suite cannot rot between the occasional full runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # `benchmarks` lives beside `src`, not inside the installed package.
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.contenders import Contender, Job  # noqa: E402
from benchmarks.runner import Config, run_suite  # noqa: E402

# Python >= 3.12 warns when forking with threads alive (the runner's watchdog
# thread); the stdlib pools under test fork on Linux by design.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def _wrong(job: Job) -> list[object]:
    return [None for _ in job.items]


def _raises(job: Job) -> list[object]:
    raise ValueError("contender blew up")


def _sleeps(job: Job) -> list[object]:
    time.sleep(30)  # interrupted by the watchdog long before this ends
    return []


# Session-long helpers multiprocessing (and loky) start once, not leaks.
_HELPERS = ("multiprocessing.forkserver import main", "resource_tracker import main")


def _children() -> set[int]:
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if not any(marker in cmdline for marker in _HELPERS):
            pids.add(child.pid)
    return pids


def _no_leaks(threads_before: int, children_before: set[int]) -> None:
    # Relative to the start: other tests in the session may hold a forkserver
    # or warm pools of their own.
    assert _children() <= children_before
    deadline = time.monotonic() + 5
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before


@pytest.mark.timeout(40)
def test_suite_end_to_end(tmp_path: Path) -> None:
    from benchmarks.contenders import CONTENDERS

    threads_before = threading.active_count()
    children_before = _children()
    contenders = [
        CONTENDERS["serial"],
        CONTENDERS["tpe"],
        CONTENDERS["ppe-tuned"],
        Contender(slug="wrong", name="wrong results", how="-", run=_wrong),
        Contender(slug="raises", name="raises", how="-", run=_raises),
        Contender(
            slug="capped",
            name="capped threads",
            how="-",
            run=CONTENDERS["tpe"].run,
            item_caps={"trivial": 100},
        ),
    ]
    config = Config(
        quick=True,
        workloads=("trivial", "cpu5ms", "http"),
        contenders=("serial", "tpe", "ppe-tuned"),
        sweep_workers=(1, 2),
        repeat=2,
        sizes={"trivial": 300, "cpu5ms": 6, "http": 6},
    )
    results = run_suite(config, tmp_path, command="smoke", contenders=contenders)
    data = report.to_json(results)
    written = report.write_all(data, tmp_path)

    status = {(c.workload, c.contender): c.status for c in results.cells}
    for workload in config.workloads:
        for slug in config.contenders:
            assert status[(workload, slug)] == "ok", (workload, slug)
        assert status[(workload, "wrong")] == "FAIL"
        assert status[(workload, "raises")] == "error"
    capped = next(c for c in results.cells if c.contender == "capped" and c.workload == "trivial")
    assert capped.status == "ok"
    assert (capped.n_items, capped.n_total) == (100, 300)
    assert capped.scaled_s is not None
    assert capped.fixed_s is not None
    assert capped.scaled_s >= capped.fixed_s
    assert {(p.workload, p.workers) for p in results.sweep} == {
        ("cpu5ms", 1),
        ("cpu5ms", 2),
    }
    assert all(p.speedup is not None and p.speedup > 0 for p in results.sweep)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["logical_cores"] >= 1
    assert saved["machine"]["python"]
    assert len(saved["cells"]) == len(results.cells)
    md = (tmp_path / "results.md").read_text()
    assert "**FAIL**" in md
    assert "ThreadPoolExecutor" in md
    assert {p.name for p in written} == {"results.md", "times.png", "speedup.png"}
    assert all(p.stat().st_size > 1000 for p in written)
    _no_leaks(threads_before, children_before)


@pytest.mark.timeout(30)
def test_watchdog_records_timeout(tmp_path: Path) -> None:
    from benchmarks.contenders import CONTENDERS

    threads_before = threading.active_count()
    children_before = _children()
    config = Config(
        quick=True,
        workloads=("trivial",),
        contenders=("serial",),
        repeat=1,
        budget_s=1.0,
        sizes={"trivial": 10},
    )
    contenders = [
        CONTENDERS["serial"],
        Contender(slug="sleeps", name="sleeps", how="-", run=_sleeps),
    ]
    t0 = time.monotonic()
    results = run_suite(config, tmp_path, command="smoke", contenders=contenders)
    assert time.monotonic() - t0 < 20
    cell = next(c for c in results.cells if c.contender == "sleeps")
    assert cell.status == "timeout"
    assert cell.median_s is None
    _no_leaks(threads_before, children_before)


@pytest.mark.timeout(120)
def test_importcost_runs_and_writes_its_json(tmp_path: Path) -> None:
    """``python -m benchmarks.importcost`` end to end, one repeat."""
    out = tmp_path / "imports.json"
    # It refuses to time imports that compile from source (see its docstring).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    command = [sys.executable, "-m", "benchmarks.importcost", "--repeat", "1", "--json", str(out)]
    done = subprocess.run(
        command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, done.stderr
    assert "import powerpool" in done.stdout
    figures = json.loads(out.read_text())
    assert set(figures["runs"]) == {
        "import powerpool",
        "pp.map's imports",
        "import multiprocessing.pool",
        "mp.Pool's imports",
    }
    assert all(len(times) == 1 and times[0][0] > 0 for times in figures["runs"].values())
    assert set(figures["cold"]) == {"cold script: pp.map", "cold script: mp.Pool"}
    for first_s, total_s in figures["cold"]["cold script: pp.map"]:
        assert 0 < first_s <= total_s
    pp_modules, _src = figures["modules"]["pp.map's imports"]
    assert "powerpool._backends._processes" in pp_modules  # auto started the process engine

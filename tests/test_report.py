"""Run reports (HTML page, Perfetto trace, notebook views) and worker logs in the parent."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import powerpool as pp
import report_helpers as rh
from dask_cluster import dask_helper_threads  # noqa: F401  (a session fixture dask_cluster uses)
from powerpool._backends._worker_logs import LOG_RECORDS_PER_S
from powerpool._report_html import ROW_COLOURS

WORKERS = 2


class Collect(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected() -> Iterator[Collect]:
    handler = Collect()
    logger = logging.getLogger(rh.LOGGER)
    logger.addHandler(handler)
    logger.propagate = False  # keep pytest's own capture out of the count
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def lanes(trace: dict[str, Any]) -> dict[int, str]:
    """tid -> lane name, from the trace's thread_name metadata."""
    return {
        e["tid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "thread_name"
    }


# --------------------------------------------------------------------------- files


def test_html_and_json_reports_are_written(tmp_path: Path) -> None:
    html_path, json_path = tmp_path / "r.html", tmp_path / "r.json"
    out = pp.map(rh.nap, range(30), backend="processes", workers=WORKERS, report=str(html_path))
    assert out == list(range(30))
    pp.map(rh.nap, range(30), backend="processes", workers=WORKERS, report=json_path)
    page = html_path.read_text()
    assert page.count('class="pp-row"') == WORKERS
    # Self-contained: nothing fetched, nothing run.
    assert "<script" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert len(page) < 200_000
    trace = json.loads(json_path.read_text())
    names = set(lanes(trace).values())
    assert {"process-0", "process-1"} <= names


def test_trace_loads_the_way_perfetto_expects(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    with pp.Pool("processes", workers=WORKERS) as pool:
        pool.map(rh.nap, range(40), report=path)
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    assert isinstance(events, list)
    assert trace["displayTimeUnit"] in ("ms", "ns")
    for event in events:
        assert event["ph"] in ("X", "i", "M")
        assert isinstance(event["pid"], int)
        assert isinstance(event["tid"], int)
        if event["ph"] == "X":
            assert isinstance(event["ts"], (int, float))
            assert isinstance(event["dur"], (int, float))
            assert event["dur"] >= 0
            assert event["ts"] >= 0
        if event["ph"] == "i":
            assert event["s"] in ("t", "p", "g")
    spans = [e for e in events if e["ph"] == "X"]
    names = lanes(trace)
    chunk_lanes = {names[e["tid"]] for e in spans if e["cat"] == "chunk"}
    assert chunk_lanes == {"process-0", "process-1"}  # one lane per worker
    # Small chunks: every item has its own span, each index exactly once.
    items = sorted(e["args"]["index"] for e in spans if e["cat"] == "item")
    singles = [e["args"]["first_index"] for e in spans if e["cat"] == "chunk"]
    covered = sorted(items + [i for i in singles if i not in items])
    assert covered == list(range(40))
    # Spans on one lane never overlap: a worker runs one item at a time.
    for tid in {e["tid"] for e in spans}:
        lane = sorted(
            (e for e in spans if e["tid"] == tid and e["cat"] == "item"), key=lambda e: e["ts"]
        )
        for a, b in itertools.pairwise(lane):
            assert a["ts"] + a["dur"] <= b["ts"] + 1.0  # 1 us of float rounding


def test_failures_retries_and_crashes_are_marked(tmp_path: Path) -> None:
    with pp.Pool("processes", workers=WORKERS, retries=1, errors="return") as pool:
        out = pool.map(rh.fail_on_3, range(8), report=True)
        report = pool.last_report
        assert report is not None
        kinds = [(e.kind, e.index) for e in report.events]
        assert ("error", 3) in kinds
        assert ("retry", 3) in kinds
        assert isinstance(out[3], ValueError)
        crash = functools.partial(rh.crash_once, str(tmp_path))
        assert pool.map(crash, range(10), retries=1, report=True) == list(range(10))
        report = pool.last_report
    assert report is not None
    assert any(e.kind == "crash" and e.index == 5 for e in report.events)
    for span in report.spans:  # a failure mid-chunk keeps the item times in step
        if span.item_ends_s is not None:
            assert len(span.item_ends_s) == len(span.indices)
    trace = report.to_trace()
    instants = {e["cat"] for e in trace["traceEvents"] if e["ph"] == "i"}
    assert "crash" in instants


@pytest.mark.timeout(120)
def test_timeouts_are_marked_and_lazy_runs_write_when_done(tmp_path: Path) -> None:
    import fault_helpers as fh

    path = tmp_path / "lazy.json"
    with pp.Pool("processes", workers=WORKERS, errors="return", timeout=1.0) as pool:
        results = pool.imap_unordered(fh.hang, [1, fh.BAD, 2], report=path, with_index=True)
        assert not path.exists()  # nothing ran yet
        by_index = dict(results)
        assert isinstance(by_index[1], pp.ItemTimeoutError)
    trace = json.loads(path.read_text())
    timeouts = [e for e in trace["traceEvents"] if e.get("cat") == "timeout"]
    assert [e["args"]["index"] for e in timeouts] == [1]


def test_pool_report_covers_every_run(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    with pp.Pool("threads", workers=WORKERS, report=path) as pool:
        pool.map(rh.nap, range(10))
        first = json.loads(path.read_text())
        pool.map(rh.nap, range(10, 20))
    second = json.loads(path.read_text())

    def items(trace: dict[str, Any]) -> int:
        return sum(e["args"]["items"] for e in trace["traceEvents"] if e.get("cat") == "chunk")

    assert items(first) == 10
    assert items(second) == 20  # both runs (each numbers its own inputs from 0)
    assert len([e for e in second["traceEvents"] if e.get("cat") == "plan"]) == 0


def test_auto_in_thread_run_is_recorded(tmp_path: Path) -> None:
    with pp.Pool() as pool:
        assert pool.map(abs, range(-50_000, 0), report=True)[:2] == [50_000, 49_999]
        report = pool.last_report
    assert report is not None
    # auto v2: the first chunks ran on worker processes, the rest (tiny items)
    # in the caller's thread after a recorded switch.
    assert report.workers[-1] == "serial"
    assert all(w.startswith("process-") for w in report.workers[:-1])
    # The caller's share is drawn as such, not as pool chunks.
    assert {s.kind for s in report.spans if s.worker == "serial"} == {"serial"}
    assert {s.kind for s in report.spans if s.worker != "serial"} == {"chunk"}
    assert "in your thread, items" in report.to_html()
    assert report.items == 50_000
    assert report.runs[0].plan is not None
    assert any(e.kind == "plan" for e in report.events)
    assert any(e.kind == "plan-switch" and "serial" in e.detail for e in report.events)


def test_plan_switch_events_reach_both_formats() -> None:
    from powerpool._recorder import Recorder

    recorder = Recorder()
    recorder.begin(function="f", backend="threads", workers=2, plan=None)
    recorder.event("plan-switch", detail="threads -> processes")
    recorder.end()
    report = recorder.snapshot()
    trace = report.to_trace()
    switch = [e for e in trace["traceEvents"] if e.get("cat") == "plan-switch"]
    assert len(switch) == 1
    assert switch[0]["ph"] == "i"
    assert "threads -&gt; processes" in report.to_html()


def test_nothing_is_recorded_without_report() -> None:
    with pp.Pool("processes", workers=WORKERS) as pool:
        pool.map(rh.nap, range(4))
        assert pool.last_report is None


@pytest.mark.parametrize(
    ("report", "error"),
    [("r.txt", ValueError), ("missing-folder/r.html", ValueError), (3, TypeError)],
)
def test_bad_report_targets_fail_before_running(
    report: Any, error: type[Exception], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ran: list[int] = []
    with pytest.raises(error):
        pp.map(ran.append, range(3), backend="threads", report=report)
    assert ran == []


# --------------------------------------------------------------------------- a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


@pytest.mark.timeout(240)
def test_browser_draws_one_row_per_worker(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs Debian's chromium)")
    from PIL import Image

    workers = 3
    page = tmp_path / "r.html"
    pp.map(rh.nap, range(45), backend="processes", workers=workers, report=page)
    url = page.as_uri()
    dom = _headless(browser, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.stdout.count('class="pp-row"') == workers, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    result = _headless(
        browser, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1100,700", url
    )
    assert shot.exists(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    counts = {colour: n for n, colour in image.getcolors(maxcolors=1 << 24) or []}

    def rgb(colour: str) -> tuple[int, int, int]:
        return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))

    swatch = 10 * 22 // 2  # at least half of a row's swatch is drawn in its colour
    rows = [c for c in ROW_COLOURS if counts.get(rgb(c), 0) >= swatch]
    assert rows == list(ROW_COLOURS[:workers])
    from powerpool._report_html import ITEM_COLOURS

    drawn = sum(counts.get(rgb(c), 0) for c in ITEM_COLOURS)
    assert drawn > 2000  # the rows hold items, not only their background


# --------------------------------------------------------------------------- worker logs


@pytest.mark.parametrize("start_method", [None, "spawn"])
def test_forty_warnings_reach_the_parent_with_their_index(
    collected: Collect, start_method: str | None
) -> None:
    with pp.Pool("processes", workers=WORKERS, start_method=start_method) as pool:
        assert pool.map(rh.warn_once, range(40)) == list(range(40))
    records = collected.records
    assert len(records) == 40
    assert sorted(r.item_index for r in records) == list(range(40))  # type: ignore[attr-defined]
    for record in records:
        assert record.getMessage() == f"item {record.item_index} says hello"  # type: ignore[attr-defined]
        assert record.worker_id in ("process-0", "process-1")  # type: ignore[attr-defined]
        assert record.levelno == logging.WARNING
        assert record.process != os.getpid()  # logged there, handled here


def test_parent_levels_apply_to_worker_records(collected: Collect) -> None:
    logger = logging.getLogger(rh.LOGGER)
    logger.setLevel(logging.ERROR)
    try:
        pp.map(rh.warn_once, range(10), backend="processes", workers=WORKERS)
    finally:
        logger.setLevel(logging.NOTSET)
    assert collected.records == []


@pytest.mark.timeout(120)
def test_a_flood_of_records_is_bounded_and_counted(collected: Collect) -> None:
    dropped: list[logging.LogRecord] = []
    counter = Collect()
    counter.emit = dropped.append  # type: ignore[method-assign]
    ours = logging.getLogger("powerpool")
    ours.addHandler(counter)
    try:
        n = 20 * LOG_RECORDS_PER_S
        assert pp.map(rh.flood, [n], backend="processes", workers=1) == [n]
    finally:
        ours.removeHandler(counter)
    received = len(collected.records)
    assert 0 < received < n
    assert len(dropped) >= 1
    lost = sum(int(r.getMessage().split()[0]) for r in dropped)
    assert received + lost == n


def test_records_keep_their_time_in_the_report(tmp_path: Path) -> None:
    with pp.Pool("processes", workers=WORKERS) as pool:
        pool.map(rh.warn_once, range(6), report=True)
        report = pool.last_report
    assert report is not None
    assert sorted(m.index for m in report.logs if m.index is not None) == list(range(6))
    assert all(0 <= m.at_s <= report.wall_s + 0.5 for m in report.logs)


# --------------------------------------------------------------------------- notebooks, REPL


def test_notebook_views() -> None:
    with pp.Pool("threads", workers=WORKERS) as pool:
        pool.map(rh.nap, range(6), report=True)
        report = pool.last_report
        stats = pool.stats()
    assert report is not None
    assert "<svg" in report._repr_html_()
    assert repr(report).startswith("<RunReport run report: 6 items")
    assert len(repr(report)) < 300
    assert "<table" in stats._repr_html_()
    prof = pp.profile(rh.nap, range(3))
    assert repr(prof) == str(prof)
    assert "<pre" in prof._repr_html_()
    plan = pp.plan(rh.nap, range(20))
    assert repr(plan) == str(plan)
    assert plan._repr_html_().startswith("<pre")


def test_progress_in_a_notebook_without_ipywidgets_is_plain_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    from powerpool._progress import Progress, tqdm_class

    class Shell:
        config: ClassVar[dict[str, Any]] = {"IPKernelApp": {}}

    fake = types.ModuleType("IPython")
    fake.get_ipython = Shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # not installed
    assert tqdm_class().__module__ == "tqdm.std"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a TqdmWarning would raise here
        bar = Progress(True, total=3, desc="x")
        bar.update(3)
        bar.close()


# --------------------------------------------------------------------------- command line

WORK = """
import logging

def double(x):
    if x == 3:
        logging.getLogger("work").warning("three is here")
    return 2 * x
"""


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # The powerpool under test, installed or not (PYTHONPATH=src runs).
    here = str(Path(pp.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "powerpool", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(240)
def test_cli_run_and_bench_write_reports(tmp_path: Path) -> None:
    (tmp_path / "work.py").write_text(WORK)
    (tmp_path / "in.jsonl").write_text("".join(f"{i}\n" for i in range(12)))
    proc = _cli(
        "run", "work.py:double", "in.jsonl", "-o", "out.jsonl", "--backend", "processes",
        "--workers", "2", "--report", "r.html", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "r.html").read_text()
    assert 'class="pp-row"' in page
    assert "three is here" in page  # the worker's log record, in the report
    assert "three is here" in proc.stderr  # and through the parent's (last resort) handler
    proc = _cli(
        "bench", "work.py:double", "in.jsonl", "--workers", "2", "--backends", "processes",
        "--report", "b.json", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    trace = json.loads((tmp_path / "b.json").read_text())
    assert any(e["ph"] == "X" for e in trace["traceEvents"])
    proc = _cli("run", "work.py:double", "in.jsonl", "--report", "r.txt", cwd=tmp_path)
    assert proc.returncode == 2
    assert ".html or .json" in proc.stderr


@pytest.mark.timeout(120)
def test_dask_workers_logs_reach_the_parent(dask_cluster: Any, collected: Collect) -> None:
    pytest.importorskip("distributed")
    with pp.Pool("dask", address=dask_cluster.address) as pool:
        assert pool.map(rh.warn_once, range(10), chunksize=3, report=True) == list(range(10))
        report = pool.last_report
    records = collected.records
    assert sorted(r.item_index for r in records) == list(range(10))  # type: ignore[attr-defined]
    assert all(r.worker_id.startswith("tcp://") for r in records)  # type: ignore[attr-defined]
    assert report is not None
    assert report.items == 10
    assert all(not span.measured for span in report.spans)  # placed by arrival


def test_pool_report_includes_futures_written_at_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "futures.json"
    with pp.Pool("processes", workers=WORKERS, report=path, retries=1) as pool:
        futures = [pool.submit(rh.nap, x) for x in range(4)]
        assert [f.result(timeout=30) for f in futures] == list(range(4))
        assert pool.submit(rh.fail_on_3, 3).exception(timeout=30) is not None
        assert not path.exists()  # futures have no end of their own: written at shutdown
    trace = json.loads(path.read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len([e for e in spans if e["cat"] == "future"]) == 6  # 4 + the failing one twice
    kinds = {e["cat"] for e in trace["traceEvents"] if e["ph"] == "i"}
    assert {"error", "retry"} <= kinds
    assert pool.last_report is not None

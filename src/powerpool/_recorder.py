"""What happened in a run, recorded for a report (only when one is asked for).

The pool core hands the :class:`Recorder` every :class:`~powerpool._chunk.ChunkResult`
it absorbs; backends that can (the process engine) measure more when a chunk
carries a recorder: the phases of the chunk in the worker and, for small
chunks, each item's end. Without ``report=`` no recorder exists and nothing
of this runs (one ``is None`` test per chunk).

Clocks: workers read ``time.perf_counter()``, which on Linux, macOS and
Windows is one system-wide monotonic clock (CLOCK_MONOTONIC on Linux), so
times taken in different processes of one machine line up. Backends that
report no start time (dask) get their spans placed by when the result
reached this process, ``busy_s`` before it.

:meth:`Recorder.event` is the one entry point for instant events from
elsewhere in powerpool, e.g. ``recorder.event("plan-switch", detail="...")``
when auto changes its mind mid-run; they show in both report formats.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._chunk import IN_CALLER_WORKER, WorkerTiming
from ._system import usable_cores

if TYPE_CHECKING:
    import logging

    from ._chunk import ChunkResult
    from ._plan import Plan

__all__ = [
    "ChunkSpan",
    "Event",
    "LogMark",
    "Recorder",
    "RunInfo",
    "RunReport",
    "classify",
    "failed_items",
    "report_format",
]

MAX_SPANS = 50_000
"""Chunk spans kept per recorder (a pool-wide one lives as long as its pool);
beyond it only counts grow. 50 000 chunks is hours of well-sized chunks."""

MAX_EVENTS = 10_000
"""Instant events (failures, retries, switches) kept; the rest are counted."""

MAX_LOGS = 10_000
"""Worker log records whose time is kept for the report; the rest are counted."""


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk on one worker. Times are seconds since the recording began."""

    worker: str
    """The worker's name (``process-0``, a thread's name, ``caller``...)."""
    start_s: float
    """When its first item started."""
    end_s: float
    """When its last item ended."""
    indices: Sequence[int]
    """Input index of each item, in order."""
    item_ends_s: tuple[float, ...] | None
    """When each item ended, if measured."""
    failures: tuple[tuple[int, str, str], ...]
    """(input index, kind, what) of each item that did not succeed; kind is
    "error", "timeout", "crash" or "lost" (re-run: its worker died under
    another item), what the exception in a few words."""
    serialize_s: float = 0.0
    """Seconds the worker spent unpickling arguments and pickling results (0: not measured)."""
    transfer_s: float = 0.0
    """Seconds the worker spent receiving the arguments (0: not measured)."""
    measured: bool = True
    """False when the backend gave no start time and the span was placed by arrival."""
    kind: str = "chunk"
    """"chunk", "future" (a ``submit()``) or "serial" (items run in the caller's
    thread: the serial backend, auto's fast path for tiny items)."""

    def items(self) -> list[tuple[int, float, float]]:
        """(input index, start, end) of each item, when item times were measured."""
        if self.item_ends_s is None:
            return []
        starts = (self.start_s, *self.item_ends_s[:-1])
        return list(zip(self.indices, starts, self.item_ends_s))


@dataclass(frozen=True)
class Event:
    """Something that happened at one moment: a failure, a retry, a plan switch."""

    kind: str
    """"error", "timeout", "crash", "lost", "retry", "plan", "plan-switch", ..."""
    at_s: float
    """Seconds since the recording began."""
    worker: str = ""
    """Where it happened ("" for the whole run)."""
    index: int | None = None
    """The input index it concerns, if one."""
    detail: str = ""
    """Plain words."""


@dataclass(frozen=True)
class LogMark:
    """A log record a worker emitted (the record itself went to the logging handlers)."""

    at_s: float
    """Seconds since the recording began (from the record's ``created``)."""
    worker: str
    """The worker that logged it."""
    index: int | None
    """The input index of the item running then, if one."""
    level: str
    """``levelname``."""
    message: str
    """The formatted message, cut to 200 characters."""


@dataclass(frozen=True)
class RunInfo:
    """One map/imap run within a recording."""

    function: str
    """Qualified name of the function."""
    backend: str
    """The backend that ran it."""
    workers: int
    """Its workers."""
    start_s: float
    """When the run began (seconds since the recording began)."""
    end_s: float
    """When it ended (the recording's end if it has not)."""
    plan: Plan | None
    """auto's plan (None when the backend was chosen by the caller)."""
    start_method: str = ""
    """multiprocessing start method, for the process backend."""


@dataclass(frozen=True, repr=False)
class RunReport:
    """Everything a recording saw; renders as HTML, a Chrome/Perfetto trace, or inline.

    ``pool.last_report`` after a run made with ``report=``; ``write(path)``
    picks the format from the suffix (``.html`` or ``.json``).
    """

    runs: tuple[RunInfo, ...]
    """The runs recorded, in order."""
    spans: tuple[ChunkSpan, ...]
    """Every chunk, on its worker."""
    events: tuple[Event, ...]
    """Instant events."""
    logs: tuple[LogMark, ...]
    """Worker log records, by time."""
    wall_s: float
    """Seconds from the first run's start to the last one's end."""
    cores: int
    """Usable cores of this machine."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Spans, events or log marks not kept because of the caps above."""
    started_at: float = 0.0
    """``time.time()`` when the recording began."""

    # -- figures ----------------------------------------------------------------

    @functools.cached_property
    def machine(self) -> dict[str, Any]:
        """Python, platform, CPU counts, BLAS libraries (threadpoolctl), start method.

        Looked up when first shown, not when the run ends: asking threadpoolctl
        costs about a millisecond, a visible share of a short run.
        """
        return machine(self.runs)

    @property
    def workers(self) -> list[str]:
        """Worker names, in lane order (the caller's thread first)."""
        names = {span.worker for span in self.spans}
        return sorted(names, key=_lane_key)

    @property
    def items(self) -> int:
        """Item runs recorded (a retried item counts once per run)."""
        return sum(len(span.indices) for span in self.spans)

    @property
    def compute_s(self) -> float:
        """Seconds of item computation over all workers."""
        return sum(span.end_s - span.start_s for span in self.spans)

    @property
    def actual_speedup(self) -> float:
        """Compute seconds / wall seconds: the serial time is taken as the items'
        summed compute time, which overstates it when workers slowed each other."""
        return self.compute_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def expected_speedup(self) -> float | None:
        """What the latest plan predicted (None: no plan, the backend was given)."""
        plans = [run.plan for run in self.runs if run.plan is not None]
        return plans[-1].expected_speedup if plans else None

    @property
    def efficiency(self) -> float:
        """Actual speed-up / usable cores (1.0: every core computed all the time)."""
        return self.actual_speedup / max(1, self.cores)

    def time_split(self) -> dict[str, dict[str, float]]:
        """Per worker: seconds computing, (un)pickling, receiving, and idle.

        Serialization and transfer are measured in worker processes only (the
        results' trip back is not timed separately and counts as idle, as
        does waiting for the dispatcher); idle is the rest of the wall time.
        """
        split: dict[str, dict[str, float]] = {}
        for span in self.spans:
            row = split.setdefault(
                span.worker, {"compute": 0.0, "serialization": 0.0, "transfer": 0.0}
            )
            row["compute"] += span.end_s - span.start_s
            row["serialization"] += span.serialize_s
            row["transfer"] += span.transfer_s
        for row in split.values():
            row["idle"] = max(0.0, self.wall_s - sum(row.values()))
        return {name: split[name] for name in sorted(split, key=_lane_key)}

    def slowest(self, n: int = 10) -> list[tuple[int, str, float]]:
        """(input index, worker, seconds) of the slowest items where items were timed;
        chunks count as one item at their first index otherwise."""
        found: list[tuple[int, str, float]] = []
        for span in self.spans:
            if span.item_ends_s is not None:
                found.extend((i, span.worker, end - start) for i, start, end in span.items())
            elif len(span.indices) == 1:
                found.append((span.indices[0], span.worker, span.end_s - span.start_s))
        found.sort(key=lambda entry: -entry[2])
        return found[:n]

    # -- output -------------------------------------------------------------------

    def to_trace(self) -> dict[str, Any]:
        """The Chrome trace event format (opens in Perfetto and chrome://tracing)."""
        from ._trace import to_trace

        return to_trace(self)

    def to_html(self) -> str:
        """One self-contained HTML page (no scripts, no network)."""
        from ._report_html import render

        return render(self)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the report; ``.html``/``.htm`` for the page, ``.json`` for the trace."""
        text = _render_for(self, os.fspath(path))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def _repr_html_(self) -> str:
        from ._report_html import render_inline

        return render_inline(self)

    def __repr__(self) -> str:
        # A REPL shows this for a bare ``pool.last_report``: the summary, not
        # thousands of spans (they are all in ``.spans``).
        return f"<RunReport {self}>"

    def __str__(self) -> str:
        speedup = f"{self.actual_speedup:.1f}x"
        if self.expected_speedup is not None:
            speedup += f" (plan: {self.expected_speedup:.1f}x)"
        return (
            f"run report: {self.items} items on {len(self.workers)} worker(s) in "
            f"{self.wall_s:.3g} s; speed-up {speedup}, efficiency {self.efficiency:.0%} "
            f"of {self.cores} cores"
        )


def report_format(path: str) -> str:
    """ "html" or "json" from a report path's suffix; ValueError for anything else."""
    lower = path.lower()
    if lower.endswith((".html", ".htm")):
        return "html"
    if lower.endswith(".json"):
        return "json"
    raise ValueError(
        f"report={path!r}: the path must end in .html (a page) or .json (a Perfetto "
        "trace); report=True keeps the report in pool.last_report without a file"
    )


def _render_for(report: RunReport, path: str) -> str:
    if report_format(path) == "html":
        return report.to_html()
    import json

    return json.dumps(report.to_trace(), separators=(",", ":"))


class Recorder:
    """Collects spans and events of the runs it is given, from any thread.

    Invariant: the lists and counters change only under ``_lock``; ``_origin``
    never changes after construction.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._origin = time.perf_counter()
        self._origin_wall = time.time()
        self._spans: list[ChunkSpan] = []
        self._events: list[Event] = []
        self._logs: list[LogMark] = []
        self._runs: list[dict[str, Any]] = []
        self._dropped: dict[str, int] = {}

    def now(self) -> float:
        """Seconds since the recording began."""
        return time.perf_counter() - self._origin

    # -- runs -------------------------------------------------------------------------

    def begin(
        self,
        *,
        function: str,
        backend: str,
        workers: int,
        plan: Plan | None,
        start_method: str = "",
    ) -> None:
        """A run starts (call :meth:`end` when it ends)."""
        run = {
            "function": function,
            "backend": backend,
            "workers": workers,
            "start_s": self.now(),
            "end_s": None,
            "plan": plan,
            "start_method": start_method,
        }
        with self._lock:
            self._runs.append(run)
        if plan is not None:
            self.event("plan", detail=str(plan).splitlines()[0])

    def end(self) -> None:
        """The latest run has ended."""
        with self._lock:
            if self._runs:
                self._runs[-1]["end_s"] = self.now()

    # -- what happened ------------------------------------------------------------------

    def chunk(
        self,
        result: ChunkResult,
        failures: Sequence[tuple[int, str, str]] = (),
        kind: str = "chunk",
    ) -> None:
        """One chunk came back (call after its values/outcomes were decoded);
        ``kind`` "future" for a ``submit()``."""
        if kind == "chunk" and result.worker == IN_CALLER_WORKER:
            kind = "serial"
        arrived = time.perf_counter()
        chunk = result.chunk
        timing: WorkerTiming | None = result.timing
        origin = self._origin
        if result.started_s:
            start = result.started_s - origin
            end = start + result.busy_s
            measured = True
        else:
            end = arrived - origin
            start = end - result.busy_s
            measured = False
        ends = None
        if timing is not None and timing.item_ends_s:
            ends = tuple(t - origin for t in timing.item_ends_s)
        indices = chunk.indices if isinstance(chunk.indices, range) else tuple(chunk.indices)
        span = ChunkSpan(
            worker=result.worker or "worker",
            start_s=start,
            end_s=end,
            indices=indices,
            item_ends_s=ends,
            failures=tuple(failures),
            serialize_s=0.0 if timing is None else timing.unpack_s + timing.pickle_s,
            transfer_s=0.0 if timing is None else timing.receive_s,
            measured=measured,
            kind=kind,
        )
        with self._lock:
            self._keep(self._spans, span, MAX_SPANS, "spans")
        positions = {index: i for i, index in enumerate(indices)} if failures else {}
        for index, failure, what in failures:
            at = end
            if ends is not None and failure != "lost" and index in positions:
                at = ends[positions[index]]
            self.event(failure, worker=span.worker, index=index, detail=what, at_s=at)

    def event(
        self,
        kind: str,
        *,
        worker: str = "",
        index: int | None = None,
        detail: str = "",
        at_s: float | None = None,
    ) -> None:
        """An instant event, e.g. ``event("plan-switch", detail="threads -> processes")``."""
        event = Event(kind, self.now() if at_s is None else at_s, worker, index, detail)
        with self._lock:
            self._keep(self._events, event, MAX_EVENTS, "events")

    def log(self, worker: str, record: logging.LogRecord, index: int | None) -> None:
        """A worker's log record reached this process (its time goes in the report)."""
        mark = LogMark(
            record.created - self._origin_wall,
            worker,
            index,
            record.levelname,
            record.getMessage()[:200],
        )
        with self._lock:
            self._keep(self._logs, mark, MAX_LOGS, "logs")

    def _keep(self, into: list[Any], entry: Any, cap: int, what: str) -> None:
        if len(into) < cap:
            into.append(entry)
        else:
            self._dropped[what] = self._dropped.get(what, 0) + 1

    # -- the record ---------------------------------------------------------------------

    def snapshot(self) -> RunReport:
        """A frozen report of everything so far."""
        now = self.now()
        with self._lock:
            runs = tuple(
                RunInfo(
                    function=run["function"],
                    backend=run["backend"],
                    workers=run["workers"],
                    start_s=run["start_s"],
                    end_s=now if run["end_s"] is None else run["end_s"],
                    plan=run["plan"],
                    start_method=run["start_method"],
                )
                for run in self._runs
            )
            spans = tuple(self._spans)
            events = tuple(sorted(self._events, key=lambda e: e.at_s))
            logs = tuple(sorted(self._logs, key=lambda m: m.at_s))
            dropped = dict(self._dropped)
        # Time 0 is the recorder's creation, just before the first run (the
        # pool makes its recorder then): nothing needs shifting.
        last = max([run.end_s for run in runs] + [s.end_s for s in spans], default=0.0)

        return RunReport(
            runs=runs,
            spans=spans,
            events=events,
            logs=logs,
            wall_s=max(0.0, last),
            cores=usable_cores(),
            dropped=dropped,
            started_at=self._origin_wall,
        )


def _lane_key(name: str) -> tuple[int, str, int]:
    """Lane order: the caller's thread, then workers by name and number."""
    if name == "caller":
        return (0, "", 0)
    head, _, tail = name.rpartition("-")
    if tail.isdigit():
        return (1, head, int(tail))
    return (1, name, 0)


def machine(runs: Sequence[RunInfo] = ()) -> dict[str, Any]:
    """This machine as a report shows it."""
    import platform

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(terse=True),
        "cpu_count": os.cpu_count() or 0,
        "usable_cores": usable_cores(),
        "start_method": next((r.start_method for r in runs if r.start_method), ""),
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            f"{lib.get('internal_api', '?')} {lib.get('version') or ''} "
            f"({lib.get('num_threads', '?')} threads)".replace("  ", " ")
            for lib in threadpool_info()
        ]
    except Exception as exc:  # threadpoolctl inspects native libraries: never fail a report
        info["blas"] = [f"unknown ({type(exc).__name__})"]
    return info


def failed_items(result: ChunkResult) -> list[tuple[int, str, str]]:
    """(input index, kind, what) of each item of ``result`` that failed."""
    if result.values is not None:
        return []
    return [
        (index, *classify(value))
        for index, (ok, value) in zip(result.chunk.indices, result.outcomes)
        if not ok
    ]


def classify(exc: BaseException) -> tuple[str, str]:
    """The failure kind a report shows for an item's exception, and the exception in words."""
    from ._chunk import ItemLost
    from ._errors import ItemTimeoutError, WorkerCrashedError

    what = f"{type(exc).__name__}: {exc}"[:200]
    if isinstance(exc, ItemLost):
        return "lost", "re-run: its worker died under another item"
    if isinstance(exc, ItemTimeoutError):
        return "timeout", what
    if isinstance(exc, WorkerCrashedError):
        return "crash", what
    return "error", what

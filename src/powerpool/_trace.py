"""A run report as a Chrome trace (the JSON that Perfetto and chrome://tracing open).

Format: the "JSON Object Format" of the Trace Event Format document
(https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU).
One process (``pid`` 1, named after the function) with one thread lane per
worker (``tid``; the caller's thread is lane 0); complete events (``"X"``)
per chunk and, where measured, per item; instant events (``"i"``) for
failures, retries, plan switches and worker log records. Times are
microseconds since the first run began.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._recorder import RunReport

__all__ = ["MAX_ITEM_EVENTS", "to_trace"]

MAX_ITEM_EVENTS = 100_000
"""Item spans written at most (~120 bytes each): beyond this the trace keeps
chunk spans only, so that a report of a million tiny items still opens."""

_PID = 1
_US = 1e6


def to_trace(report: RunReport) -> dict[str, Any]:
    """The report as a dict ready for ``json.dump``."""
    lanes = {name: number for number, name in enumerate(report.workers, start=1)}
    lanes.setdefault("caller", 0)
    function = report.runs[-1].function if report.runs else "run"
    events: list[dict[str, Any]] = [
        _meta("process_name", 0, {"name": f"powerpool: {function}"}),
    ]
    for name, tid in sorted(lanes.items(), key=lambda entry: entry[1]):
        events.append(_meta("thread_name", tid, {"name": name}))
        events.append(_meta("thread_sort_index", tid, {"sort_index": tid}))
    item_spans = sum(len(span.item_ends_s) for span in report.spans if span.item_ends_s is not None)
    with_items = item_spans <= MAX_ITEM_EVENTS
    for span in report.spans:
        tid = lanes[span.worker]
        indices = span.indices
        first, last = (indices[0], indices[-1]) if len(indices) else (-1, -1)
        events.append(
            {
                "name": _span_name(span.kind, first, last, len(indices)),
                "cat": span.kind,
                "ph": "X",
                "ts": span.start_s * _US,
                "dur": max(0.0, span.end_s - span.start_s) * _US,
                "pid": _PID,
                "tid": tid,
                "args": {
                    "items": len(indices),
                    "first_index": first,
                    "failed": len(span.failures),
                    "serialization_us": span.serialize_s * _US,
                    "transfer_us": span.transfer_s * _US,
                    "placed_by_arrival": not span.measured,
                },
            }
        )
        if with_items and span.item_ends_s is not None and len(indices) > 1:
            for index, start, end in span.items():
                events.append(
                    {
                        "name": f"item {index}",
                        "cat": "item",
                        "ph": "X",
                        "ts": start * _US,
                        "dur": max(0.0, end - start) * _US,
                        "pid": _PID,
                        "tid": tid,
                        "args": {"index": index},
                    }
                )
    for event in report.events:
        events.append(
            {
                "name": event.kind if event.index is None else f"{event.kind} item {event.index}",
                "cat": event.kind,
                "ph": "i",
                # Process-wide plan changes, one worker's failures on its lane.
                "s": "t" if event.worker else "p",
                "ts": event.at_s * _US,
                "pid": _PID,
                "tid": lanes.get(event.worker, 0),
                "args": {"index": event.index, "detail": event.detail},
            }
        )
    for mark in report.logs:
        events.append(
            {
                "name": f"log {mark.level}",
                "cat": "log",
                "ph": "i",
                "s": "t",
                "ts": mark.at_s * _US,
                "pid": _PID,
                "tid": lanes.get(mark.worker, 0),
                "args": {"index": mark.index, "message": mark.message},
            }
        )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "powerpool": "run report",
            "wall_s": report.wall_s,
            "cores": report.cores,
            "actual_speedup": report.actual_speedup,
            "expected_speedup": report.expected_speedup,
            "machine": report.machine,
            "dropped": report.dropped,
            "item_spans_written": with_items,
        },
    }


def _span_name(kind: str, first: int, last: int, items: int) -> str:
    if kind == "future":
        return "future"  # a submit(): its one item has no input index of its own
    return f"{kind} {first}-{last}" if items > 1 else f"item {first}"


def _meta(name: str, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": _PID, "tid": tid, "args": args}

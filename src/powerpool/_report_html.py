"""A run report as one self-contained HTML page: inline SVG and CSS, no script, no network.

The chart is a worker x time grid: one row per worker (each marked by a
colour swatch from ``ROW_COLOURS`` at its left, so a screenshot shows how
many rows were drawn), one rectangle per item where items were timed, else
per chunk. Rectangles narrower than ``MERGE_PX`` that touch are drawn as one,
so the page stays small (a few hundred KB at most) whatever the item count.
"""

from __future__ import annotations

import datetime
import html
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._recorder import ChunkSpan, RunReport
    from ._stats import PoolStats

__all__ = ["FAILURE_COLOURS", "ROW_COLOURS", "render", "render_inline", "stats_html", "text_html"]

ROW_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
"""Swatch colour of worker row i (cycled); distinct, so rows can be told apart
(and counted in a screenshot: see tests/test_report.py)."""

ITEM_COLOURS = ("#4c78a8", "#9ecae9")
"""Consecutive items (or chunks) alternate between these, so boundaries show."""
KIND_COLOURS = {"serial": "#54a24b"}
"""Items run in the caller's thread (the serial backend, auto's tiny-item path)."""
FAILURE_COLOURS = {
    "error": "#e45756",
    "timeout": "#f58518",
    "crash": "#000000",
    "lost": "#b279a2",
}
"""Markers of items that failed (lost: re-run because its worker died under another item)."""
RETRY_COLOUR = "#b279a2"
LOG_COLOUR = "#eeca3b"
PLAN_COLOUR = "#7f3c8d"

CHART_W = 900
"""Pixels of the time axis; the page is ~1000 px wide."""
LABEL_W = 120
ROW_H = 22
ROW_GAP = 4
MERGE_PX = 1.5
"""Rectangles narrower than this that touch are merged into one: no one can
see them apart, and a million of them would make a page no browser opens."""
MAX_ITEM_RECTS = 20_000
"""Items drawn one by one at most; beyond, chunks are drawn."""
MAX_MARKERS = 500
"""Failure, retry and log markers drawn at most (the tables list the rest)."""
TABLE_ROWS = 50
"""Rows shown in the failures and logs tables."""

_STYLE = """
.pp-report{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;
color:#222;max-width:1040px}
.pp-report h1{font-size:20px;margin:8px 0}.pp-report h2{font-size:16px;margin:18px 0 6px}
.pp-report table{border-collapse:collapse;margin:4px 0}
.pp-report td,.pp-report th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
.pp-report td.n{text-align:right;font-variant-numeric:tabular-nums}
.pp-report .cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.pp-report .card{border:1px solid #ddd;border-radius:6px;padding:6px 10px;min-width:120px}
.pp-report .card b{display:block;font-size:18px}
.pp-report pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;margin:4px 0}
.pp-report .note{color:#666;font-size:12px}
"""


def render(report: RunReport) -> str:
    """The full page."""
    function = report.runs[-1].function if report.runs else "run"
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>powerpool report: {_e(function)}</title>"
        f"<style>body{{margin:16px}}{_STYLE}</style></head><body>"
        f"{_body(report, full=True)}</body></html>\n"
    )


def render_inline(report: RunReport) -> str:
    """The summary and chart, for a notebook cell."""
    return f"<div><style>{_STYLE}</style>{_body(report, full=False)}</div>"


def _body(report: RunReport, *, full: bool) -> str:
    parts = ['<div class="pp-report">']
    function = report.runs[-1].function if report.runs else "run"
    when = datetime.datetime.fromtimestamp(report.started_at).strftime("%Y-%m-%d %H:%M:%S")
    parts.append(f"<h1>powerpool run: {_e(function)}</h1>")
    parts.append(f'<div class="note">started {when}; {len(report.runs)} run(s)</div>')
    parts.append(_cards(report))
    parts.append("<h2>Timeline</h2>")
    parts.append(_chart(report))
    parts.append(_legend())
    if full:
        parts.append(_split_table(report))
        parts.append(_plans(report))
        parts.append(_slowest(report))
        parts.append(_failures(report))
        parts.append(_logs(report))
        parts.append(_machine(report))
    parts.append("</div>")
    return "".join(parts)


# --------------------------------------------------------------------------- summary


def _cards(report: RunReport) -> str:
    runs = report.runs
    backend = ", ".join(sorted({f"{r.backend} x{r.workers}" for r in runs})) or "-"
    failed = sum(len(s.failures) for s in report.spans)
    expected = report.expected_speedup
    cards = [
        ("items run", f"{report.items}"),
        ("wall time", _seconds(report.wall_s)),
        ("backend", backend),
        ("speed-up", f"{report.actual_speedup:.2f}x"),
        ("plan predicted", "-" if expected is None else f"{expected:.2f}x"),
        ("efficiency", f"{report.efficiency:.0%} of {report.cores} cores"),
        ("failed attempts", str(failed)),
    ]
    body = "".join(f'<div class="card">{_e(k)}<b>{_e(v)}</b></div>' for k, v in cards)
    return (
        f'<div class="cards">{body}</div><div class="note">speed-up = summed compute '
        "time / wall time (the serial time is estimated by the items' own compute "
        "time); efficiency = speed-up / usable cores.</div>"
    )


# --------------------------------------------------------------------------- the chart


def _chart(report: RunReport) -> str:
    workers = report.workers
    wall = max(report.wall_s, 1e-9)
    scale = CHART_W / wall
    height = len(workers) * (ROW_H + ROW_GAP) + 30
    rows = {name: i for i, name in enumerate(workers)}
    by_worker: dict[str, list[ChunkSpan]] = {}
    for span in report.spans:
        by_worker.setdefault(span.worker, []).append(span)
    per_items = sum(len(s.item_ends_s or ()) for s in report.spans) <= MAX_ITEM_RECTS
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LABEL_W + CHART_W + 10}" '
        f'height="{height}" font-size="11" font-family="sans-serif" class="pp-chart">'
    ]
    for name, i in rows.items():
        y = i * (ROW_H + ROW_GAP)
        colour = ROW_COLOURS[i % len(ROW_COLOURS)]
        out.append(
            f'<g class="pp-row" data-worker="{_e(name)}">'
            f'<rect x="0" y="{y}" width="10" height="{ROW_H}" fill="{colour}"/>'
            f'<text x="14" y="{y + ROW_H - 7}">{_e(name[:16])}</text>'
            f'<rect x="{LABEL_W}" y="{y}" width="{CHART_W}" height="{ROW_H}" fill="#f4f4f4"/>'
        )
        out.extend(_row_rects(by_worker.get(name, []), per_items, y, scale))
        out.append("</g>")
    out.extend(_markers(report, rows, scale))
    out.extend(_axis(wall, scale, len(workers) * (ROW_H + ROW_GAP)))
    out.append("</svg>")
    return "".join(out)


def _row_rects(spans: list[ChunkSpan], per_items: bool, y: int, scale: float) -> list[str]:
    """Rectangles of one worker's row: items where measured, else chunks, merged when tiny."""
    pieces: list[tuple[float, float, str, str]] = []  # x0, x1, kind, title
    for span in sorted(spans, key=lambda s: s.start_s):
        if per_items and span.item_ends_s is not None:
            for index, start, end in span.items():
                pieces.append((start, end, span.kind, f"item {index}: {_seconds(end - start)}"))
        else:
            pieces.append((span.start_s, span.end_s, span.kind, _span_title(span)))
    out: list[str] = []
    merged: list[float] | None = None  # [x0, x1, count]
    shade = 0
    for start, end, kind, title in pieces:
        x0, x1 = LABEL_W + start * scale, LABEL_W + end * scale
        if x1 - x0 < MERGE_PX and kind in ("chunk", "future"):
            if merged is not None and x0 - merged[1] < MERGE_PX:
                merged[1], merged[2] = max(merged[1], x1), merged[2] + 1
                continue
            if merged is not None:
                out.append(_merged_rect(merged, y, scale))
            merged = [x0, x1, 1]
            continue
        if merged is not None:
            out.append(_merged_rect(merged, y, scale))
            merged = None
        colour = KIND_COLOURS.get(kind, ITEM_COLOURS[shade % 2])
        shade += 1
        out.append(
            f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(0.5, x1 - x0):.1f}" '
            f'height="{ROW_H - 4}" fill="{colour}"><title>{_e(title)}</title></rect>'
        )
    if merged is not None:
        out.append(_merged_rect(merged, y, scale))
    return out


def _merged_rect(merged: list[float], y: int, scale: float) -> str:
    x0, x1, count = merged
    title = f"{int(count)} short items/chunks over {_seconds((x1 - x0) / scale)}"
    return (
        f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(1.0, x1 - x0):.1f}" height="{ROW_H - 4}" '
        f'fill="{ITEM_COLOURS[0]}"><title>{_e(title)}</title></rect>'
    )


def _span_title(span: ChunkSpan) -> str:
    indices = span.indices
    if not len(indices):
        what = "no items"
    elif len(indices) > 1:
        what = f"items {indices[0]}-{indices[-1]}"
    else:
        what = f"item {indices[0]}"
    if span.kind == "future":
        return f"a submit(): {_seconds(span.end_s - span.start_s)}"
    label = "in your thread" if span.kind == "serial" else "chunk"
    note = "" if span.measured else " (placed by arrival)"
    return f"{label}, {what}: {_seconds(span.end_s - span.start_s)}{note}"


def _markers(report: RunReport, rows: dict[str, int], scale: float) -> list[str]:
    out: list[str] = []
    bottom = len(rows) * (ROW_H + ROW_GAP)
    for event in report.events[:MAX_MARKERS]:
        x = LABEL_W + event.at_s * scale
        if event.kind in ("plan", "plan-switch"):
            out.append(
                f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{bottom}" stroke="{PLAN_COLOUR}" '
                f'stroke-dasharray="3,2"><title>{_e(event.kind)}: {_e(event.detail)}</title></line>'
            )
        elif event.kind == "retry":
            out.append(
                f'<path d="M{x:.1f},{bottom - 1} l-4,6 h8 z" fill="{RETRY_COLOUR}">'
                f"<title>retry of item {event.index}: {_e(event.detail)}</title></path>"
            )
        elif event.worker in rows:
            y = rows[event.worker] * (ROW_H + ROW_GAP)
            colour = FAILURE_COLOURS.get(event.kind, FAILURE_COLOURS["error"])
            out.append(
                f'<rect x="{x - 1.5:.1f}" y="{y}" width="3" height="{ROW_H}" fill="{colour}">'
                f"<title>{_e(event.kind)}: item {event.index}</title></rect>"
            )
    for mark in report.logs[:MAX_MARKERS]:
        if mark.worker not in rows:
            continue
        x = LABEL_W + mark.at_s * scale
        y = rows[mark.worker] * (ROW_H + ROW_GAP)
        out.append(
            f'<circle cx="{x:.1f}" cy="{y + 3}" r="2.5" fill="{LOG_COLOUR}" stroke="#776">'
            f"<title>{_e(mark.level)} (item {mark.index}): {_e(mark.message)}</title></circle>"
        )
    return out


def _axis(wall: float, scale: float, top: int) -> list[str]:
    step = _nice_step(wall / 8)
    out = [f'<line x1="{LABEL_W}" y1="{top}" x2="{LABEL_W + CHART_W}" y2="{top}" stroke="#999"/>']
    t = 0.0
    while t <= wall * 1.0001:
        x = LABEL_W + t * scale
        out.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + 4}" stroke="#999"/>'
            f'<text x="{x:.1f}" y="{top + 16}" text-anchor="middle">{_e(_seconds(t))}</text>'
        )
        t += step
    return out


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * power:
            return float(mult * power)
    return float(10 * power)


def _legend() -> str:
    entries = [
        (ITEM_COLOURS[0], "item / chunk (alternating shades)"),
        (KIND_COLOURS["serial"], "in your thread"),
        *((colour, kind) for kind, colour in FAILURE_COLOURS.items()),
        (RETRY_COLOUR, "retry (triangle)"),
        (LOG_COLOUR, "log record (dot)"),
        (PLAN_COLOUR, "plan / plan switch (dashed)"),
    ]
    swatches = "".join(
        f'<span style="display:inline-block;margin-right:12px">'
        f'<span style="display:inline-block;width:10px;height:10px;background:{c};'
        f'margin-right:4px"></span>{_e(label)}</span>'
        for c, label in entries
    )
    return f'<div class="note">{swatches}</div>'


# --------------------------------------------------------------------------- tables


def _split_table(report: RunReport) -> str:
    split = report.time_split()
    rows = []
    for worker, parts in split.items():
        total = max(report.wall_s, 1e-9)
        bar = "".join(
            f'<rect x="{x:.1f}" width="{w:.1f}" height="10" fill="{c}"/>'
            for x, w, c in _stack(parts, total)
        )
        rows.append(
            f"<tr><td>{_e(worker)}</td>"
            + "".join(
                f'<td class="n">{_seconds(parts[k])}</td>'
                for k in ("compute", "serialization", "transfer", "idle")
            )
            + f'<td><svg width="200" height="10">{bar}</svg></td></tr>'
        )
    return (
        "<h2>Where each worker's time went</h2><table><tr><th>worker</th><th>compute</th>"
        "<th>serialization</th><th>transfer</th><th>idle</th><th></th></tr>"
        + "".join(rows)
        + "</table><div class=note>compute: running items; serialization: unpickling "
        "arguments and pickling results in the worker; transfer: receiving arguments "
        "from the pipe. Both are measured in worker processes only; the results' trip "
        "back, waiting for the dispatcher and pool start-up count as idle.</div>"
    )


def _stack(parts: dict[str, float], total: float) -> list[tuple[float, float, str]]:
    colours = {
        "compute": ITEM_COLOURS[0],
        "serialization": "#f58518",
        "transfer": "#e45756",
        "idle": "#dddddd",
    }
    x = 0.0
    out = []
    for key in ("compute", "serialization", "transfer", "idle"):
        width = 200 * parts[key] / total
        out.append((x, width, colours[key]))
        x += width
    return out


def _plans(report: RunReport) -> str:
    blocks = []
    for run in report.runs:
        head = f"{run.function} on {run.backend} with {run.workers} worker(s)"
        if run.start_method:
            head += f" (start method {run.start_method})"
        text = str(run.plan) if run.plan is not None else "backend chosen by the caller"
        blocks.append(f"<pre>{_e(head)}\n{_e(text)}</pre>")
    switches = [e for e in report.events if e.kind == "plan-switch"]
    extra = "".join(
        f"<pre>at {_seconds(e.at_s)}: plan switch: {_e(e.detail)}</pre>" for e in switches
    )
    return "<h2>The plan</h2>" + "".join(blocks) + extra


def _slowest(report: RunReport) -> str:
    slow = report.slowest(10)
    if not slow:
        return (
            "<h2>Slowest items</h2><div class=note>items were not timed one by one "
            "(large chunks of tiny items, or a backend that times chunks only)</div>"
        )
    rows = "".join(
        f'<tr><td class="n">{index}</td><td>{_e(worker)}</td><td class="n">{_seconds(s)}</td></tr>'
        for index, worker, s in slow
    )
    return (
        "<h2>Slowest items</h2><table><tr><th>input index</th><th>worker</th>"
        f"<th>time</th></tr>{rows}</table>"
    )


def _failures(report: RunReport) -> str:
    failed = [e for e in report.events if e.kind in FAILURE_COLOURS or e.kind == "retry"]
    if not failed:
        return "<h2>Failures</h2><div class=note>none</div>"
    rows = "".join(
        f"<tr><td class=n>{_seconds(e.at_s)}</td><td>{_e(e.kind)}</td>"
        f"<td class=n>{'' if e.index is None else e.index}</td><td>{_e(e.worker)}</td>"
        f"<td>{_e(e.detail)}</td></tr>"
        for e in failed[:TABLE_ROWS]
    )
    more = f"<div class=note>and {len(failed) - TABLE_ROWS} more</div>" * (len(failed) > TABLE_ROWS)
    return (
        "<h2>Failures</h2><table><tr><th>at</th><th>what</th><th>input index</th>"
        f"<th>worker</th><th>detail</th></tr>{rows}</table>{more}"
    )


def _logs(report: RunReport) -> str:
    if not report.logs:
        return ""
    rows = "".join(
        f"<tr><td class=n>{_seconds(m.at_s)}</td><td>{_e(m.worker)}</td>"
        f"<td class=n>{'' if m.index is None else m.index}</td><td>{_e(m.level)}</td>"
        f"<td>{_e(m.message)}</td></tr>"
        for m in report.logs[:TABLE_ROWS]
    )
    return (
        "<h2>Worker log records</h2><table><tr><th>at</th><th>worker</th><th>item</th>"
        f"<th>level</th><th>message</th></tr>{rows}</table>"
    )


def _machine(report: RunReport) -> str:
    m = report.machine
    rows = [
        ("cores", f"{m.get('usable_cores')} usable of {m.get('cpu_count')}"),
        ("Python", f"{m.get('implementation', '')} {m.get('python', '')}"),
        ("platform", str(m.get("platform", ""))),
        ("start method", str(m.get("start_method") or "-")),
        ("BLAS / OpenMP", "; ".join(m.get("blas", [])) or "none loaded in this process"),
    ]
    if report.dropped:
        rows.append(("not kept", ", ".join(f"{v} {k}" for k, v in report.dropped.items())))
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<h2>Machine</h2><table>{body}</table>"


def text_html(text: str) -> str:
    """A plain-text report (a profile, a plan) as a notebook shows it."""
    return f'<pre style="white-space:pre-wrap">{_e(text)}</pre>'


def stats_html(stats: PoolStats) -> str:
    """``pool.stats()`` as a small table."""
    rows = [
        ("backend", f"{stats.backend or '-'} with {stats.workers} worker(s)"),
        (
            "items",
            f"{stats.items_done} done, {stats.items_failed} failed, {stats.items_retried} retried",
        ),
        ("chunks", str(stats.chunks)),
        ("wall time", _seconds(stats.wall_s)),
        ("busy time", _seconds(stats.busy_s)),
        ("utilization", f"{stats.utilization:.0%}"),
        *((f"busy: {name}", _seconds(s)) for name, s in sorted(stats.busy_s_by_worker.items())),
    ]
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return (
        f"<table><caption>powerpool pool statistics</caption>{body}</table>"
        "<div><small>the timeline of a run: <code>report=True</code>, then "
        "<code>pool.last_report</code></small></div>"
    )


def _seconds(seconds: float) -> str:
    from ._profile import format_seconds

    return format_seconds(max(0.0, seconds)) if seconds else "0 s"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)

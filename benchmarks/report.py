"""Writes the results: results.json, results.md, times.png and speedup.png.

Everything here works from the JSON form of the results (``to_json``), so a
report can be redrawn from a saved results.json without rerunning
(``python -m benchmarks --report-only DIR``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contenders import CONTENDERS

if TYPE_CHECKING:
    from .runner import Results

__all__ = [
    "best_peer",
    "load",
    "markdown",
    "to_json",
    "write_all",
    "write_json",
    "write_markdown",
    "write_plots",
]

SCHEMA = 1
"""Version of the results.json layout."""

# Rows that are not "a peer left at its defaults" when looking for the best peer:
# the serial loop, every powerpool row, the hand-tuned chunksize and warm rows.
# asyncio.gather runs the coroutine variant (a rewrite of the function), so it
# is compared with "powerpool asyncio" rather than with auto on the sync one.
_NOT_DEFAULT_PEERS = {"serial", "ppe-tuned", "joblib-warm", "asyncio-gather"}


def to_json(results: Results) -> dict[str, Any]:
    """The results as plain JSON-able data (the results.json layout)."""
    config = asdict(results.config)
    config["sizes"] = dict(results.config.sizes)
    slugs = list(dict.fromkeys([c.contender for c in results.cells]))
    slugs += [p.contender for p in results.sweep if p.contender not in slugs]
    contenders = {
        slug: {
            "name": CONTENDERS[slug].name if slug in CONTENDERS else slug,
            "how": CONTENDERS[slug].how if slug in CONTENDERS else "",
            "note": CONTENDERS[slug].note if slug in CONTENDERS else "",
        }
        for slug in slugs
    }
    cells = []
    for cell in results.cells:
        d = asdict(cell)
        d["time_s"] = cell.time_s
        cells.append(d)
    return {
        "schema": SCHEMA,
        "started": results.started,
        "finished": results.finished,
        "command": results.command,
        "config": config,
        "machine": results.machine,
        "workloads": results.workload_info,
        "contenders": contenders,
        "cells": cells,
        "sweep": [asdict(p) for p in results.sweep],
        "notes": list(results.notes),
    }


def write_json(results: Results, out_dir: Path) -> Path:
    """Write results.json (atomically: a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_json(results), indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ markdown


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.01:
        return f"{seconds:.3f} s"
    return f"{seconds * 1e3:.2f} ms"


def _fmt_ratio(ratio: float) -> str:
    # Two significant digits below 1, so 0.0043x (250 times slower) stays readable.
    if ratio >= 10:
        return f"{ratio:.0f}"
    if ratio >= 1:
        return f"{ratio:.2f}"
    return f"{ratio:.2g}"


def _cells_by(data: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["workload"], c["contender"]): c for c in data["cells"]}


def _serial_s(data: Mapping[str, Any], workload: str) -> float | None:
    cell = _cells_by(data).get((workload, "serial"))
    if cell and cell["status"] == "ok":
        return float(cell["time_s"])
    return None


def _cell_text(cell: Mapping[str, Any] | None, serial_s: float | None, repeat: int) -> str:
    if cell is None:
        return ""
    status = cell["status"]
    if status == "n/a":
        return "n/a"
    if status == "timeout":
        return "**timeout**"
    if status == "error":
        return "**error**"
    t = cell["time_s"]
    text = ("≈" if cell["scaled_s"] is not None else "") + _fmt_s(t)
    if status == "FAIL":
        return f"**FAIL** {text}"
    if serial_s and t:
        text += f" {_fmt_ratio(serial_s / t)}x"
    runs = len(cell["times_s"])
    if runs < repeat:
        text += f" ({runs})"
    return text


def best_peer(data: Mapping[str, Any], workload: str) -> tuple[str, float] | None:
    """The fastest peer left at its defaults (not serial, powerpool, tuned or warm)."""
    best: tuple[str, float] | None = None
    for cell in data["cells"]:
        slug = cell["contender"]
        if cell["workload"] != workload or cell["status"] != "ok":
            continue
        if slug in _NOT_DEFAULT_PEERS or slug.startswith("pp-"):
            continue
        t = cell["time_s"]
        if t is not None and (best is None or t < best[1]):
            best = (slug, float(t))
    return best


def _load(machine: Mapping[str, Any], when: str) -> str:
    values = machine.get(f"loadavg_{when}")
    return ", ".join(f"{v:.1f}" for v in values) if values else "-"


def _machine_rows(machine: Mapping[str, Any]) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items() if v)
    pools = []
    for info in machine.get("threadpools", []):
        pools.append(
            f"{info.get('internal_api')} {info.get('version')} "
            f"({info.get('threading_layer')}, {info.get('architecture')}): "
            f"{info.get('num_threads')} threads"
        )
    env = ", ".join(f"{k}={v}" for k, v in machine.get("env", {}).items()) or "(none set)"
    rows = [
        ("CPU", f"{machine.get('cpu_model')}"),
        (
            "cores",
            f"{machine.get('logical_cores')} logical, {machine.get('physical_cores')} "
            f"physical, {machine.get('usable_cores')} usable by this process",
        ),
        ("memory", f"{machine.get('memory_gib')} GiB"),
        (
            "Python",
            f"{machine.get('python')} ({machine.get('python_implementation')}), "
            f"multiprocessing start method {machine.get('start_method')}",
        ),
        ("platform", f"{machine.get('platform')}"),
        ("packages", packages),
        ("BLAS/OpenMP pools (threadpoolctl)", "; ".join(pools) or "(none found)"),
        ("thread env vars", env),
        ("git commit", f"{machine.get('git_commit') or '(none)'}"),
        (
            "load average (1, 5, 15 min) at start / end",
            f"{_load(machine, 'start')} / "
            f"{_load(machine, 'end')} (other processes sharing the cores)",
        ),
    ]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def markdown(data: Mapping[str, Any]) -> str:
    """The results as a Markdown report."""
    config = data["config"]
    repeat = int(config["repeat"])
    workloads: dict[str, dict[str, Any]] = data["workloads"]
    contenders: dict[str, dict[str, Any]] = data["contenders"]
    by = _cells_by(data)
    lines = [
        "# powerpool benchmark results",
        "",
        f"Run {data['started']} to {data.get('finished') or '(unfinished)'}, "
        f"{'quick' if config['quick'] else 'default'} sizes, "
        f"median of up to {repeat} runs per cell.",
        "",
        f"Command: `{data['command']}`",
        "",
        "## Machine",
        "",
        *_machine_rows(data["machine"]),
        "",
        "## Workloads",
        "",
        "| workload | items | serial per item | what it is |",
        "|---|---:|---:|---|",
    ]
    for name, info in workloads.items():
        per_item = info.get("serial_per_item_ms")
        per_item_text = f"{per_item:.3g} ms" if per_item is not None else "-"
        lines.append(
            f"| {info['title']} (`{name}`) | {info['n_items']:,} | {per_item_text} "
            f"| {info['description']} |"
        )
    lines += [
        "",
        "## Time per workload",
        "",
        "Wall time of `map` over all items, pool start-up and shutdown included, "
        "median of the runs. `Nx` is the speedup over the serial loop (below 1: "
        "slower than serial). `(k)`: only k runs (a cell stops repeating once it "
        f"would pass {config['cell_s']:g} s). `≈`: run on fewer items; the time "
        "beyond the one-item time is scaled linearly to the full size (see notes). "
        "**FAIL**: results differ from the serial loop's. "
        f"**timeout**: stopped after {config['budget_s']:g} s. n/a: the contender "
        "needs a coroutine variant the workload does not have.",
        "",
        "| contender | " + " | ".join(workloads[w]["title"] for w in workloads) + " |",
        "|---|" + "---:|" * len(workloads),
    ]
    for slug, meta in contenders.items():
        if not any((w, slug) in by for w in workloads):
            continue
        row = [_cell_text(by.get((w, slug)), _serial_s(data, w), repeat) for w in workloads]
        lines.append(f"| {meta['name']} | " + " | ".join(row) + " |")
    problems = [c for c in data["cells"] if c["status"] in ("FAIL", "error", "timeout")]
    if problems:
        lines += ["", "Problems:", ""]
        for c in problems:
            name = contenders.get(c["contender"], {}).get("name", c["contender"])
            lines.append(f"- {name} on `{c['workload']}`: {c['status']}: {c['detail']}")
    lines += ["", "### How each contender was called", ""]
    for slug, meta in contenders.items():
        lines.append(f"- **{meta['name']}** (`{slug}`): `{meta['how']}`")
    notes = [m["note"] for m in contenders.values() if m["note"]] + list(data["notes"])
    if notes:
        lines += ["", "### Notes", ""]
        lines += [f"- {n}" for n in notes]
    lines += _auto_vs_peers(data)
    lines += _sweep_table(data)
    return "\n".join(lines) + "\n"


def _auto_vs_peers(data: Mapping[str, Any]) -> list[str]:
    by = _cells_by(data)
    workloads: dict[str, dict[str, Any]] = data["workloads"]
    if not any(slug == "pp-auto" for (_, slug) in by):
        return []
    lines = [
        "",
        "## powerpool auto against the best peer at its defaults",
        "",
        "Peers at defaults, mapping the same (synchronous) function: "
        "ThreadPoolExecutor, ProcessPoolExecutor (chunksize=1), multiprocessing.Pool, "
        "joblib, MPIRE, dask (not the tuned chunksize, not warm rows; asyncio.gather "
        "needs the coroutine rewrite and is set against powerpool asyncio below). "
        "Ratios below 1 mean powerpool is faster.",
        "",
        "| workload | serial | best peer | powerpool auto | auto (warm) | auto / best peer | "
        "auto / serial |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    names = {slug: meta["name"] for slug, meta in data["contenders"].items()}
    for w in workloads:
        serial_s = _serial_s(data, w)
        peer = best_peer(data, w)
        auto = by.get((w, "pp-auto"))
        warm = by.get((w, "pp-auto-warm"))
        auto_s = auto["time_s"] if auto and auto["status"] == "ok" else None
        warm_s = warm["time_s"] if warm and warm["status"] == "ok" else None
        auto_text = _fmt_s(auto_s) if auto_s else (auto["status"] if auto else "-")
        warm_text = _fmt_s(warm_s) if warm_s else (warm["status"] if warm else "-")
        peer_text = f"{names.get(peer[0], peer[0])} {_fmt_s(peer[1])}" if peer else "-"
        vs_peer = f"{auto_s / peer[1]:.2f}" if auto_s and peer else "-"
        vs_serial = f"{auto_s / serial_s:.2f}" if auto_s and serial_s else "-"
        lines.append(
            f"| {workloads[w]['title']} | {_fmt_s(serial_s)} | {peer_text} | {auto_text} "
            f"| {warm_text} | {vs_peer} | {vs_serial} |"
        )
    for w in workloads:
        gather = by.get((w, "asyncio-gather"))
        pp_async = by.get((w, "pp-asyncio"))
        if not (gather and pp_async) or "ok" not in (gather["status"], pp_async["status"]):
            continue
        lines.append(
            f"\nCoroutine variant of {workloads[w]['title']}: asyncio.gather (unbounded) "
            f"{_cell_text(gather, None, 0)}, powerpool asyncio {_cell_text(pp_async, None, 0)}."
        )
    return lines


def _sweep_table(data: Mapping[str, Any]) -> list[str]:
    if not data["sweep"]:
        return []
    names = {slug: meta["name"] for slug, meta in data["contenders"].items()}
    cores = data["machine"].get("usable_cores")
    lines = [
        "",
        "## Worker sweep (CPU-bound workloads)",
        "",
        f"Speedup = serial loop time / time; efficiency = speedup / min(workers, cores) "
        f"with {cores} usable cores here (ideal 1.0). Pool start included.",
        "",
        "| workload | contender | workers | time | speedup | efficiency |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for p in data["sweep"]:
        if p["status"] != "ok":
            lines.append(
                f"| {p['workload']} | {names.get(p['contender'], p['contender'])} | "
                f"{p['workers']} | {p['status']} | | |"
            )
            continue
        lines.append(
            f"| {p['workload']} | {names.get(p['contender'], p['contender'])} | {p['workers']} "
            f"| {_fmt_s(p['median_s'])} | {p['speedup']:.2f} | {100 * p['efficiency']:.0f}% |"
        )
    return lines


def write_markdown(data: Mapping[str, Any], out_dir: Path) -> Path:
    """Write results.md."""
    path = out_dir / "results.md"
    path.write_text(markdown(data))
    return path


# ------------------------------------------------------------------ plots


def _color(slug: str) -> str:
    if slug.startswith("pp-"):
        return "tab:red" if "warm" not in slug else "salmon"
    if slug == "serial":
        return "tab:gray"
    return "tab:blue"


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, max(1, n))
    return math.ceil(n / cols), cols


def write_plots(data: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write times.png and (when there was a sweep) speedup.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    written: list[Path] = []
    workloads: dict[str, dict[str, Any]] = data["workloads"]
    names = {slug: meta["name"] for slug, meta in data["contenders"].items()}
    by = _cells_by(data)
    if workloads:
        rows, cols = _grid(len(workloads))
        fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
        for ax, (w, info) in zip(axes.flat, workloads.items(), strict=False):
            slugs = [s for s in data["contenders"] if (w, s) in by]
            labels, values, colors, marks = [], [], [], []
            for s in slugs:
                cell = by[(w, s)]
                labels.append(names[s] + (" ≈" if cell["scaled_s"] is not None else ""))
                ok = cell["status"] in ("ok", "FAIL") and cell["time_s"]
                values.append(float(cell["time_s"]) if ok else math.nan)
                colors.append(_color(s))
                marks.append("" if cell["status"] == "ok" else cell["status"])
            y = list(range(len(slugs)))
            ax.barh(y, [0 if math.isnan(v) else v for v in values], color=colors)
            ax.set_yticks(y, labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xscale("log")
            # Ticks at 1-2-5 steps with plain labels: matplotlib's default minor
            # labels overlap when a panel spans less than a decade.
            finite = [v for v in values if not math.isnan(v) and v > 0]
            if finite:
                ax.set_xlim(min(finite) / 2, max(finite) * 3)
            lo, hi = ax.get_xlim()
            subs = (1.0, 2.0, 5.0) if hi / lo < 300 else (1.0,)
            ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            for yi, v, mark in zip(y, values, marks, strict=True):
                if not math.isnan(v):
                    ax.text(v, yi, f" {_fmt_s(v)} {mark}", va="center", fontsize=7)
                elif mark:
                    ax.text(ax.get_xlim()[0], yi, f" {mark}", va="center", fontsize=7, color="red")
            ax.set_title(f"{info['title']} ({info['n_items']:,} items)", fontsize=10)
            ax.set_xlabel("wall time, s (log)", fontsize=8)
            ax.grid(axis="x", which="both", alpha=0.3)
        for ax in list(axes.flat)[len(workloads) :]:
            ax.set_visible(False)
        fig.suptitle("Time per workload (lower is better; red = powerpool)", fontsize=12)
        fig.tight_layout()
        path = out_dir / "times.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    if data["sweep"]:
        written.append(_speedup_plot(data, out_dir, plt))
    return written


def _speedup_plot(data: Mapping[str, Any], out_dir: Path, plt: Any) -> Path:
    names = {slug: meta["name"] for slug, meta in data["contenders"].items()}
    cores = int(data["machine"].get("usable_cores") or 1)
    sweep_workloads = list(dict.fromkeys(p["workload"] for p in data["sweep"]))
    fig, axes = plt.subplots(
        2, len(sweep_workloads), figsize=(6 * len(sweep_workloads), 8), squeeze=False
    )
    for col, w in enumerate(sweep_workloads):
        points = [p for p in data["sweep"] if p["workload"] == w and p["status"] == "ok"]
        workers_all = sorted({p["workers"] for p in data["sweep"] if p["workload"] == w})
        ax_s, ax_e = axes[0][col], axes[1][col]
        ideal = [min(x, cores) for x in workers_all]
        ax_s.plot(workers_all, workers_all, ":", color="gray", label="ideal (= workers)")
        ax_s.plot(workers_all, ideal, "--", color="black", label=f"ideal on {cores} cores")
        for slug in dict.fromkeys(p["contender"] for p in points):
            mine = sorted((p for p in points if p["contender"] == slug), key=_workers_key)
            xs = [p["workers"] for p in mine]
            ax_s.plot(xs, [p["speedup"] for p in mine], "o-", label=names.get(slug, slug))
            ax_e.plot(xs, [100 * p["efficiency"] for p in mine], "o-", label=names.get(slug, slug))
        ax_e.axhline(100, linestyle="--", color="black")
        ax_e.axhline(85, linestyle=":", color="gray", label="85% target")
        for ax in (ax_s, ax_e):
            ax.set_xscale("log", base=2)
            ax.set_xticks(workers_all, [str(x) for x in workers_all])
            ax.set_xlabel("workers")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax_s.set_ylabel("speedup over serial loop")
        ax_e.set_ylabel("parallel efficiency, % of min(workers, cores)")
        title = data["workloads"].get(w, {}).get("title", w)
        ax_s.set_title(f"{title}: speedup", fontsize=10)
        ax_e.set_title(f"{title}: efficiency", fontsize=10)
        ax_e.set_ylim(0, 120)
    fig.tight_layout()
    path = out_dir / "speedup.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _workers_key(point: Mapping[str, Any]) -> int:
    return int(point["workers"])


def write_all(data: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write results.md and the plots from results.json data."""
    return [write_markdown(data, out_dir), *write_plots(data, out_dir)]


def load(out_dir: Path) -> dict[str, Any]:
    """Read a results.json written by :func:`write_json`."""
    loaded: dict[str, Any] = json.loads((out_dir / "results.json").read_text())
    return loaded

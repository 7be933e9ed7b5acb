"""Memory per item for :func:`powerpool.profile` (``memory=True``), with tracemalloc.

For each sampled item, :class:`MemoryProbe` records the peak of memory the
item allocated (tracemalloc's traced peak, exact to the block) and the
allocation sites (``file:line``, bytes) that held the memory at that peak.

tracemalloc reports only what is *currently* allocated, so the sites of a peak
that the item frees before returning (a big temporary list) are caught while
the item runs: a trace function (``sys.settrace``) reads the traced total at
every call and return, and at every line of the profiled function's source
file, and takes a snapshot each time the total climbs ``SNAPSHOT_GROWTH``
times above the last snapshot. The highest snapshot is the one reported, and
the report says how close to the peak it was taken. Library code is followed
for calls and returns only (its line events are switched off), so the trace
costs little outside the user's own lines.

A site is the innermost frame that is not tracemalloc's or powerpool's; when
that frame is in a library (``json/decoder.py:353``), ``via`` names the
user's line that led there. If tracemalloc was already running (the caller
started it), it is left running: the peak is still the item's own (the peak
is reset when the item begins), but the sites then include memory allocated
before the item.
"""

from __future__ import annotations

import os
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = ["AllocationSite", "ItemMemory", "MemoryProbe", "format_memory"]

TRACE_DEPTH = 4
"""Frames kept per allocation: enough to find the user's line under a library
call three deep (``json.loads`` -> ``decode`` -> ``raw_decode``), which is
what ``via`` reports. Each frame kept slows every allocation: a loop that
makes a new int per step ran ~50x slower than untraced at depth 1 and ~100x
at depth 4 (a loaded 2-core machine); code that allocates little barely
notices. Lower is faster and loses ``via``."""
SITE_MIN_BYTES = 256 * 2**10
"""No snapshot is taken until an item holds this much: smaller items have no
memory story worth the snapshot's cost (~1-2 us per live block)."""
SNAPSHOT_GROWTH = 1.25
"""A new snapshot only once the traced total reaches this multiple of the last
one: the reported sites are from a moment holding at least 1/1.25 = 80% of the
peak (when the trace saw it), and a steadily growing item takes O(log size)
snapshots. Lower is closer to the peak and slower."""
SNAPSHOT_BUDGET_S = 2.0
"""Seconds of snapshots one item may take (millions of small objects cost
seconds each); past it the best snapshot so far is kept, and the report says
how far below the peak it was taken."""
SITE_LIMIT = 5
"""Allocation sites kept per item."""

_TRACEMALLOC_FILE = os.path.normcase(os.path.abspath(tracemalloc.__file__))
_PACKAGE_DIR = os.path.normcase(os.path.dirname(os.path.abspath(__file__))) + os.sep
"""powerpool's own frames: see :meth:`MemoryProbe._site_of`."""


@dataclass(frozen=True)
class AllocationSite:
    """Where memory held at an item's peak was allocated."""

    file: str
    """Path of the source file of the allocating line."""
    line: int
    """Line number in that file."""
    size_bytes: int
    """Bytes allocated there and still held at the snapshot."""
    blocks: int
    """How many memory blocks (objects, buffers) those bytes are."""
    text: str = ""
    """The line's source text, stripped."""
    via: str = ""
    """``file:line`` of the profiled file's line that led to a site in other code
    (a library); empty when the site is in that file itself."""

    def __str__(self) -> str:
        from ._profile import format_bytes

        where = f"{os.path.basename(self.file)}:{self.line}"
        via = f" (via {self.via})" if self.via else ""
        text = f"  {self.text}" if self.text else ""
        return f"{format_bytes(self.size_bytes):>10}  {where}{via}{text}"


@dataclass(frozen=True)
class ItemMemory:
    """What one sampled item (or one batch of coroutines) allocated."""

    index: int
    """Position of the item in the sample (0-based)."""
    items: int
    """Items it covers: 1, or a batch of coroutines that ran together."""
    peak_bytes: int
    """Most bytes the item held at once above what was allocated before it began
    (tracemalloc's traced peak: Python objects and buffers from Python's
    allocators; memory that C libraries get from malloc directly is not seen)."""
    retained_bytes: int
    """Bytes still held when it returned (its result and anything it kept)."""
    snapshot_bytes: int
    """Traced bytes at the snapshot the ``sites`` come from (0: no snapshot:
    the item stayed below ``SITE_MIN_BYTES`` or could not be traced)."""
    sites: tuple[AllocationSite, ...]
    """Top allocation sites at that snapshot, largest first."""
    seconds: float = 0.0
    """Wall seconds the item ran, traced (tracemalloc slows allocation)."""

    def __str__(self) -> str:
        from ._profile import format_bytes

        last = self.index + self.items - 1
        label = f"item {self.index}" if self.items == 1 else f"items {self.index}-{last}"
        head = (
            f"{label}: peak {format_bytes(self.peak_bytes)}, "
            f"{format_bytes(self.retained_bytes)} still held at return"
        )
        if self.snapshot_bytes and self.peak_bytes:
            share = min(1.0, self.snapshot_bytes / self.peak_bytes)
            if share < 0.95:
                head += f"; sites seen at {share:.0%} of the peak"
        return head


def format_memory(items: tuple[ItemMemory, ...], peak_bytes: int) -> list[str]:
    """The report section for :class:`~powerpool._profile.Profile`'s ``__str__``."""
    from ._profile import format_bytes

    out = [f"  memory per item (tracemalloc): largest peak {format_bytes(peak_bytes)}"]
    worst = max(items, key=lambda item: item.peak_bytes)
    for item in items:
        out.append(f"    {item}")
        if item is worst:
            out.extend(f"      {site}" for site in item.sites)
    if not worst.sites:
        out.append(
            "      (no allocation sites: the peak stayed under "
            f"{format_bytes(SITE_MIN_BYTES)} or could not be traced)"
        )
    return out


class MemoryProbe:
    """Measures each sampled item's memory peak and where it was allocated.

    The profiler's item-probe shape: :meth:`before` and :meth:`after` bracket
    each item, :meth:`fields` gives the Profile fields afterwards.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        code = _code_of(fn)
        self._user_file = code.co_filename if code is not None else None
        self._items: list[ItemMemory] = []
        self._other_tracer = False
        self.notes: list[str] = [
            "memory=True: items ran under tracemalloc (allocation-heavy code up to ~100x "
            "slower); times include it"
        ]
        self._started_tracing = False
        self._active = False
        self._tracing = False
        self._base = 0
        self._best: tracemalloc.Snapshot | None = None
        self._best_level = 0
        self._next_level = 0
        self._snapshot_s = 0.0
        self._t0 = 0.0

    def before(self) -> None:
        """Start tracing allocations (right before an item runs)."""
        self._started_tracing = not tracemalloc.is_tracing()
        if self._started_tracing:
            tracemalloc.start(TRACE_DEPTH)
        else:
            tracemalloc.reset_peak()
        self._base = tracemalloc.get_traced_memory()[0]
        self._best, self._best_level, self._snapshot_s = None, 0, 0.0
        self._next_level = self._base + SITE_MIN_BYTES
        self._tracing = sys.gettrace() is None
        if self._tracing:
            sys.settrace(self._on_call)
        elif not self._other_tracer:
            self._other_tracer = True
            self.notes.append(
                "memory: another tracer (a debugger, coverage) holds sys.settrace, so "
                "allocation sites were read only when items returned (freed temporaries missed)"
            )
        self._active = True
        self._t0 = time.perf_counter()

    def after(self, index: int, count: int) -> None:
        """Stop tracing; record items ``index..index+count-1`` (right after they ran)."""
        seconds = time.perf_counter() - self._t0
        if not self._active:
            return
        self._active = False
        if self._tracing:
            sys.settrace(None)
            self._tracing = False
        self._check()  # the result and what the item kept are still held here
        current, peak = tracemalloc.get_traced_memory()
        best, level = self._best, self._best_level
        self._best = None
        if self._started_tracing:
            tracemalloc.stop()
        sites = self._sites(best) if best is not None else ()
        self._items.append(
            ItemMemory(
                index=index,
                items=count,
                peak_bytes=max(0, peak - self._base),
                retained_bytes=max(0, current - self._base),
                snapshot_bytes=max(0, level - self._base) if best is not None else 0,
                sites=sites,
                seconds=seconds,
            )
        )

    def fields(self, items_wall_s: float) -> dict[str, Any]:
        """``memory_items`` and ``peak_alloc_bytes`` for the Profile."""
        del items_wall_s
        return {
            "memory_items": tuple(self._items),
            "peak_alloc_bytes": max((item.peak_bytes for item in self._items), default=0),
        }

    # -- the trace function ----------------------------------------------------------

    def _on_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        del event, arg
        self._check()
        if frame.f_code.co_filename != self._user_file:
            frame.f_trace_lines = False  # library code: its return is enough
        return self._on_event

    def _on_event(self, frame: FrameType, event: str, arg: Any) -> Any:
        del frame, event, arg
        self._check()
        return self._on_event

    def _check(self) -> None:
        current = tracemalloc.get_traced_memory()[0]
        if current < self._next_level or self._snapshot_s > SNAPSHOT_BUDGET_S:
            return
        t0 = time.perf_counter()
        self._best = None  # free the old snapshot before taking the next
        self._best = tracemalloc.take_snapshot()
        self._best_level = current
        self._next_level = self._base + int((current - self._base) * SNAPSHOT_GROWTH)
        self._snapshot_s += time.perf_counter() - t0

    def _sites(self, snapshot: tracemalloc.Snapshot) -> tuple[AllocationSite, ...]:
        import linecache

        # Group the raw traces by traceback: Snapshot.statistics() builds an
        # object per block and takes seconds on a million small objects.
        raw = getattr(snapshot.traces, "_traces", None)
        by_traceback: dict[Any, list[int]] = {}
        if raw is not None:
            for trace in raw:  # (domain, size, frames most recent first, total frames)
                entry = by_traceback.setdefault(trace[2], [0, 0])
                entry[0] += trace[1]
                entry[1] += 1
        else:  # pragma: no cover - a Python without the private list: the public, slower way
            for stat in snapshot.statistics("traceback"):
                frames = tuple((f.filename, f.lineno) for f in reversed(stat.traceback))
                by_traceback[frames] = [stat.size, stat.count]
        sites: dict[tuple[str, int, str], list[int]] = {}
        for frames, (size, blocks) in by_traceback.items():
            key = self._site_of(frames)
            if key is not None:
                entry = sites.setdefault(key, [0, 0])
                entry[0] += size
                entry[1] += blocks
        ranked = sorted(sites.items(), key=lambda item: item[1][0], reverse=True)
        return tuple(
            AllocationSite(
                file=file,
                line=line,
                size_bytes=size,
                blocks=blocks,
                text=linecache.getline(file, line).strip(),
                via=via,
            )
            for (file, line, via), (size, blocks) in ranked[:SITE_LIMIT]
        )

    def _site_of(self, frames: tuple[tuple[str, int], ...]) -> tuple[str, int, str] | None:
        """(file, line, via) of one traceback, innermost frame first; None: the profiler's.

        A powerpool frame met before any frame of the profiled file marks the
        profiler's own allocations: its bookkeeping, or its heartbeat thread
        (tracemalloc traces every thread; the user's code always sits inside
        powerpool's frames, never under them).
        """
        site: tuple[str, int] | None = None
        for filename, line in frames:
            if filename == self._user_file:
                if site is None:
                    return filename, line, ""
                return site[0], site[1], f"{os.path.basename(filename)}:{line}"
            path = os.path.normcase(os.path.abspath(filename))
            if path.startswith(_PACKAGE_DIR):
                return None
            if site is None and path != _TRACEMALLOC_FILE:
                site = (filename, line)
        return None if site is None else (site[0], site[1], "")


def _code_of(fn: Any) -> Any:
    from ._lineprof import _plain_function

    function = _plain_function(fn)
    return getattr(function, "__code__", None)

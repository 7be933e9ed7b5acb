"""The profiler's frozen records: :class:`Profile`, :class:`Hotspot`, :class:`Workload`.

Also re-exports the unit formatters (``1.2 ms``, ``1.5 KiB``, from :mod:`powerpool._units`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._units import format_bytes, format_seconds

if TYPE_CHECKING:
    from .._lineprof import LineTiming
    from .._memprof import ItemMemory

__all__ = ["Hotspot", "Profile", "Workload", "format_bytes", "format_seconds"]

NATIVE_THREADS_RATIO = 1.2
"""Process CPU above this multiple of wall time proves code ran outside the GIL
in several threads at once (BLAS, OpenMP): one Python thread cannot do that."""


class Workload(str, enum.Enum):
    """What limits the work, as measured.

    * ``io``: the item mostly waits (network, disk, sleep): threads overlap it.
    * ``cpu-gil``: it computes in Python and holds the GIL: processes parallelize it.
    * ``cpu-native``: it computes in native code that releases the GIL (numpy,
      hashlib on big buffers, zlib) or in native threads: threads parallelize it.
    * ``async``: a coroutine function: an event loop overlaps it.
    * ``tiny``: each item is cheaper than any pool's per-item overhead: run a loop.
    """

    IO = "io"
    CPU_GIL = "cpu-gil"
    CPU_NATIVE = "cpu-native"
    ASYNC = "async"
    TINY = "tiny"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Hotspot:
    """One function from the cProfile run (``hotspots=True``)."""

    function: str
    """``name (file:line)``, or the built-in's name."""
    calls: int
    """How many times it was called during the sample."""
    cumulative_s: float
    """Seconds spent in it and its callees, summed over the whole sample."""
    own_s: float = 0.0
    """Seconds spent in its own code, callees excluded."""

    def __str__(self) -> str:
        return (
            f"{self.function}: {format_seconds(self.cumulative_s)} cumulative, "
            f"{format_seconds(self.own_s)} own, {self.calls} calls"
        )


@dataclass(frozen=True, repr=False)
class Profile:
    """What running the function on a sample of real items showed.

    Times are means per item; a first call much slower than the rest (cold
    cache, lazy import) is left out of the means and noted in ``evidence``.
    With ``hotspots=True`` the times include cProfile's own overhead.
    """

    items: int
    """Number of items that ran (every one exactly once)."""
    wall_per_item_s: float
    """Wall-clock seconds per item (for coroutines: latency of one coroutine)."""
    cpu_per_item_s: float
    """Process CPU seconds per item: every thread, native thread pools included."""
    thread_cpu_per_item_s: float
    """CPU seconds per item spent in the calling thread only."""
    gil_held_fraction: float
    """0..1, the heartbeat's score: GIL waits per heartbeat tick (Linux) or its
    lateness over the switch interval (elsewhere); ~1: the function holds the
    GIL, ~0: it releases it. 0.0 when not measured, see ``gil_measured``."""
    arg_pickle_bytes: int
    """Mean pickled size of one item's arguments, bytes (0: not measured)."""
    result_pickle_bytes: int
    """Mean pickled size of one result, bytes (0: not measured)."""
    pickle_per_item_s: float
    """Seconds to pickle and unpickle one item's arguments and result."""
    peak_rss_bytes: int
    """Highest resident memory of this process seen while sampling, bytes: read
    around each item, plus getrusage's lifetime peak if it rose meanwhile
    (0: not measured, items lighter than ``HEAVY_CALL_S``)."""
    workload: Workload
    """The classification (see :class:`Workload`)."""
    evidence: tuple[str, ...]
    """Measurements behind ``workload``, in plain words."""
    hotspots: tuple[Hotspot, ...]
    """Top functions by cumulative time (empty unless ``hotspots=True``)."""
    profiling_s: float
    """Total seconds the profile took, running the items included."""
    function: str = ""
    """Qualified name of the profiled function."""
    max_wall_s: float = 0.0
    """Wall-clock seconds of the slowest item."""
    errors: int = 0
    """How many of the sampled items raised."""
    gil_measured: bool = False
    """Whether the heartbeat measured the GIL (items long enough, GIL enabled);
    when not, CPU-bound work is assumed to hold it."""
    gil_disabled: bool = False
    """True on a free-threaded build running with the GIL off: threads run
    Python code in parallel."""
    fn_pickle_bytes: int = 0
    """Pickled size of the function itself, sent once per worker (0: not measured)."""
    needs_cloudpickle: bool = False
    """Plain pickle failed on the function, an argument or a result; cloudpickle worked."""
    unpicklable: str | None = None
    """Why the function, an argument or a result cannot be pickled at all
    (so it cannot go to another process), or None."""
    rss_growth_bytes: int = 0
    """How far resident memory rose above its level before the sampled items."""
    overhead_s: float = 0.0
    """Seconds the profiler added on top of running the items (``profiling_s``
    minus their wall time)."""
    runqueue_per_item_s: float = 0.0
    """Seconds per item the calling thread was ready but waited for a CPU (a
    loaded machine); left out when judging computing against waiting. Linux
    only, else 0."""
    line_timings: tuple[LineTiming, ...] = ()
    """Slowest source lines, slowest first (empty unless ``lines=``)."""
    memory_items: tuple[ItemMemory, ...] = ()
    """Memory peak and top allocation sites of each sampled item (empty unless
    ``memory=True``)."""
    peak_alloc_bytes: int = 0
    """The largest memory peak one item allocated, bytes, from tracemalloc
    (0: not measured, see ``memory_items``)."""

    @property
    def cpu_ratio(self) -> float:
        """Process CPU / wall time per item (0: waiting, 1: one busy core, >1: several)."""
        return self.cpu_per_item_s / self.wall_per_item_s if self.wall_per_item_s > 0 else 0.0

    @property
    def uses_native_threads(self) -> bool:
        """Whether the item kept more than one core busy through native threads."""
        return self.cpu_ratio > NATIVE_THREADS_RATIO

    def __str__(self) -> str:
        name = self.function or "function"
        lines = [
            f"{name}: {self.workload.value} ({self.items} items sampled in "
            f"{format_seconds(self.profiling_s)})"
        ]
        gil = (
            f"GIL held {self.gil_held_fraction:.0%}"
            if self.gil_measured
            else "GIL off"
            if self.gil_disabled
            else "GIL not measured"
        )
        lines.append(
            f"  per item  {format_seconds(self.wall_per_item_s)} wall, "
            f"{format_seconds(self.cpu_per_item_s)} CPU (calling thread "
            f"{format_seconds(self.thread_cpu_per_item_s)}), {gil}"
        )
        if self.unpicklable:
            lines.append(f"  pickling  impossible: {self.unpicklable}")
        elif not (self.arg_pickle_bytes or self.result_pickle_bytes or self.fn_pickle_bytes):
            lines.append("  pickling  not measured (only CPU work could go to processes)")
        else:
            fn_size = (
                f", function {format_bytes(self.fn_pickle_bytes)}" if self.fn_pickle_bytes else ""
            )
            lines.append(
                f"  pickling  args {format_bytes(self.arg_pickle_bytes)}, result "
                f"{format_bytes(self.result_pickle_bytes)}, "
                f"{format_seconds(self.pickle_per_item_s)} per item{fn_size}"
                + (" (cloudpickle)" if self.needs_cloudpickle else "")
            )
        if self.peak_rss_bytes:
            lines.append(
                f"  memory    peak RSS {format_bytes(self.peak_rss_bytes)} "
                f"(+{format_bytes(self.rss_growth_bytes)} while sampling)"
            )
        if self.errors:
            lines.append(f"  errors    {self.errors} of {self.items} items raised")
        lines.extend(f"  - {line}" for line in self.evidence)
        if self.hotspots:
            lines.append("  hot spots")
            lines.extend(f"    {i}. {spot}" for i, spot in enumerate(self.hotspots, 1))
        if self.line_timings:
            from .._lineprof import format_lines

            lines.extend(format_lines(self.line_timings))
        if self.memory_items:
            from .._memprof import format_memory

            lines.extend(format_memory(self.memory_items, self.peak_alloc_bytes))
        return "\n".join(lines)

    def __repr__(self) -> str:
        # What a REPL or a notebook shows for a bare ``prof``: the readable
        # report that print() gives, not the dataclass's wall of fields.
        return str(self)

    def _repr_html_(self) -> str:
        from .._report_html import text_html

        return text_html(str(self))

"""Measure a sample of the real work, and say what kind of work it is.

:func:`profile` (public) and :func:`profile_calls` (used by ``backend="auto"``)
run the caller's function on a few real items in the calling thread and
return a frozen :class:`Profile`: time per item (wall, calling-thread CPU,
whole-process CPU), how much of that time the GIL was held, how big and how
slow the arguments and results are to pickle, memory, optional cProfile hot
spots, and a :class:`Workload` class with the evidence for it. On request,
line timings (``lines=``, :mod:`~powerpool._lineprof`) and memory per item
(``memory=True``, :mod:`~powerpool._memprof`) are taken by item probes that
bracket each sampled item.

How the GIL is measured: while the items run, a heartbeat thread sleeps
1 ms again and again (:class:`~powerpool._probes.Heartbeat`). Waking needs
the GIL: if the function holds it (pure Python), every tick must block until
the interpreter forces a switch (5 ms later); if it releases it (sleeping,
hashlib on big buffers, zlib, most numpy loops), ticks never block. On Linux
the heartbeat's voluntary context switches are counted (a tick that only
slept costs one; a tick that also waited for the GIL, two or more), which
a loaded machine does not disturb: waiting for a CPU is not voluntary. The
score is near 1 for GIL-holding code and near 0 for GIL-releasing code.

How computing is told from waiting: CPU time against the time the calling
thread was blocked, leaving out the time it was queued for a CPU (Linux
schedstat), so a CPU-bound item on a busy machine does not look like waiting.

Cost discipline (``auto`` profiles every run): the first call is timed bare.
Only if an item takes at least ``HEAVY_CALL_S`` does the profiler start the
heartbeat thread and read memory; sampling 8 trivial calls costs about
0.1 ms. With ``stop_early`` (the default of :func:`profile_calls`) one slow
waiting item is enough evidence and sampling stops after it; slow computing
items get one more item with the heartbeat, more only while its evidence is
thin or mixed (at most ``SLOW_MAX_ITEMS``).

The package, by concept:

* :mod:`.record`: the frozen records (:class:`Profile`, :class:`Hotspot`,
  :class:`Workload`) and the unit formatters the reports share.
* :mod:`.measure`: the entry points, :func:`profile` and :func:`profile_calls`.
* :mod:`.sampling`: running the items (plain and coroutine functions) and
  collecting raw measurements, within a budget.
* :mod:`.hotspots`: cProfile and the ranking of the user's hot spots.
* :mod:`.classify`: from raw measurements to a :class:`Profile` and its
  :class:`Workload`, with the evidence in words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .record import Hotspot, Profile, Workload, format_bytes, format_seconds

if TYPE_CHECKING:
    from .measure import profile, profile_calls

__all__ = [
    "Hotspot",
    "Profile",
    "Workload",
    "format_bytes",
    "format_seconds",
    "profile",
    "profile_calls",
]


def __getattr__(name: str) -> Any:
    # The records load with the package and the profiler on first use: auto
    # loads the records mid-run to plan, and must not pay for the profiler.
    # It keeps a cold pp.map fast.
    if name in ("profile", "profile_calls"):
        from . import measure

        return getattr(measure, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

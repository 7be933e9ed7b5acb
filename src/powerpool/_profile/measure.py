"""The profiler's entry points: :func:`profile` (public) and :func:`profile_calls` (auto).

How the measuring works is told in the package's docstring
(:mod:`powerpool._profile`); the sampling loops are in :mod:`.sampling`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .classify import _build_profile
from .record import Profile
from .sampling import Call, Outcome, _Budget, _is_coroutine_function, _sample_async, _sample_sync

if TYPE_CHECKING:
    from .._itemprobe import ItemProbe

__all__ = ["profile", "profile_calls"]


def profile(
    fn: Callable[..., Any],
    sample: Iterable[Any],
    *,
    max_items: int = 8,
    max_seconds: float = 0.5,
    hotspots: bool = False,
    lines: bool | str = False,
    memory: bool = False,
    star: bool = False,
) -> Profile:
    """Run ``fn`` on up to ``max_items`` items of ``sample`` and describe the work.

    Each element of ``sample`` is one argument (``star=True``: a tuple of
    arguments). Items run one at a time in the calling thread, until
    ``max_items`` ran or the next one would overrun ``max_seconds``.
    Exceptions from ``fn`` are counted in ``errors``, not raised.
    ``hotspots=True`` also runs cProfile (slows pure Python ~2x).
    ``lines=True`` times each line of ``fn`` with line_profiler
    (``pip install "powerpool[profile]"``); ``lines="file"`` also the lines
    of every function and method defined in ``fn``'s source file.
    ``memory=True`` records each item's memory peak and the lines that
    allocated it, with tracemalloc. Both slow the items and show in
    ``line_timings``, ``memory_items`` and the printed report.
    """
    from .._itemprobe import item_probes

    probes = item_probes(fn, lines=lines, memory=memory)
    calls: Iterator[Call] = ((tuple(x), {}) if star else ((x,), {}) for x in sample)
    prof, _ = profile_calls(
        fn,
        calls,
        max_items=max_items,
        max_seconds=max_seconds,
        hotspots=hotspots,
        stop_early=False,
        thorough=True,
        probes=probes,
    )
    if prof.items == 0:
        raise ValueError("profile() needs a sample with at least one item")
    return prof


def profile_calls(
    fn: Callable[..., Any],
    calls: Iterable[Call],
    *,
    max_items: int = 8,
    max_seconds: float = 0.3,
    hotspots: bool = False,
    stop_early: bool = True,
    thorough: bool = False,
    probes: Sequence[ItemProbe] = (),
) -> tuple[Profile, list[Outcome]]:
    """Profile ``fn`` on calls pulled one at a time from ``calls``; keep the outcomes.

    Each consumed call runs exactly once in the calling thread (a coroutine
    function's coroutines on a private event loop, in a helper thread if this
    thread already runs a loop). Returns the profile and the outcomes, in
    order, of exactly the calls consumed: ``(True, result)`` or
    ``(False, exception)`` with its traceback; exceptions are never raised
    (an exception raised by ``calls`` itself propagates).

    Sampling stops after ``max_items`` calls, when the next call would overrun
    ``max_seconds``, and with ``stop_early`` after one slow (>= 5 ms) waiting
    item, or 2 to 4 slow computing ones (more while the heartbeat's evidence
    is thin or mixed). ``thorough`` (used by :func:`profile`)
    measures pickling even for work that no process pool would get.
    ``probes`` (see :func:`~powerpool._itemprobe.item_probes`) bracket each item.
    An empty ``calls`` gives a profile with ``items == 0``.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    budget = _Budget(max_items, max_seconds, hotspots, stop_early, time.perf_counter(), probes)
    it = iter(calls)
    if _is_coroutine_function(fn):
        raw = _sample_async(fn, it, None, budget)
    else:
        raw = _sample_sync(fn, it, budget)
    prof = _build_profile(fn, raw, budget.t_start, thorough)
    if probes:
        fields: dict[str, Any] = {}
        notes: list[str] = []
        for probe in probes:
            fields.update(probe.fields(sum(raw.walls)))
            notes.extend(probe.notes)
        prof = dataclasses.replace(prof, evidence=(*prof.evidence, *notes), **fields)
    return prof, raw.outcomes


# --------------------------------------------------------------------------- sampling

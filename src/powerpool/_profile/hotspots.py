"""Hot spots: cProfile around the sampled items, and the user's functions ranked.

The profiler's own frames (this package, :mod:`~powerpool._probes` and the
item loop that calls each sampled item) and
everything only they called are left out, so the ranking shows the user's code.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .. import _probes
from .._backends import _itemloop
from .record import Hotspot

if TYPE_CHECKING:
    from .sampling import _Raw

HOTSPOT_LIMIT = 8
"""How many hot spots a profile keeps."""

_OWN_DIR = os.path.normcase(os.path.dirname(os.path.abspath(__file__)))
"""The profiler package's folder: frames from its files never count as hot spots."""
_PROBES_FILE = os.path.normcase(os.path.abspath(_probes.__file__))
"""...nor those from the heartbeat's module..."""
_ENGINE_FILE = os.path.join(os.path.dirname(_PROBES_FILE), "_coroutines.py")
"""...nor the event-loop engine's (whose ``call`` awaits each sampled coroutine;
named, not imported: importing it imports asyncio, ~30 ms on auto's first run)..."""
_ITEM_LOOP_FILE = os.path.normcase(os.path.abspath(_itemloop.__file__))
"""...nor the item loop's, whose ``call`` runs each sampled plain item."""
_ENTRIES = ("timed", "call")
"""The profiler's frames that call the user's function: what they call counts."""


def _start_cprofile(raw: _Raw) -> Any:
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.enable()
    except ValueError as exc:  # 3.12+: another profiler or coverage tool is active
        raw.notes.append(f"hot spots unavailable: {exc}")
        return None
    raw.notes.append("timed under cProfile (hotspots=True): pure Python runs up to ~2x slower")
    return prof


def _hotspots(prof: Any) -> tuple[Hotspot, ...]:
    import pstats

    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def ours(key: tuple[str, int, str]) -> bool:
        path = os.path.normcase(os.path.abspath(key[0]))
        return (
            path in (_PROBES_FILE, _ENGINE_FILE, _ITEM_LOOP_FILE)
            or os.path.dirname(path) == _OWN_DIR
        )

    # Leave out the profiler's own frames and everything only they called
    # (timers, the event loop's machinery, the heartbeat), but never what its
    # entry points called: that is the user's function. Calls from frames that
    # were already running when cProfile started have no recorded caller.
    entries = {key for key in stats if ours(key) and key[2] in _ENTRIES}
    excluded = {key for key in stats if ours(key)}
    changed = True
    while changed:
        changed = False
        for key, entry in stats.items():
            callers = entry[4]
            if (
                key not in excluded
                and not any(c in entries for c in callers)
                and all(c in excluded or ours(c) for c in callers)
            ):
                excluded.add(key)
                changed = True
    ranked = sorted(
        (item for item in stats.items() if item[0] not in excluded),
        key=lambda item: item[1][3],
        reverse=True,
    )
    spots = []
    for (filename, line, name), (_cc, calls, own, cumulative, _callers) in ranked[:HOTSPOT_LIMIT]:
        label = name if filename == "~" else f"{name} ({os.path.basename(filename)}:{line})"
        spots.append(
            Hotspot(
                function=label, calls=int(calls), cumulative_s=float(cumulative), own_s=float(own)
            )
        )
    return tuple(spots)

"""Opt-in detail for the profiler: probes that bracket each sampled item.

The profiler (:mod:`~powerpool._profile`) times every item itself; a user
who also asks *which line* takes the time (``lines=``, :mod:`~powerpool._lineprof`)
or *which line* allocates the memory (``memory=True``, :mod:`~powerpool._memprof`)
gets item probes, each called right before and right after every item, whose
results become fields of the :class:`~powerpool._profile.Profile`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["ItemProbe", "item_probes"]


class ItemProbe(Protocol):
    """Extra measurement around each sampled item."""

    notes: list[str]
    """Words for the profile's evidence (what the probe cost, what it missed)."""

    def before(self) -> None:
        """Called right before an item (or a batch of coroutines) runs."""

    def after(self, index: int, count: int) -> None:
        """Called right after items ``index..index+count-1`` ran; a no-op unless
        :meth:`before` was called since (so a ``finally`` may call it again)."""

    def fields(self, items_wall_s: float) -> dict[str, Any]:
        """Profile fields to set once sampling is over (``items_wall_s``: the
        sampled items' summed wall time)."""


def item_probes(fn: Callable[..., Any], *, lines: bool | str, memory: bool) -> list[ItemProbe]:
    """The probes that ``lines=`` and ``memory=`` of :func:`powerpool.profile` ask for.

    Raises ImportError naming the install command when ``lines`` needs
    line_profiler and it is missing, ValueError for a bad ``lines``.
    """
    from ._lineprof import line_scope

    probes: list[ItemProbe] = []
    scope = line_scope(lines)
    if memory:  # first: its trace function must be set before line_profiler wraps it
        from ._memprof import MemoryProbe

        probes.append(MemoryProbe(fn))
    if scope is not None:
        from ._lineprof import LineProbe

        probes.append(LineProbe(fn, scope))
    return probes

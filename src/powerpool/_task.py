"""The unit of work that travels between the pool core and a backend.

The pool core (``_run.py``, ``_pool.py``) cuts the caller's items into
:class:`Chunk` s; a backend runs each chunk somewhere and hands back one
:class:`ChunkResult` holding one outcome per item, in the chunk's order.
Backends never retry, reorder or count: that is the core's job, written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Chunk", "ChunkResult", "Item", "ItemLost", "Outcome"]

Item = tuple[int, tuple[Any, ...], dict[str, Any]]
"""One call: (index in the caller's input, positional args, keyword args)."""

Outcome = tuple[bool, Any]
"""(True, result) or (False, exception) for one item."""


class ItemLost(Exception):  # noqa: N818 - an outcome marker, not an error users see
    """Outcome for an item that never ran because its worker died on another item.

    The core re-queues such items without counting a retry: they did nothing wrong.
    """


def _always() -> bool:
    return True


@dataclass(eq=False)
class Chunk:
    """A batch of calls of one function, sent to one worker in one message."""

    id: int
    """Unique within the pool; used by backends' ledgers."""
    fn: Callable[..., Any]
    """The function to call for every item."""
    items: list[Item]
    """The calls, in order."""
    timeout_s: float | None = None
    """Per-item time limit in seconds, or None for none."""
    epoch: int = 0
    """Cancel epoch at submission; ``should_stop()`` turns true once the pool's
    cancelled epoch reaches it."""
    claim: Callable[[], bool] = field(default=_always)
    """Called by the backend just before it starts the chunk; False means the
    chunk was cancelled meanwhile and must be dropped without a result."""
    on_done: Callable[[ChunkResult], None] | None = None
    """Where the pool core wants this chunk's result; backends call the
    ``deliver`` they were given, which routes here."""


@dataclass(eq=False)
class ChunkResult:
    """What a backend reports for a finished (or failed) chunk."""

    chunk: Chunk
    """The chunk this result belongs to."""
    outcomes: list[Outcome]
    """One per item of ``chunk.items``, same order."""
    worker: str
    """Name of the worker that ran it (for statistics)."""
    busy_s: float
    """Seconds the worker spent computing the chunk (excludes queueing and IPC)."""

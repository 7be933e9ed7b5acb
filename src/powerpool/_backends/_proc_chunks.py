"""Per-chunk pieces of the process engine's parent side, apart from the dispatcher.

What the chunk header tells a worker (:func:`calling_convention`,
:func:`trace_level`), a chunk waiting for a worker (:class:`Pending`), and the
outcomes the parent builds for a chunk: results decoded from a worker's reply
(:func:`decoder`), items blamed after a death or a timeout (:func:`blame`),
a whole chunk failed (``ChunkResult.failed``), items whose arguments cannot be
pickled told apart from the rest (:func:`sort_picklable`), and a chunk split
in the parent put back together (:func:`merge_parts`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from .._chunk import Chunk, ChunkResult, Item, ItemLost, Outcome
from .._errors import SerializationError
from ._shm import Packed, Table, unpack
from ._wire import dumps, salvage, unframe
from ._worker import BARE, KEYWORDS, STAR, TRACE_CHUNKS, TRACE_ITEMS

__all__ = [
    "ITEM_TRACE_MAX_ITEMS",
    "Pending",
    "blame",
    "calling_convention",
    "decoder",
    "merge_parts",
    "sort_picklable",
    "trace_level",
]

ITEM_TRACE_MAX_ITEMS = 256
"""With a report asked for, chunks of at most this many items also time each
item (one clock read and one append per item in the worker, 0.2-0.5 us);
bigger chunks are timed as a whole. Chunks aim at 0.1 s of work, so in a
steady run this times items of 0.4 ms and more (cost <= 0.1%); a higher
limit would show shorter items one by one, but the chunk sizer's ramp-up
(chunks of 1, 2, 3 ... items) would then time thousands of tiny items, a
visible share of a run of trivial ones (measured: benchmarks/report_cost.py)."""


class Pending:
    """A chunk waiting for an idle worker, its arguments already pickled."""

    __slots__ = ("chunk", "payload")

    def __init__(self, chunk: Chunk, payload: Packed) -> None:
        self.chunk = chunk
        self.payload = payload


def trace_level(chunk: Chunk) -> int:
    """What the worker measures for this chunk: nothing unless a report was asked for."""
    if chunk.recorder is None:
        return 0
    return TRACE_ITEMS if len(chunk) <= ITEM_TRACE_MAX_ITEMS else TRACE_CHUNKS


def calling_convention(chunk: Chunk) -> int:
    """How the worker calls fn with each payload entry (see _worker.BARE/STAR/KEYWORDS)."""
    if chunk.kwargs is not None:
        return KEYWORDS
    return STAR if chunk.star else BARE


def blame(chunk: Chunk, position: int, error: BaseException) -> list[Outcome]:
    """Outcomes for a chunk whose worker died or ran late at ``position``.

    Items before it had finished but their results died with the worker, items
    after it never ran: both are re-queued (ItemLost). Position -1 means the
    worker died before any item started: nobody is blamed.
    """
    outcomes: list[Outcome] = [(False, ItemLost())] * len(chunk)
    if 0 <= position < len(chunk):
        outcomes[position] = (False, error)
    return outcomes


def decoder(
    body: bytes, table: Table | None, views: list[Any], n_items: int
) -> Callable[[], tuple[list[Outcome] | None, list[Any] | None]]:
    """Unpickle a worker's results later, in the consumer's thread (see ChunkResult)."""

    def decode() -> tuple[list[Outcome] | None, list[Any] | None]:
        try:
            message = unpack(body, table, views)
        except Exception as exc:  # some item loaded in the worker, not here (see _wire)
            return salvage(lambda: unpack(body, table, views, salvaging=True), exc, n_items), None
        return unframe(message)

    return decode


def sort_picklable(
    chunk: Chunk, worker_problem: str | None
) -> tuple[list[Item], list[tuple[Item, Outcome]]]:
    """``chunk``'s items whose arguments pickle, and the others with their errors.

    With ``worker_problem`` (the worker could not unpickle the payload), the
    test is a round trip instead.
    """
    good: list[Item] = []
    bad: list[tuple[Item, Outcome]] = []
    verb = "pickled to send them to" if worker_problem is None else "unpickled in"
    for item in chunk.items:
        try:
            blob = dumps(item[1:])
            if worker_problem is not None:
                pickle.loads(blob)
            good.append(item)
        except Exception as exc:
            error = SerializationError(
                f"the arguments of item {item[0]} could not be {verb} a worker "
                f"process: {type(exc).__name__}: {exc}"
            )
            bad.append((item, (False, error)))
    return good, bad


def merge_parts(part: ChunkResult, whole: Chunk, failed: list[tuple[Item, Outcome]]) -> ChunkResult:
    """The result of ``whole``, a chunk split in the parent: the part sent to a
    worker (``part``) and the items that failed here (``failed``), in order."""
    by_index = dict(zip(part.chunk.indices, part.outcomes))
    by_index.update((item[0], outcome) for item, outcome in failed)
    outcomes = [by_index[index] for index in whole.indices]
    return ChunkResult(whole, outcomes, part.worker, part.busy_s)

"""Chunk sizing: amortize per-message overhead without starving workers.

A chunk is the unit a backend ships to a worker. Too small and the fixed cost
per chunk (a pipe round trip for processes, ~50-100 us; ~1 ms per Dask task)
dominates trivial items; too large and the last chunks leave cores idle while
one worker finishes (skewed durations make that worse). The sizer starts at
one item per chunk, measures the real per-item compute time from finished
chunks, and aims each new chunk at the backend's ``chunk_target_s``, capped
so that a known-length input still yields at least ``CHUNKS_PER_WORKER``
chunks per worker for load balancing, and at most ``max_chunk_bytes`` of
measured results (so big results keep the caller's memory bounded in bytes,
not only in items: chunks of 1 MB results once grew to 600 items).

Toward the end of a known-length input the chunks taper (guided
self-scheduling), but never below the backend's ``chunk_floor_s`` of
measured work: on a backend whose every chunk costs a network round trip
(Dask), a tail of one-item chunks would leave workers waiting on the
scheduler instead of computing.
"""

from __future__ import annotations

import math

__all__ = ["CHUNKS_PER_WORKER", "ChunkSizer"]

CHUNKS_PER_WORKER = 4
"""Lower bound on chunks per worker for known-length inputs: more chunks balance
skewed item durations better, fewer cost less overhead; 4 keeps the idle tail
under ~1/4 of a chunk per worker on average."""

MAX_CHUNK_ITEMS = 65536
"""Upper bound for unknown-length inputs, so one chunk's results stay small in memory."""

_DECAY = 0.5
"""How much of the past each new chunk keeps in the per-item average. The
average is weighted by items, so one big chunk outweighs the tiny first ones
(whose time is mostly fixed overhead) and the size ramps up in a few steps."""


class ChunkSizer:
    """Chooses the size of the next chunk from measured per-item time."""

    def __init__(
        self,
        *,
        fixed: int | None,
        target_s: float,
        workers: int,
        total: int | None,
        floor_s: float = 0.0,
        max_chunk_bytes: int | None = None,
    ) -> None:
        if fixed is not None and fixed < 1:
            raise ValueError(f"chunksize must be >= 1, got {fixed}")
        self._fixed = fixed
        self._target_s = target_s
        self._per_item_s: float | None = None
        self._busy_s = 0.0
        self._items = 0.0
        self._floor_s = floor_s
        self._workers = max(1, workers)
        self._remaining = total  # items not yet cut into chunks (None: unknown)
        self._max_chunk_bytes = max_chunk_bytes
        self._bytes = 0.0  # decayed result bytes, weighted like _busy_s
        self._bytes_items = 0.0

    @property
    def per_item_s(self) -> float | None:
        """Smoothed compute seconds per item, once measured."""
        return self._per_item_s

    @property
    def bytes_per_item(self) -> float | None:
        """Smoothed result bytes per item, once measured."""
        return self._bytes / self._bytes_items if self._bytes_items else None

    def seed(self, per_item_s: float) -> None:
        """Start from a known per-item time (e.g. from the profiler)."""
        self._per_item_s = per_item_s

    def resize(self, *, workers: int, target_s: float) -> None:
        """The backend's capacity changed (workers joined or left a cluster)."""
        self._workers = max(1, workers)
        self._target_s = target_s

    def limit_bytes(self, max_chunk_bytes: int | None) -> None:
        """Cap each chunk's results at ``max_chunk_bytes`` from now on (the window changed)."""
        self._max_chunk_bytes = max_chunk_bytes

    def _cap(self) -> int:
        # Guided self-scheduling: the cap shrinks with what is left, so the
        # last chunks are small and a slow item near the end holds up one
        # small chunk, not a quarter of a worker's share.
        if self._remaining is None:
            cap = MAX_CHUNK_ITEMS
        else:
            cap = max(1, math.ceil(self._remaining / (self._workers * CHUNKS_PER_WORKER)))
        return cap

    def _bytes_cap(self, size: int) -> int:
        """``size``, cut so that the chunk's results stay within max_chunk_bytes."""
        per_item = self.bytes_per_item
        if self._max_chunk_bytes is None or not per_item:
            return size
        return max(1, min(size, int(self._max_chunk_bytes / per_item)))

    def next_size(self) -> int:
        if self._fixed is not None:
            return self._fixed
        if self._per_item_s is None:
            return 1
        if self._per_item_s <= 0:
            return self._bytes_cap(self._cap())
        cap = max(self._cap(), int(self._floor_s / self._per_item_s))
        return self._bytes_cap(max(1, min(cap, int(self._target_s / self._per_item_s))))

    def taken(self, n_items: int) -> None:
        """Note that ``n_items`` fresh items were cut into a chunk."""
        if self._remaining is not None:
            self._remaining = max(0, self._remaining - n_items)

    def observe(self, n_items: int, busy_s: float, nbytes: int | None = None) -> None:
        """Feed back one finished chunk (``nbytes``: its results' size, if measured)."""
        if self._fixed is not None or n_items <= 0:
            return
        if nbytes is not None:
            self._bytes = self._bytes * _DECAY + nbytes
            self._bytes_items = self._bytes_items * _DECAY + n_items
        self._busy_s = self._busy_s * _DECAY + busy_s
        self._items = self._items * _DECAY + n_items
        self._per_item_s = self._busy_s / self._items

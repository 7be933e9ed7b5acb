"""What the dask backend sends with each task: the function, the initializer, the items.

* :class:`Shipper` gets functions (and the initializer) to the workers once
  per run: small ones inside every task, big ones scattered to every worker
  and copied again to workers that join;
* :func:`pack_items` pickles a chunk's calls, an unpicklable one failing alone;
* :func:`task_name` names tasks readably for the dashboard.

The worker side (unpacking the boxes, running the items) is ``_dask_worker``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from powerpool._chunk import Chunk
from powerpool._errors import SerializationError

from ._dask_worker import _dumps, _Shipped

__all__ = [
    "FN_CACHE_SIZE",
    "INLINE_MAX_BYTES",
    "Box",
    "Shipper",
    "pack_items",
    "pickle_initializer",
    "task_name",
]

# distributed's Client and Future are only partly annotated: handled as Any.
_Client = Any
_Future = Any

Box = _Shipped | _Future
"""How a task reaches a shipped function: the box itself, or a cluster future of it."""

FN_CACHE_SIZE = 4
# Scattered functions kept alive on the cluster. A run uses one function, and
# a warm pool may alternate between a few; each entry pins one copy of the
# function (and whatever a functools.partial carries) in every worker's
# memory, so the cache stays small.

INLINE_MAX_BYTES = 64 * 1024
# A pickled function (or initializer) up to this size travels inside every
# task; a bigger one is scattered to every worker once. Inline costs its
# bytes per task through the scheduler (64 KB x a few hundred tasks/s is
# still small) but lets dask run any chunk on any worker; a scattered one
# ties chunks to the workers holding a copy.


def pickle_initializer(
    initializer: Callable[..., object] | None, initargs: Sequence[Any]
) -> bytes | None:
    """The initializer and its arguments as bytes (None without one); fails early and clearly."""
    if initializer is None:
        return None
    try:
        return _dumps((initializer, tuple(initargs)))
    except Exception as exc:
        raise SerializationError(
            f"the initializer or its initargs could not be pickled: {exc}"
        ) from exc


class Shipper:
    """The functions (and the initializer) one backend has sent to its cluster.

    Thread-safe: the core's threads ship functions while the client's event
    loop asks for the scattered boxes to copy them to new workers.
    """

    def __init__(self, client: _Client, token: str) -> None:
        self._client = client
        self._token = token
        self._lock = threading.Lock()  # held while scattering: blocks only new functions
        self._fns: list[tuple[Callable[..., Any], Box]] = []
        self.initializer: Box | None = None
        """The initializer's box, handed to every task (None: no initializer)."""

    def ship_initializer(self, blob: bytes | None) -> None:
        self.initializer = None if blob is None else self._box(blob)

    def ship(self, fn: Callable[..., Any]) -> Box:
        """Ship ``fn`` once; later chunks of it refer to the same box."""
        with self._lock:
            for i, (known, box) in enumerate(self._fns):
                if known is fn:
                    self._fns.append(self._fns.pop(i))  # most recently used last
                    return box
            try:
                blob = _dumps(fn)
            except Exception as exc:
                raise SerializationError(
                    f"the function {getattr(fn, '__qualname__', fn)!s} could not be pickled: {exc}"
                ) from exc
            box = self._box(blob)
            self._fns.append((fn, box))
            del self._fns[:-FN_CACHE_SIZE]
            return box

    def scattered(self) -> list[_Future]:
        """The cluster futures of the big functions (and initializer) in use."""
        with self._lock:
            boxes = [box for _, box in self._fns if not isinstance(box, _Shipped)]
        if self.initializer is not None and not isinstance(self.initializer, _Shipped):
            boxes.append(self.initializer)
        return boxes

    def clear(self) -> None:
        """Forget every box: dropping the futures lets dask free the shipped copies."""
        with self._lock:
            self._fns.clear()
        self.initializer = None

    def _box(self, blob: bytes) -> Box:
        """What tasks get to reach ``blob``: the box itself, or a cluster future of it.

        A small blob (a function pickled by name, a small closure) travels
        inside each task: a dependency on cluster data would tie every
        chunk to the workers holding a copy (dask runs a task where its
        inputs are), so workers that join later, or come back after a
        restart, would never get work. A big one (a ``functools.partial``
        holding an array) is scattered to every worker once instead, and
        copied again to workers that join (``DaskBackend._refresh_threads``).
        """
        box = _Shipped(blob, self._token)
        if len(blob) <= INLINE_MAX_BYTES:
            return box
        future: _Future = self._client.scatter(box, broadcast=True, hash=False)
        return future


def pack_items(chunk: Chunk) -> tuple[bytes, list[int], dict[int, BaseException]]:
    """Pickle the calls of ``chunk``; an item that cannot be pickled fails alone.

    Returns (blob of the sent calls, their positions in the chunk, position ->
    error of the items that never left this process).
    """
    calls = [(args, kwargs) for _index, args, kwargs in chunk.items]
    try:
        return _dumps(calls), list(range(len(calls))), {}
    except Exception:
        pass  # find the culprits one by one: the rare path, so the double work is fine
    sent: list[int] = []
    prefailed: dict[int, BaseException] = {}
    for pos, call in enumerate(calls):
        try:
            _dumps(call)
        except Exception as exc:
            err = SerializationError(
                f"the arguments of item {chunk.items[pos][0]} could not be pickled: {exc}"
            )
            err.__cause__ = exc
            prefailed[pos] = err
        else:
            sent.append(pos)
    blob = _dumps([calls[pos] for pos in sent]) if sent else b""
    return blob, sent, prefailed


def task_name(fn: Callable[..., Any]) -> str:
    """A readable task prefix for the dashboard, e.g. ``powerpool-is_prime-...``."""
    inner = getattr(fn, "func", fn)  # functools.partial shows what it wraps
    raw = getattr(inner, "__name__", type(inner).__name__)
    return re.sub(r"[^A-Za-z0-9_]", "_", raw)[:40] or "fn"

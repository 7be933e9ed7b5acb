"""How the process engine's parent pickles the functions it sends to workers.

:class:`FunctionCache` keeps each run's function pickled once, keyed weakly by
the function, with the content digest workers cache it by (see
``Worker.remember`` in :mod:`._proc_workers`); :func:`dumps_function` is the
one rule for pickling a function or an initializer for a worker.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .._chunk import Chunk
from .._mainfn import digest
from ._wire import dumps

__all__ = ["FN_CACHE", "FunctionCache", "dumps_function"]

FN_CACHE = 64
"""Functions kept pickled in the parent (one entry per distinct function);
re-pickling a closure over a large array per chunk is what this avoids."""


def dumps_function(fn: Callable[..., Any]) -> bytes:
    """Pickle a function (or initializer) for the workers: by name where they
    can import it, by value otherwise, ``__main__``'s always (see _mainfn)."""
    return dumps(fn)


class FunctionCache:
    """Pickled functions by ``id(fn)``, for the runs that are still going on."""

    def __init__(self, lock: threading.Lock) -> None:
        # The backend's lock: it guards this cache and its pending queue alike.
        self._lock = lock
        # id(fn) -> (reference to fn, to the run it was pickled for, content
        # digest, pickled fn). Weak where possible: the cache must not keep a
        # function (and what its closure or bound object holds) alive after
        # the caller dropped it; the entry goes with the function, so an id is
        # never reused for a stale entry.
        self._fn_ids: OrderedDict[
            int, tuple[Callable[[], Any], Callable[[], Any], bytes, bytes]
        ] = OrderedDict()

    def pickled(self, chunk: Chunk) -> tuple[bytes, bytes]:
        """(content digest, pickled bytes) of the chunk's function.

        Pickled once per run (a map, a submit): what a function captures by
        value (a ``__main__`` global, a closure cell, a partial's arguments)
        may have changed since the last run, and the workers must see that.
        Workers cache functions by this digest, so an unchanged function is
        still never sent twice. Within a run the pickle is reused: pickling
        a closure over a large array once per chunk is what this avoids.
        """
        fn = chunk.fn
        run = _run_of(chunk)
        key = id(fn)
        with self._lock:
            entry = self._fn_ids.get(key)
            if entry is not None and entry[0]() is fn and entry[1]() is run:
                self._fn_ids.move_to_end(key)
                return entry[2], entry[3]
        blob = dumps_function(fn)
        fn_id = digest(blob)
        try:
            run_ref: Callable[[], Any] = weakref.ref(run)
        except TypeError:
            return fn_id, blob  # nothing to recognise the run by: pickle per chunk
        cache = self._fn_ids
        ref: Callable[[], Any]
        try:

            def forget(dead: weakref.ref[Any]) -> None:
                # Runs when fn dies, maybe inside any thread's critical section:
                # no lock, just one atomic dict operation.
                if cache.get(key, (None,))[0] is dead:
                    cache.pop(key, None)

            ref = weakref.ref(fn, forget)
        except TypeError:  # builtins and the like: they outlive us anyway
            ref = functools.partial(_same, fn)
        with self._lock:
            cache[key] = (ref, run_ref, fn_id, blob)
            if len(cache) > FN_CACHE:
                cache.popitem(last=False)
        return fn_id, blob


def _same(value: Any) -> Any:
    return value


def _run_of(chunk: Chunk) -> object:
    """What the chunk belongs to: the chunks of one map share their ``claim``'s
    owner (the core's Run), a ``submit``'s its future (or retry closure)."""
    return getattr(chunk.claim, "__self__", chunk.claim)

"""How functions and data travel to workers (:func:`dumps`), and telling coroutine functions apart.

The loop that calls the user's function on each item is
``_backends/_itemloop.py``.
"""

from __future__ import annotations

import inspect
import pickle
from functools import partial
from typing import Any

from ._mainfn import by_value

__all__ = ["dumps", "is_coroutine_function"]


def is_coroutine_function(fn: object) -> bool:
    """True for ``async def`` functions, partials of them and objects with async ``__call__``."""
    while isinstance(fn, partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the bound __call__ itself
    return call is not None and inspect.iscoroutinefunction(call)


def dumps(obj: Any) -> bytes:
    """pickle, else cloudpickle: what has to cross a process boundary, either way.

    Plain pickle first (fast, and by name, so workers import the real
    module); cloudpickle for what it refuses (lambdas, closures) and for
    anything that names ``__main__``: workers never import the user's
    script, so its functions and classes travel by value (see
    :mod:`powerpool._mainfn`, which also explains how they share globals).
    """
    try:
        blob = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return by_value(obj)
    # A byte search (memchr speed): false positives, a "__main__" string in
    # the data, only cost a cloudpickle pass.
    if _MAIN in blob:
        return by_value(obj)
    return blob


_MAIN = b"__main__"

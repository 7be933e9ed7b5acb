"""Running a chunk's items where the worker is, turning each call into an outcome.

Shared by every backend (serial, threads, process workers, Dask workers), so a
task behaves the same wherever it runs: exceptions become outcomes (never
escape the worker loop), the stop token is current while items run, and the
per-item hook lets backends that enforce timeouts know which item is running.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable
from functools import partial
from typing import Any

from ._mainfn import by_value
from ._stop import StopToken, running
from ._task import NO_KWARGS, Chunk, Outcome

__all__ = ["dumps", "is_coroutine_function", "run_items"]


def run_items(
    fn: Callable[..., Any],
    chunk: Chunk,
    token: StopToken,
    mark: Callable[[int], None] | None = None,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """Call ``fn`` for every item; ``mark(i)`` is called just before item ``i`` starts.

    Outcomes are appended to ``outcomes`` (a new list if None) as items finish,
    so a watchdog can take the finished ones if the chunk is abandoned.
    """
    if outcomes is None:
        outcomes = []
    append = outcomes.append
    kwargs_list = chunk.kwargs or [NO_KWARGS] * len(chunk.args)
    args_list = chunk.args if chunk.star else [(arg,) for arg in chunk.args]
    with running(token):
        for position, (args, kwargs) in enumerate(zip(args_list, kwargs_list)):
            if mark is not None:
                mark(position)
            try:
                append((True, fn(*args, **kwargs)))
            except KeyboardInterrupt:
                raise  # Ctrl-C in the caller's thread (serial backend) stops the run
            except BaseException as exc:
                # SystemExit included: a task calling sys.exit() must fail its
                # item, not silently end a worker thread its caller waits on.
                append((False, exc))
    return outcomes


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

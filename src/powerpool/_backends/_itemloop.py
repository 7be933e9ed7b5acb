"""The one loop that calls the user's function, and its one exception policy.

Every backend runs a chunk's items here (serial, threads, process workers,
Dask workers), and the profiler calls each sampled item through :func:`call`,
so a task behaves the same wherever it runs.

**Policy.** Whatever an item raises becomes that item's error, ``BaseException``
included, with one exception:

* ``Exception``: the item's error (retried per ``retry_on``, then
  ``errors="raise|return|skip"``).
* ``SystemExit`` (a task calling ``sys.exit()``): the item's error, on every
  backend. A task is not the program: ending a worker (a crash on processes,
  a silently dead thread elsewhere) would blame the chunk's other items too.
* ``KeyboardInterrupt``: propagates when the loop runs in the caller's own
  thread (``in_caller=True``: the serial backend, the profiler), where it is
  the user's Ctrl-C and must stop the run. Anywhere else it can only have been
  raised by the function itself (signals reach only a process's main thread,
  and process workers ignore SIGINT), so it is the item's error.
* ``GeneratorExit``, ``asyncio.CancelledError`` and any other ``BaseException``:
  the item's error. None of them is addressed to this loop (it is not a
  generator, nor a task of an event loop).

Errors that are not the item's own (a worker killed, a timeout) are reported
by the backends, not here. The table of faults and what each backend makes
of them is ``tests/test_faults.py``; ``docs/process-engine.md`` has it in words.

**Conventions.** A chunk's entries are bare arguments (``BARE``: ``fn(x)``),
argument tuples (``STAR``: ``fn(*args)``) or ``(args, kwargs)`` pairs
(``KEYWORDS``). :func:`run_chunk` has a fast branch for the first two: when no
per-item bookkeeping beyond the position is asked for, the calls run with no
Python work per item but the call itself (in C through ``map`` when even the
position is not wanted), and only after a failure does the loop go item by
item. This module is imported in every worker process: keep it small.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import starmap
from typing import TYPE_CHECKING, Any

from .._chunk import Outcome

if TYPE_CHECKING:
    from .._chunk import Chunk

__all__ = [
    "BARE",
    "KEYWORDS",
    "OUTCOMES",
    "STAR",
    "VALUES",
    "ItemWatch",
    "call",
    "chunk_entries",
    "run_chunk",
]

BARE, STAR, KEYWORDS = 0, 1, 2
"""Calling conventions of a chunk's entries: ``fn(x)``, ``fn(*args)``, ``fn(*args, **kwargs)``."""

VALUES, OUTCOMES = "values", "outcomes"
"""What :func:`run_chunk` returns: every result (all succeeded), or ``(ok, value)`` per item."""

_NO_KWARGS: dict[str, Any] = {}


class ItemWatch:
    """Per-item bookkeeping around the general loop: where the loop is, whether to go on.

    The base class watches nothing. Backends override ``started`` (e.g. publish
    the position and start time, for crash blame and timeouts) and ``finished``
    (e.g. stamp the item's end, stop once a worker's budget is spent).
    """

    __slots__ = ()

    def started(self, position: int) -> bool:
        """Item ``position`` is about to start; False skips it and every later item."""
        return True

    def finished(self, position: int) -> bool:
        """Item ``position``'s outcome was just appended; False stops before the next one."""
        return True


_NOTHING = ItemWatch()


def chunk_entries(chunk: Chunk) -> tuple[list[Any], int]:
    """A chunk's calls as entries and their convention (in-process backends).

    No work per item unless some call has keyword arguments (``submit``
    with keywords, re-queued items): only then are ``(args, kwargs)`` paired up.
    """
    if chunk.kwargs is None:
        return chunk.args, STAR if chunk.star else BARE
    args = chunk.args if chunk.star else [(arg,) for arg in chunk.args]
    return list(zip(args, chunk.kwargs, strict=True)), KEYWORDS


def call(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, in_caller: bool
) -> Outcome:
    """One call of ``fn``, by the policy above (the profiler times items one by one)."""
    try:
        return True, fn(*args, **kwargs)
    except BaseException as exc:
        if in_caller and isinstance(exc, KeyboardInterrupt):
            raise  # the user's Ctrl-C (see the policy above)
        return False, exc


def run_chunk(
    fn: Callable[..., Any],
    entries: list[Any],
    convention: int,
    watch: ItemWatch | None = None,
    *,
    in_caller: bool,
    positions: Any = None,
    slot: int = 0,
    ends: list[float] | None = None,
    outcomes: list[Outcome] | None = None,
) -> tuple[str, list[Any]]:
    """Call ``fn`` on every entry: ``(VALUES, results)`` if all succeeded, else
    ``(OUTCOMES, [(ok, value), ...])``, possibly fewer than the entries when
    ``watch`` stopped the loop.

    Without a ``watch`` and with no keyword arguments, the fast branch runs:
    ``positions[slot] = position`` before each item when ``positions`` is
    given (a process worker's shared status, for crash blame), and
    ``ends.append(perf_counter())`` after each when ``ends`` is given (a
    report's item times); neither: the calls run in C. After a failure, or
    with a ``watch``, items go one by one through the general loop, which
    appends to ``outcomes`` as items finish (so a watchdog can take the
    finished ones if it gives the chunk up) and keeps ``positions`` and
    ``ends`` up to date too.
    """
    if outcomes is None:
        outcomes = []
    if watch is None and convention != KEYWORDS and not outcomes:
        values: list[Any] = []
        append = values.append
        try:
            if ends is not None:  # a report asked for item times: one clock read each
                stamp, clock = ends.append, time.perf_counter
                for position, entry in enumerate(entries):
                    if positions is not None:
                        positions[slot] = position
                    append(fn(entry) if convention == BARE else fn(*entry))
                    stamp(clock())
            elif positions is None:
                # list.extend appends as it goes: after an error, ``values``
                # holds the items before it, so no item runs twice.
                values.extend(map(fn, entries) if convention == BARE else starmap(fn, entries))
            elif convention == BARE:
                for position, arg in enumerate(entries):
                    positions[slot] = position
                    append(fn(arg))
            else:
                for position, args in enumerate(entries):
                    positions[slot] = position
                    append(fn(*args))
            return VALUES, values
        except BaseException as exc:
            if in_caller and isinstance(exc, KeyboardInterrupt):
                raise  # the user's Ctrl-C (see the policy above)
            outcomes.extend([(True, value) for value in values])
            outcomes.append((False, exc))
        if ends is not None:
            ends.append(time.perf_counter())  # the failed item's end
    _run_each(
        fn, entries, convention, watch or _NOTHING, in_caller, positions, slot, ends, outcomes
    )
    if all(ok for ok, _ in outcomes):
        return VALUES, [value for _, value in outcomes]
    return OUTCOMES, outcomes


def _run_each(
    fn: Callable[..., Any],
    entries: list[Any],
    convention: int,
    watch: ItemWatch,
    in_caller: bool,
    positions: Any,
    slot: int,
    ends: list[float] | None,
    outcomes: list[Outcome],
) -> None:
    """The general loop: item by item from ``len(outcomes)`` on, the policy on each."""
    append = outcomes.append
    for position in range(len(outcomes), len(entries)):
        if positions is not None:
            positions[slot] = position
        if not watch.started(position):
            return
        entry = entries[position]
        if convention == KEYWORDS:
            args, kwargs = entry
        else:
            args, kwargs = (entry,) if convention == BARE else entry, _NO_KWARGS
        try:
            append((True, fn(*args, **kwargs)))
        except BaseException as exc:
            if in_caller and isinstance(exc, KeyboardInterrupt):
                raise  # the user's Ctrl-C (see the policy above)
            append((False, exc))
        if ends is not None:
            ends.append(time.perf_counter())
        if not watch.finished(position):
            return

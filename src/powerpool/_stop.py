"""Cooperative stop: the stop-flag pattern.

A running task cannot be interrupted safely from outside a thread, so
powerpool gives every task a way to ask: :func:`should_stop` returns True once
the caller cancelled the work (``pool.cancel()``, an early exit from ``imap``,
a timeout that abandoned this thread). Long tasks poll it between steps.

Backends set the current token around each chunk with :func:`running`; the
token is held in a ContextVar so that each asyncio task and each thread sees
its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

__all__ = ["CancelFlag", "StopToken", "running", "should_stop", "use"]


class _HasValue(Protocol):
    value: int


class CancelFlag:
    """The highest cancelled epoch, readable from any thread.

    Invariant: only the pool core writes ``value``, and only upwards. Process
    workers get a ``multiprocessing.RawValue`` with the same ``value``
    attribute; a plain int attribute is enough between threads (a single
    store is atomic under the GIL and in free-threaded builds).
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = -1


class StopToken:
    """Answers "was the work I am running cancelled?" for one chunk."""

    __slots__ = ("_abandoned", "_epoch", "_flag")

    def __init__(self, flag: _HasValue, epoch: int) -> None:
        self._flag = flag
        self._epoch = epoch
        self._abandoned = False

    def abandon(self) -> None:
        """Tell just this task to stop (its item timed out and nobody waits for it)."""
        self._abandoned = True

    def is_set(self) -> bool:
        return self._abandoned or self._flag.value >= self._epoch


_current: ContextVar[StopToken | None] = ContextVar("powerpool_stop_token", default=None)


def should_stop() -> bool:
    """True when the work this task belongs to was cancelled; poll it in long tasks.

    Outside a powerpool task it is always False.
    """
    token = _current.get()
    return token is not None and token.is_set()


@contextmanager
def running(token: StopToken) -> Iterator[None]:
    """Make ``token`` the current one for the code in the block."""
    reset = _current.set(token)
    try:
        yield
    finally:
        _current.reset(reset)


def use(token: StopToken) -> None:
    """Make ``token`` current for the rest of this context, without a block.

    For an asyncio task only: it runs in a copy of the context made for it
    and dropped with it, so nothing needs resetting, and the engine saves a
    ``with running(...)`` per coroutine.
    """
    _current.set(token)

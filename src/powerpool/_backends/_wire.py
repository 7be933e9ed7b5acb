"""Results on their way back from a worker process, framed so that each item fails alone.

A chunk's results travel as one pickle, which the caller unpickles with one
``loads``: per item, that is what trivial work pays. But one result can fail
to pickle in the worker (a lock), or pickle there and fail to unpickle again
(an exception whose ``__init__`` takes other arguments than it pickles, an
object whose ``__setstate__`` raises): in one pickle, that one item would
fail the whole chunk. So the worker checks, and only when the check fails
sends one pickle per item instead::

    ("values", [r0, r1, ...])            every item succeeded          one loads
    ("outcomes", [(ok, value), ...])     some raised (ShippedError)    one loads
    ("framed", oks, item_blobs, ends)    the one pickle would not      a loads per item
                                         pickle or would not load

The check: results that are builtin scalars cannot fail either way (no
imports, no constructors) and pass on a type scan (a C-level pass, about
20 ns per item). A chunk holding anything else is unpickled once in the
worker (in parallel, off the caller's path) before it is sent, and the
classes in it (containers excepted) are trusted from then on: the first
chunk of Fractions pays one extra ``loads``, the next ones only the scan;
every chunk of tuples pays the ``loads`` (about 120 ns per 2-tuple).
``item_blobs`` holds the items' pickles end to end (``ends`` says where each
ends): an item that will not pickle is replaced by a ``SerializationError``
in the worker, one that will not load becomes one in the caller, and its
neighbours keep their results.

Two cases are left to the caller's generic error, which fails the chunk: a
result that loads in the worker but not in the caller (a class the worker can
import and the caller cannot), and an instance of a trusted class that fails
to load when its neighbours of the same class did. Catching those would mean
one pickle per item on every chunk of objects: about three times the
worker's pickling time (measured: Fraction results, 4.5 us against 1.5 us).

The same rules serve both out-of-process backends (the process workers and
the Dask workers), so a result behaves the same wherever it was computed.
"""

from __future__ import annotations

import pickle
import traceback
from array import array
from typing import Any, Final

from .._errors import RemoteTraceback, SerializationError
from .._execute import dumps
from .._task import Outcome

__all__ = [
    "FRAMED",
    "OUTCOMES",
    "VALUES",
    "ShippedError",
    "decode",
    "encode",
    "format_error",
    "frame",
    "unframe",
]


class ShippedError:
    """An exception on its way out of a worker, with its traceback as text.

    The one carrier of remote errors, for process and Dask workers alike.
    Tracebacks and ``__cause__`` do not survive pickling, so the worker
    formats the traceback while it still exists (and an initializer's
    failure brings the original error as ``cause``); unpickling in the
    caller yields the original exception again, its ``__cause__`` the
    rebuilt ``cause`` or else a :class:`RemoteTraceback`.
    """

    __slots__ = ("cause", "exc", "tb")

    def __init__(
        self, exc: BaseException, tb: str | None = None, cause: ShippedError | None = None
    ) -> None:
        self.exc = exc
        self.tb = format_error(exc) if tb is None else tb
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.exc, self.tb, self.cause))

    @classmethod
    def capture(cls, exc: BaseException) -> ShippedError:
        """``exc`` with its traceback, or a stand-in if it would not survive pickling.

        Checked both ways: an ``__init__`` that takes other arguments than
        the exception pickles fails only on loading. Errors are rare, so the
        check is cheap where it matters.
        """
        tb = format_error(exc)
        try:
            pickle.loads(dumps(exc))
        except Exception as problem:
            stand_in = SerializationError(
                f"{type(exc).__name__}: {exc} (the original exception could not be "
                f"pickled: {type(problem).__name__}: {problem})"
            )
            return cls(stand_in, tb)
        return cls(exc, tb)


def _rebuild(exc: BaseException, tb: str, cause: BaseException | None = None) -> BaseException:
    exc.__cause__ = cause if cause is not None else RemoteTraceback(tb)
    return exc


def format_error(exc: BaseException) -> str:
    """The traceback of ``exc`` as text, the way Python prints it."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


VALUES: Final = "values"
OUTCOMES: Final = "outcomes"
FRAMED: Final = "framed"

_SCALARS: Final = frozenset({int, float, str, bytes, bool, type(None), complex})
"""Types whose pickles cannot fail to load anywhere (no import, no constructor)."""
_TRUSTED: set[type] = set()
"""Classes whose values were sent and loaded again in this process: checked once,
trusted after (a class that fails to load, like an exception whose ``__init__``
takes other arguments than it pickles, fails every time and is never added)."""

MAX_TRUSTED = 1024
"""Bound on ``_TRUSTED``: a program minting classes at run time must not grow it
without end; past it, new classes are simply checked every time."""

_CONTAINERS: Final = frozenset({tuple, list, dict, set, frozenset})
"""Never trusted: what they hold varies from one value to the next."""

_ALWAYS: Final = frozenset({object})
"""Chunks with failed items are always checked (errors are rare, and often odd)."""


def _checked(kind: str, results: list[Any]) -> frozenset[type] | None:
    """The classes to check by loading the chunk again, or None when it is safe as is.

    Safe: every value a builtin scalar or of a trusted class. The test is a
    C-level pass (``map(type, ...)`` into a frozenset), about 20 ns per item,
    in the worker. Containers are checked by loading instead: scanning what
    they hold costs more than loading them (measured on 2-tuples: 220 ns
    against 120 ns per item).
    """
    if kind != VALUES:
        return _ALWAYS
    kinds = frozenset(map(type, results))
    return None if kinds <= _SCALARS or kinds <= _SCALARS | _TRUSTED else kinds


def _trust(kinds: frozenset[type]) -> None:
    if len(_TRUSTED) < MAX_TRUSTED:
        _TRUSTED.update(kinds - _CONTAINERS - _ALWAYS)


def frame(kind: str, results: list[Any], pickled: bytes | None = None) -> tuple[Any, ...]:
    """Worker side: the message for a chunk's results, to pickle as one object.

    ``kind`` is ``"values"`` (every item succeeded: ``results`` are the
    values) or ``"outcomes"`` (``(ok, value)`` pairs, failed ones already
    carried by ``ShippedError``). For a backend with its own pickler (shared
    memory for large buffers): ``pickled`` is ``(kind, results)`` already
    pickled, when the caller has it, so the check need not pickle it again.
    The message is ``(kind, results)`` itself unless it had to be framed.
    """
    message = (kind, results)
    kinds = _checked(kind, results)
    if kinds is None:
        return message
    try:
        pickle.loads(pickled if pickled is not None else dumps(message))
    except Exception:
        return _framed(kind, results)  # some item will not pickle, or not load again
    _trust(kinds)
    return message


def encode(kind: str, results: list[Any]) -> bytes:
    """Worker side: the message of :func:`frame`, pickled (once)."""
    try:
        blob = dumps((kind, results))
    except Exception:
        return dumps(_framed(kind, results))  # some item will not pickle
    kinds = _checked(kind, results)
    if kinds is not None:
        try:
            pickle.loads(blob)
        except Exception:
            return dumps(_framed(kind, results))  # some item will not load again
        _trust(kinds)
    return blob


def _framed(kind: str, results: list[Any]) -> tuple[Any, ...]:
    """One pickle per item, end to end; an item that will not pickle fails alone."""
    if kind == VALUES:
        oks, values = [True] * len(results), list(results)
    else:
        oks, values = [ok for ok, _ in results], [value for _, value in results]
    blobs: list[bytes] = []
    ends: array[int] = array("Q")
    size = 0
    for i, value in enumerate(values):
        try:
            blob = dumps(value)
        except Exception as exc:
            what = "result" if oks[i] else "exception"
            error = SerializationError(
                f"the {what} of this item could not be pickled to send it back: "
                f"{type(exc).__name__}: {exc}"
            )
            oks[i] = False
            blob = dumps(ShippedError(error))
        blobs.append(blob)
        size += len(blob)
        ends.append(size)
    return FRAMED, oks, b"".join(blobs), ends.tobytes()


def decode(body: bytes, n_items: int) -> tuple[list[Outcome] | None, list[Any] | None]:
    """Caller side: ``(outcomes, None)``, or ``(None, values)`` when every item succeeded."""
    try:
        message = pickle.loads(body)
    except Exception as exc:  # loaded in the worker, not here (see the module's docstring)
        error = SerializationError(f"a result could not be unpickled here: {exc!r}")
        return [(False, error)] * n_items, None
    return unframe(message)


def unframe(message: tuple[Any, ...]) -> tuple[list[Outcome] | None, list[Any] | None]:
    """Caller side, once the message is unpickled: as :func:`decode`."""
    kind = message[0]
    if kind == VALUES:
        return None, message[1]
    if kind == OUTCOMES:
        return message[1], None
    _, oks, blobs, ends_bytes = message
    ends: array[int] = array("Q")
    ends.frombytes(ends_bytes)
    view = memoryview(blobs)
    outcomes: list[Outcome] = []
    start = 0
    for ok, end in zip(oks, ends):
        try:
            outcomes.append((ok, pickle.loads(view[start:end])))
        except Exception as exc:
            what = "result" if ok else "exception"
            error = SerializationError(
                f"the {what} of this item could not be unpickled here: {type(exc).__name__}: {exc}"
            )
            outcomes.append((False, error))
        start = end
    return outcomes, None

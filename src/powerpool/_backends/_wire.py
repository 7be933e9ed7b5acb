"""Results on their way back from a worker process: each item fails alone.

A chunk's results travel as one pickle, which the caller unpickles with one
``loads``: per item, that is what trivial work pays. But one result can fail
to pickle in the worker (a lock), or pickle there and fail to unpickle in
the caller: an exception whose ``__init__`` takes other arguments than it
pickles, an object whose ``__setstate__`` raises, a class only the worker
can import. In one pickle, that one item would fail the whole chunk, so::

    ("values", [r0, r1, ...])            every item succeeded          one loads
    ("outcomes", [(ok, value), ...])     some raised (ShippedError)    one loads
    ("framed", oks, item_blobs, ends)    the one pickle would not      a loads per item
                                         pickle in the worker

*Won't pickle* is found in the worker (pickling raises) and only then is
the chunk sent framed: one pickle per item, an item that will not pickle
replaced by a ``SerializationError``.

*Won't load* is found where it happens, in the caller: when the one fast
``loads`` raises, :func:`salvage` reads the same bytes again with
:class:`SalvagingUnpickler`, which builds a :class:`Broken` marker wherever
a class cannot be found or a constructor, ``__reduce__`` callable or
``__setstate__`` raises, and goes on; the items that hold a marker fail
with a ``SerializationError`` naming the original error, their neighbours
keep their results. Why this and not one pickle per item on every chunk
of objects (the per-item framing the worker used to fall back to): it
costs nothing until something fails. Measured in one process, 20 000
results (min of 5): one pickle per result costs the caller 3-5x the one
``loads`` (2-tuples 633 against 175 ns per item, small dicts 3 284 against
662, Fractions 10 476 against 3 456: a ``loads`` call per item, and every
item's pickle names its class again) and the worker 2-60x the one
``dumps``; on 200 000 results with warm pools, see benchmarks/RESULTS.md, "Round 3".
The salvaging read is pure Python, ~100x a C ``loads``, and is paid only
by a chunk that failed. It also removed the worker's check-load that the
previous design paid on every chunk of containers or of new classes. The
price: a chunk that fails is unpickled twice, so constructors of its items
before the bad one run twice in the caller.

The same rules serve both out-of-process backends (the process workers and
the Dask workers), so a result behaves the same wherever it was computed;
so does :func:`dumps`, the one rule for how functions and arguments travel.
"""

from __future__ import annotations

import gc
import io
import pickle
import traceback
import types
from array import array
from collections.abc import Callable
from typing import Any, ClassVar, Final

from .._chunk import Outcome
from .._errors import RemoteTraceback, SerializationError
from .._mainfn import by_value as by_value_in_workers

__all__ = [
    "FRAMED",
    "MAIN_MARK",
    "OUTCOMES",
    "VALUES",
    "ShippedError",
    "Broken",
    "SalvagingUnpickler",
    "decode",
    "dumps",
    "encode",
    "format_error",
    "framed",
    "salvage",
    "unframe",
]


MAIN_MARK: Final = b"__main__"
"""In a pickle stream, a reference the workers could not resolve: they never
import the user's script. A byte search (memchr speed); a false positive, a
``"__main__"`` string in the data, only costs a by-value pass."""


def dumps(obj: Any, by_value: Callable[[Any], bytes] = by_value_in_workers) -> bytes:
    """How functions, arguments and results travel, on every out-of-process backend.

    Plain pickle first: fast, and by reference, so workers import the real
    module. By value for what plain pickle refuses (lambdas, closures) and
    for anything that names ``__main__``. ``by_value`` is how: the process
    engine's :func:`powerpool._mainfn.by_value` (a script's functions share
    one namespace per worker, each global installed when its digest changes),
    or plain cloudpickle on Dask, whose workers run tasks on threads that
    namespace is not safe for yet.
    """
    try:
        blob = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return by_value(obj)
    if MAIN_MARK in blob:
        return by_value(obj)
    return blob


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
    # tblib's pickler (which importing distributed installs, on Dask workers and
    # in forked children of a process that imported it) rebuilds these without
    # running their __init__, which derives the attribute from the arguments.
    if isinstance(exc, SystemExit) and exc.code is None and len(exc.args) == 1:
        exc.code = exc.args[0]
    elif isinstance(exc, StopIteration) and exc.value is None and len(exc.args) == 1:
        exc.value = exc.args[0]
    return exc


def format_error(exc: BaseException) -> str:
    """The traceback of ``exc`` as text, the way Python prints it."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


VALUES: Final = "values"
OUTCOMES: Final = "outcomes"
FRAMED: Final = "framed"


def encode(kind: str, results: list[Any]) -> bytes:
    """Worker side: the message for a chunk's results, pickled once.

    ``kind`` is ``"values"`` (every item succeeded: ``results`` are the
    values) or ``"outcomes"`` (``(ok, value)`` pairs, failed ones already
    carried by ``ShippedError``). Framed one pickle per item only when the
    one pickle fails (some item will not pickle).
    """
    try:
        return dumps((kind, results))
    except Exception:
        return dumps(framed(kind, results))


def framed(kind: str, results: list[Any]) -> tuple[Any, ...]:
    """The message with one pickle per item, end to end, for a chunk whose one
    pickle failed: an item that will not pickle fails alone."""
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
    except Exception as exc:  # some item loaded in the worker, not here
        return salvage(lambda: SalvagingUnpickler(io.BytesIO(body)).load(), exc, n_items), None
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
            outcomes.append((False, _unloadable(ok, exc)))
        start = end
    return outcomes, None


def _unloadable(ok: bool, exc: BaseException) -> SerializationError:
    what = "result" if ok else "exception"
    return SerializationError(
        f"the {what} of this item could not be unpickled here: {type(exc).__name__}: {exc}"
    )


# -- salvaging a message that failed to load ------------------------------------------


class Broken:
    """Stands where a value failed to load, with the error; whatever holds it fails.

    Calling it (it may stand for a class or a function that could not be
    imported) gives itself, so the reconstruction goes on around it.
    """

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, *args: Any, **kwargs: Any) -> Broken:
        return self

    def __repr__(self) -> str:
        return f"<unloadable: {type(self.error).__name__}: {self.error}>"


def _call(func: Any, args: Any, kwargs: Any) -> Any:
    """``func(*args, **kwargs)``, or the Broken marker that stands for it."""
    if isinstance(func, Broken):
        return func
    for arg in args:
        if isinstance(arg, Broken):
            return arg
    try:
        return func(*args, **kwargs)
    except Exception as exc:
        return Broken(exc)


_Base: Any = pickle._Unpickler
"""The pure-Python unpickler (private, but stable since Python 3.0 and what dill
subclasses): its opcode table can be amended, the C one's cannot."""


class SalvagingUnpickler(_Base):  # type: ignore[misc]
    """Unpickles what it can: a value that fails to load becomes a :class:`Broken`.

    Every opcode that imports or runs user code is replaced by one that
    catches the error (imports: ``find_class``; calls: REDUCE, NEWOBJ,
    NEWOBJ_EX, OBJ, INST; state and items: BUILD, APPEND(S), SETITEM(S),
    ADDITEMS) and leaves the stack as the opcode would, with the marker in
    place of the value it would have built. Only for a message whose fast
    ``loads`` failed: it is ~100x slower.
    """

    dispatch: ClassVar[dict[int, Any]] = dict(_Base.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except Exception as exc:
            return Broken(exc)

    def _reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        stack[-1] = _call(stack[-1], args, {})

    def _newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_call(cls.__new__, (cls, *args), {}))

    def _newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_call(cls.__new__, (cls, *args), kwargs))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:
        if isinstance(klass, Broken):
            self.append(klass)
            return
        try:
            super()._instantiate(klass, args)
        except Exception as exc:
            self.append(Broken(exc))

    def _onto_top(self, load: Any, marked: bool = False) -> None:
        """Run ``load``, which changes the object at the top of the stack (after
        popping a mark, when ``marked``); a failure leaves a Broken there."""
        depth = len(self.metastack)
        try:
            load(self)
        except Exception as exc:
            if marked and len(self.metastack) == depth:  # failed before popping the mark
                self.pop_mark()
            if not isinstance(self.stack[-1], Broken):  # else keep the first error
                self.stack[-1] = Broken(exc)

    def _build(self) -> None:
        stack = self.stack
        if isinstance(stack[-2], Broken):
            stack.pop()
        elif isinstance(stack[-1], Broken):
            stack[-2] = stack.pop()
        else:
            self._onto_top(_Base.load_build)

    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.NEWOBJ[0]] = _newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _newobj_ex
    dispatch[pickle.BUILD[0]] = _build
    for _code, _load, _marked in (
        (pickle.APPEND, _Base.load_append, False),
        (pickle.APPENDS, _Base.load_appends, True),
        (pickle.SETITEM, _Base.load_setitem, False),
        (pickle.SETITEMS, _Base.load_setitems, True),
        (pickle.ADDITEMS, _Base.load_additems, True),
    ):
        dispatch[_code[0]] = lambda self, load=_load, marked=_marked: self._onto_top(load, marked)
    del _code, _load, _marked


def salvage(load: Callable[[], Any], error: BaseException, n_items: int) -> list[Outcome]:
    """Caller side: the outcomes of a message whose fast ``loads`` raised ``error``.

    ``load`` unpickles the same bytes with a :class:`SalvagingUnpickler`.
    Items that hold a :class:`Broken` marker fail alone; if even that read
    fails, or finds nothing broken, every item fails with ``error``.
    """
    try:
        message = load()
        kind = message[0]
        items = message[1]
        if kind not in (VALUES, OUTCOMES) or len(items) != n_items:
            raise ValueError(f"not a message of {n_items} results")
        outcomes: list[Outcome] = (
            [(True, item) for item in items] if kind == VALUES else list(items)
        )
        found = False
        for i, (ok, value) in enumerate(outcomes):
            broken = _find_broken(value)
            if broken is not None:
                outcomes[i] = (False, _unloadable(ok, broken.error))
                found = True
        if found:
            return outcomes
    except Exception:
        pass
    generic = SerializationError(f"a result could not be unpickled here: {error!r}")
    return [(False, generic)] * n_items


_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, bytes)
"""Not searched for markers: what they refer to was not built from the message."""


def _find_broken(value: Any) -> Broken | None:
    """The first Broken marker reachable from ``value`` (its containers, attributes,
    slots: whatever the garbage collector can see), or None."""
    seen: set[int] = set()
    todo = [value]
    while todo:
        obj = todo.pop()
        if isinstance(obj, Broken):
            return obj
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return None

"""From the command line's ``MODULE:FUNC`` and ``INPUT`` to calls a pool can run.

* :func:`load_function` imports ``pkg.mod:func`` or ``path/to/file.py:func``.
* :func:`read_records` turns JSON Lines (or plain text lines) into
  :class:`Record` s, naming the line of any malformed one.
* :class:`CallRecord` is the callable the pool runs: it applies the user's
  function to one record and returns the result already encoded as JSON, so
  encoding runs in the workers and an unencodable result fails *that item*.

Every problem the user can fix is an :class:`InputError` with a one-line
message; the CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import cloudpickle

__all__ = [
    "AsyncCallRecord",
    "Call",
    "CallRecord",
    "InputError",
    "LoadedFunction",
    "Record",
    "call_record_for",
    "load_function",
    "open_input",
    "read_records",
    "scan_input",
]

Call = tuple[list[Any], dict[str, Any]]
"""Positional and keyword arguments of one call."""


class InputError(Exception):
    """Something on the command line or in the input that the user must fix."""


@dataclass(frozen=True)
class LoadedFunction:
    """A user function and how to name it."""

    spec: str
    """As typed on the command line."""
    normalized: str
    """``module:pkg.mod:func`` or ``file:/abs/path.py:func``: stable across working directories."""
    fn: Callable[..., Any]
    """The function itself."""
    origin: tuple[str, str] | None = None
    """For a function from a file: (absolute path, attribute), so that process
    workers can import the file themselves."""


@dataclass(frozen=True, slots=True)
class Record:
    """One input item."""

    index: int
    """Position among the records, from 0 (blank JSON lines are not records)."""
    line: int
    """Line number in the input, from 1, for messages."""
    value: Any
    """The decoded JSON value, or the text of the line with ``--lines``."""
    call: Call
    """The arguments the function is called with."""


# -- the function -----------------------------------------------------------------


def load_function(spec: str) -> LoadedFunction:
    """Import the callable named by ``pkg.mod:func`` or ``path/to/file.py:func``.

    ``func`` may be dotted (``Class.method``). Modules are looked up from the
    current directory first, as ``python -m`` and most app servers do.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise InputError(f"expected MODULE:FUNC or path/to/file.py:FUNC, got {spec!r}")
    origin = None
    if target.endswith(".py") or os.sep in target or "/" in target:
        module, path = _import_file(Path(target))
        normalized, origin = f"file:{path}", (path, attr)
    else:
        module, normalized = _import_module(target), f"module:{target}"
    obj = _attribute(module, attr, target)
    if not callable(obj):
        raise InputError(f"{spec} is not callable (it is a {type(obj).__name__})")
    return LoadedFunction(spec=spec, normalized=f"{normalized}:{attr}", fn=obj, origin=origin)


def _attribute(module: ModuleType, attr: str, where: str) -> Any:
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InputError(f"{where} has no attribute {attr!r}") from None
    return obj


def _import_module(name: str) -> ModuleType:
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise InputError(f"no module named {name!r} (looked in {os.getcwd()} too)") from None
        raise InputError(f"importing {name!r} failed: {_one_line(exc)}") from None
    except Exception as exc:  # any error while importing user code
        raise InputError(f"importing {name!r} failed: {_one_line(exc)}") from None


def _import_file(path: Path) -> tuple[ModuleType, str]:
    """Import a .py file under a private module name; returns it and its absolute path."""
    try:
        resolved = path.resolve(strict=True)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not resolved.is_file():
        raise InputError(f"cannot read {path}: not a file")
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    # A private module name, so the file can't shadow (or be shadowed by) an
    # installed module with the same stem.
    name = f"powerpool_userfile_{_identifier(resolved.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name], str(resolved)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # Like `python file.py`: the file's own directory comes first, so it can
    # import its sibling modules (spawned workers inherit sys.path).
    if str(resolved.parent) not in sys.path:
        sys.path.insert(0, str(resolved.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # any error while running user code
        del sys.modules[name]
        raise InputError(f"importing {path} failed: {_one_line(exc)}") from None
    return module, str(resolved)


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- the callable the pool runs ---------------------------------------------------


class CallRecord:
    """Apply ``fn`` to one call and return the result encoded as JSON.

    A module-level class so process workers can unpickle it. It decides
    itself how ``fn`` travels: a function from a ``file.py`` as its path and
    name, so each worker imports the file (by-value pickling would lose the
    file name and source lines from tracebacks), plus a copy by value for
    workers on machines without that file (a Dask cluster); anything else
    through cloudpickle (by reference when importable, by value otherwise).
    """

    __slots__ = ("fn", "origin")

    def __init__(self, fn: Callable[..., Any], origin: tuple[str, str] | None = None) -> None:
        self.fn = fn
        self.origin = origin

    def __call__(self, call: Call) -> str:
        args, kwargs = call
        return encode_result(self.fn(*args, **kwargs))

    def __reduce__(self) -> tuple[Any, ...]:
        if self.origin is not None:
            return (_rebuild_from_file, (type(self), *self.origin, _by_value(self.fn)))
        return (_rebuild, (type(self), cloudpickle.dumps(self.fn)))


class AsyncCallRecord(CallRecord):
    """:class:`CallRecord` for ``async def`` functions (the pool awaits it)."""

    __slots__ = ()

    async def __call__(self, call: Call) -> str:  # type: ignore[override]
        args, kwargs = call
        return encode_result(await self.fn(*args, **kwargs))


def _rebuild(cls: type[CallRecord], fn_bytes: bytes) -> CallRecord:
    return cls(cloudpickle.loads(fn_bytes))


def _rebuild_from_file(cls: type[CallRecord], path: str, attr: str, fn_bytes: bytes) -> CallRecord:
    if not os.path.isfile(path):  # a worker on another machine: use the copy by value
        return cls(cloudpickle.loads(fn_bytes), (path, attr))
    module, _ = _import_file(Path(path))  # once per worker: then it is in sys.modules
    return cls(_attribute(module, attr, path), (path, attr))


def _by_value(fn: Callable[..., Any]) -> bytes:
    """``fn`` pickled with its code, for workers that can't read its file."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is None:  # not importable by name: cloudpickle copies it anyway
        blob: bytes = cloudpickle.dumps(fn)
        return blob
    cloudpickle.register_pickle_by_value(module)
    try:
        blob = cloudpickle.dumps(fn)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    return blob


def call_record_for(function: LoadedFunction) -> CallRecord:
    """The right wrapper for the function: async functions get an awaitable one."""
    if inspect.iscoroutinefunction(function.fn):
        return AsyncCallRecord(function.fn, function.origin)
    return CallRecord(function.fn, function.origin)


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
"""Made once: ``json.dumps`` with non-default options builds an encoder per call."""


def encode_result(value: Any) -> str:
    """Strict JSON (no NaN/Infinity), one line, UTF-8 kept readable."""
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the result is not JSON serializable: {exc}") from None


# -- the input --------------------------------------------------------------------


def open_input(path: str | None, *, seekable: bool) -> IO[bytes]:
    """Open INPUT (``-`` or None: stdin) for reading bytes.

    With ``seekable``, stdin is first copied to a temporary file, because
    :func:`scan_input` reads the input before the run does.
    """
    if path is None or path == "-":
        stdin = sys.stdin.buffer
        if not seekable:
            return stdin
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - returned to the caller, who closes it
        shutil.copyfileobj(stdin, spool)
        spool.seek(0)
        return spool
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def scan_input(stream: IO[bytes], *, lines: bool) -> tuple[str, int]:
    """Check every record of a seekable stream; return its SHA-256 (hex) and record count.

    Reading the input once before the run means a malformed line is reported
    before any work starts, and the progress bar knows the total. Rewinds.
    """
    digest = hashlib.sha256()
    stream.seek(0)
    count = sum(1 for _ in read_records(_hashing(stream, digest), lines=lines))
    stream.seek(0)
    return digest.hexdigest(), count


def _hashing(stream: IO[bytes], digest: Any) -> Iterator[bytes]:
    for raw in stream:
        digest.update(raw)
        yield raw


def read_records(stream: Iterable[bytes], *, lines: bool) -> Iterator[Record]:
    """Yield the records of a JSON Lines (or, with ``lines``, plain text) stream.

    JSON Lines: blank lines are skipped; a record that is an object with only
    ``"args"`` (a list) and/or ``"kwargs"`` (an object) is a call, any other
    value is the single argument. Text: every line is one string argument,
    without its line ending (an empty line is an empty string).
    """
    index = 0
    for lineno, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"input line {lineno} is not valid UTF-8 ({exc.reason})") from None
        if lines:
            value: Any = text.rstrip("\r\n")
            yield Record(index, lineno, value, ([value], {}))
            index += 1
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text.rstrip("\r\n"))  # so error columns stay on this line
        except json.JSONDecodeError as exc:
            raise InputError(
                f"input line {lineno} is not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        yield Record(index, lineno, value, _to_call(value, lineno))
        index += 1


def _to_call(value: Any, lineno: int) -> Call:
    if isinstance(value, dict) and value and value.keys() <= {"args", "kwargs"}:
        args = value.get("args", [])
        kwargs = value.get("kwargs", {})
        if not isinstance(args, list):
            raise InputError(f'input line {lineno}: "args" must be a JSON array')
        if not isinstance(kwargs, dict):
            raise InputError(f'input line {lineno}: "kwargs" must be a JSON object')
        return args, kwargs
    return [value], {}

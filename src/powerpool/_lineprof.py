"""Line-level timings for :func:`powerpool.profile` (``lines=True``), with line_profiler.

cProfile (``hotspots=True``) says which *function* takes the time; this says
which *line*. :class:`LineProbe` registers the profiled function (and, with
``lines="file"``, every function and method defined in the same source file)
with `line_profiler <https://github.com/pyutils/line_profiler>`_, turns it on
around each sampled item and off between them, and turns its tables into
:class:`LineTiming` records: the lines that took the most time, with their
share of the items' wall time, hit counts and source text.

Shares are of the wall time of the sampled items, so a line that calls a
function counts that function's time too (a caller's line and its callee's
lines can both be near the top: that is how the time nests).

line_profiler is an optional dependency (``pip install "powerpool[profile]"``):
it is imported only when ``lines=`` asks for it.
"""

from __future__ import annotations

import functools
import inspect
import linecache
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["INSTALL_HINT", "LineProbe", "LineScope", "LineTiming", "format_lines", "line_scope"]

LineScope = Literal["function", "file"]
"""``function``: the profiled function's own lines; ``file``: also every
function and method defined in its source file (helpers it calls)."""

LINE_LIMIT = 10
"""How many lines a profile keeps: enough to see a loop body and its callee,
few enough to read at a glance."""

INSTALL_HINT = 'pip install "powerpool[profile]"'
"""The command that installs line_profiler, named in the error when it is missing."""


@dataclass(frozen=True)
class LineTiming:
    """One source line of the profiled code, timed by line_profiler."""

    file: str
    """Path of the source file."""
    line: int
    """Line number in that file (1-based)."""
    function: str
    """Qualified name of the function the line belongs to."""
    text: str
    """The line's source text, stripped (empty when the source is unavailable)."""
    hits: int
    """How many times the line ran during the sample."""
    total_s: float
    """Seconds spent on the line over the whole sample, its calls included."""
    share: float
    """``total_s`` as a fraction (0..1) of the sampled items' wall time."""

    @property
    def per_hit_s(self) -> float:
        """Mean seconds per execution of the line."""
        return self.total_s / self.hits if self.hits else 0.0

    def __str__(self) -> str:
        from ._profile import format_seconds

        where = f"{os.path.basename(self.file)}:{self.line}"
        return (
            f"{self.share:6.1%}  {format_seconds(self.total_s):>9}  {self.hits:>8} hits  "
            f"{where} ({self.function})  {self.text}"
        )


def line_scope(lines: bool | str) -> LineScope | None:
    """``lines=`` of :func:`powerpool.profile` as a scope; None when off."""
    if lines is False:
        return None
    if lines is True or lines == "function":
        return "function"
    if lines == "file":
        return "file"
    raise ValueError(f"lines must be True, False, 'function' or 'file', not {lines!r}")


def format_lines(timings: tuple[LineTiming, ...]) -> list[str]:
    """The report section for :class:`~powerpool._profile.Profile`'s ``__str__``."""
    out = ["  slowest lines (share of item time, time, hits, where, source)"]
    out.extend(f"    {timing}" for timing in timings)
    return out


class LineProbe:
    """Times the lines of ``fn`` (and its file's functions) around each sampled item.

    Follows the profiler's item-probe shape: :meth:`before` and :meth:`after`
    bracket each item (or batch of coroutines), :meth:`fields` gives the
    :class:`~powerpool._profile.Profile` fields once sampling is over.
    """

    def __init__(self, fn: Callable[..., Any], scope: LineScope) -> None:
        try:
            from line_profiler import LineProfiler
        except ImportError as exc:
            raise ImportError(
                f"profile(lines=...) needs line_profiler, which is not installed: {INSTALL_HINT}"
            ) from exc
        # wrap_trace: a tracer already set (the memory probe's, a debugger's)
        # keeps receiving its events while lines are timed.
        # (the keyword is missing from line_profiler's stubs, not from the class)
        self._profiler = LineProfiler(wrap_trace=True)  # type: ignore[call-arg]
        self._functions = _functions_to_time(fn, scope)
        if not self._functions:
            raise TypeError(f"profile(lines=...) needs a Python function, not {fn!r}")
        for function in self._functions:
            self._profiler.add_function(function)
        self._on = False
        self.notes: list[str] = [
            f"lines={scope!r}: items ran under line_profiler ({len(self._functions)} "
            f"function(s) traced; pure Python ~2-5x slower); times include it"
        ]

    def before(self) -> None:
        """Start timing lines (called right before an item runs)."""
        self._profiler.enable_by_count()
        self._on = True

    def after(self, index: int, count: int) -> None:
        """Stop timing lines (called right after items ``index..index+count-1`` ran)."""
        del index, count  # line timings add up over the whole sample
        if self._on:
            self._profiler.disable_by_count()
            self._on = False

    def fields(self, items_wall_s: float) -> dict[str, Any]:
        """``line_timings`` for the Profile: the top lines by time."""
        stats = self._profiler.get_stats()
        unit = float(stats.unit)
        names = {
            (f.__code__.co_filename, f.__code__.co_firstlineno): f.__qualname__
            for f in self._functions
        }
        rows: list[LineTiming] = []
        for (filename, first_line, name), entries in stats.timings.items():
            function = names.get((filename, first_line), name)
            for line, hits, total in entries:
                seconds = total * unit
                rows.append(
                    LineTiming(
                        file=filename,
                        line=int(line),
                        function=function,
                        text=linecache.getline(filename, int(line)).strip(),
                        hits=int(hits),
                        total_s=seconds,
                        share=seconds / items_wall_s if items_wall_s > 0 else 0.0,
                    )
                )
        rows.sort(key=lambda row: row.total_s, reverse=True)
        return {"line_timings": tuple(rows[:LINE_LIMIT])}


def _functions_to_time(fn: Callable[..., Any], scope: LineScope) -> list[Any]:
    """The plain functions whose lines are timed: ``fn`` itself, then its file's others."""
    target = _plain_function(fn)
    if target is None:
        return []
    found: list[Any] = [target]
    if scope == "file":
        filename = target.__code__.co_filename
        module = sys.modules.get(getattr(target, "__module__", "") or "")
        for value in vars(module).values() if module is not None else ():
            for candidate in _module_functions(value):
                if candidate.__code__.co_filename == filename and all(
                    candidate.__code__ is not f.__code__ for f in found
                ):
                    found.append(candidate)
    return found


def _module_functions(value: Any) -> list[Any]:
    """Functions a module-level name holds: a function, or a class's methods."""
    if inspect.isclass(value):
        out = []
        for attr in vars(value).values():
            inner = attr.__func__ if isinstance(attr, staticmethod | classmethod) else attr
            if isinstance(attr, property):
                inner = attr.fget
            if inspect.isfunction(inner):
                out.append(inner)
        return out
    return [value] if inspect.isfunction(value) else []


def _plain_function(fn: Any) -> Any:
    """The Python function behind ``fn`` (a partial, a bound method, a callable object)."""
    seen = 0
    while seen < 10:  # a bounded unwrap: partials of partials, decorated methods
        seen += 1
        if inspect.isfunction(fn):
            return inspect.unwrap(fn)
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif inspect.ismethod(fn):
            fn = fn.__func__
        elif callable(fn) and inspect.isfunction(getattr(type(fn), "__call__", None)):  # noqa: B004
            fn = type(fn).__call__
        else:
            return None
    return None

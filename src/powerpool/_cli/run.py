"""``powerpool run``: apply a function to every record of an input, resumably.

Data flow::

    INPUT ─► read_records ─► skip journaled ─► Pool.imap / imap_unordered ─► results
                                 ▲                                             │
                        journal (SQLite) ◄── record(index, json) ◄─────────────┤
                                 │                                             │
                   old results ──┴──► merged by index (or first, unordered) ──► OUTPUT
                                                                   failures ──► --errors

Output: ``OUTPUT`` is written as ``OUTPUT.partial`` and renamed when the run
ends, so an output file is never half written. With ``--checkpoint`` the
results of earlier runs are merged back in from the journal, so every run's
output is complete: each index exactly once, in input order unless
``--unordered`` (then earlier results come first, new ones as they finish).

Failures are not journaled: running the same command again retries them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, TextIO

from .._checkpoint import Fingerprint, Journal
from .._errors import CheckpointMismatchError, RemoteTraceback
from .._options import backend_name
from .inputs import (
    InputError,
    LoadedFunction,
    Record,
    call_record_for,
    open_input,
    read_records,
    scan_input,
)

if TYPE_CHECKING:
    from .._pool import Pool

__all__ = ["RunSettings", "RunSummary", "Interrupted", "execute_run"]

FLUSH_EVERY_S = 0.25
"""Flush the output stream at most this often: a pipeline downstream sees
results promptly, while a fast run still writes in large blocks."""

ERRORS_SHOWN = 10
"""Without ``--errors``, failures printed to stderr before the rest are only counted."""


@dataclass(frozen=True)
class RunSettings:
    """The ``run`` command's options, already parsed."""

    function: LoadedFunction
    """The user's function."""
    input_path: str | None
    """INPUT; None or ``-`` reads stdin."""
    output_path: str | None = None
    """OUTPUT; None or ``-`` writes stdout."""
    errors_path: str | None = None
    """Where failed items go as JSON lines; None: a short note on stderr each."""
    lines: bool = False
    """Plain text input: each line is one string argument."""
    unordered: bool = False
    """Write results as they finish instead of in input order."""
    checkpoint_path: str | None = None
    """SQLite journal that makes the run resumable."""
    backend: str = "auto"
    """Backend name, as for ``powerpool.Pool``."""
    workers: int | None = None
    """Workers, as for ``powerpool.Pool``."""
    chunksize: int | None = None
    """Items per chunk, as for ``powerpool.Pool``."""
    timeout_s: float | None = None
    """Per-item time limit in seconds."""
    retries: int = 0
    """Re-runs of a failed item."""
    backend_options: dict[str, Any] = field(default_factory=dict)
    """Extra backend options (``address`` for dask)."""
    progress: bool | None = None
    """Progress bar: True, False, or None for "only when stderr is a terminal"."""
    report_path: str | None = None
    """Where to write the run's report (``.html`` page or ``.json`` trace), if anywhere."""


@dataclass(frozen=True)
class RunSummary:
    """What a run did; printed at the end on stderr."""

    total: int | None
    """Records in the input (None when streamed from stdin without a checkpoint)."""
    done: int
    """Items that returned a result in this run."""
    resumed: int
    """Results taken from the checkpoint instead of being computed again."""
    failed: int
    """Items that failed in this run (exception, crash or timeout)."""
    wall_s: float
    """Seconds from start to the last result."""
    backend: str
    """Backend that ran the items (what auto chose, if auto)."""
    workers: int
    """Workers of that backend."""
    auto: str
    """With ``--backend auto``: what it measured (e.g. ``cpu-gil work, 55 ms per item``)."""


class Interrupted(Exception):
    """Ctrl-C stopped the run; ``journaled`` counts the results kept in the checkpoint."""

    def __init__(self, journaled: int | None) -> None:
        super().__init__("interrupted")
        self.journaled = journaled


# -- writers ------------------------------------------------------------------------


class _Sink:
    """A JSON Lines destination: stdout, or ``PATH.partial`` renamed to PATH at the end."""

    def __init__(self, path: str | None) -> None:
        self.path = None if path in (None, "-") else path
        self._stream: TextIO
        if self.path is None:
            self._stream = sys.stdout
        else:
            try:
                self._stream = open(self._partial, "w", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise InputError(f"cannot write {self._partial}: {exc.strerror or exc}") from None
        self._flushed = time.monotonic()

    @property
    def _partial(self) -> str:
        return f"{self.path}.partial"

    def write(self, line: str) -> None:
        self._stream.write(line)
        now = time.monotonic()
        if now - self._flushed >= FLUSH_EVERY_S:
            self._stream.flush()
            self._flushed = now

    def finish(self) -> None:
        """The run is complete: publish the file."""
        self._stream.flush()
        if self.path is not None:
            self._stream.close()
            os.replace(self._partial, self.path)

    def abandon(self, *, keep: bool) -> None:
        """The run stopped early: keep ``PATH.partial`` (if ``keep``) for the user to look at."""
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stdout
            self._stream.flush()
        if self.path is not None:
            self._stream.close()
            if not keep:
                os.remove(self._partial)


def _result_line(index: int, result_json: str) -> str:
    return f'{{"index": {index}, "result": {result_json}}}\n'


def _error_entry(record: Record, exc: BaseException) -> dict[str, Any]:
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        tb = cause.tb
    else:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "index": record.index,
        "line": record.line,
        "input": record.value,
        "error": type(exc).__name__,
        "message": str(exc),
        "traceback": _without_our_frames(tb),
    }


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _without_our_frames(tb: str) -> str:
    """Drop the leading frames that are powerpool's own machinery, not the user's code."""
    lines = tb.splitlines(keepends=True)
    if not lines or not lines[0].startswith("Traceback"):
        return tb
    i = 1
    while i < len(lines) and lines[i].startswith(f'  File "{_PACKAGE_DIR}'):
        i += 1
        while i < len(lines) and lines[i].startswith("    "):
            i += 1
    if i >= len(lines) or not lines[i].startswith("  File "):
        return tb  # nothing of the user's left: keep it all rather than nothing
    return lines[0] + "".join(lines[i:])


# -- the run --------------------------------------------------------------------------


class _Feed:
    """The pending records as calls, with a length when it is known (auto uses it).

    ``inflight`` maps the position among pending items (what the pool
    reports) to the record, until its result comes back; the pool's window
    bounds its size. A malformed line stops the feed cleanly instead of
    raising inside the pool, so results already in flight are not lost.
    """

    def __init__(self, records: Iterator[Record], done: set[int], pending: int | None) -> None:
        self._records = records
        self._done = done
        self._pending = pending
        self.inflight: dict[int, Record] = {}
        self.error: InputError | None = None

    def __len__(self) -> int:
        if self._pending is None:
            raise TypeError("length unknown")
        return self._pending

    def __iter__(self) -> Iterator[Any]:
        position = 0
        try:
            for record in self._records:
                if record.index in self._done:
                    continue
                self.inflight[position] = record
                position += 1
                yield record.call
        except InputError as exc:
            self.error = exc


def execute_run(settings: RunSettings) -> RunSummary:
    """Do the whole run; raises InputError, CheckpointMismatchError or Interrupted."""
    import powerpool as pp

    start = time.perf_counter()
    seekable = settings.checkpoint_path is not None or settings.input_path not in (None, "-")
    stream = open_input(settings.input_path, seekable=seekable)
    journal: Journal | None = None
    try:
        total: int | None = None
        digest = ""
        if seekable:
            digest, total = scan_input(stream, lines=settings.lines)
        if settings.checkpoint_path is not None:
            fingerprint = Fingerprint(
                function=settings.function.normalized,
                input_sha256=digest,
                mode="lines" if settings.lines else "jsonl",
            )
            journal = Journal(
                settings.checkpoint_path, fingerprint, input_name=settings.input_path or "-"
            )
        # Pool.__exit__ kills the workers when it sees KeyboardInterrupt itself.
        with pp.Pool(
            backend_name(settings.backend),
            workers=settings.workers,
            chunksize=settings.chunksize,
            timeout=settings.timeout_s,
            retries=settings.retries,
            errors="return",
            progress=False,
            report=settings.report_path,
            **settings.backend_options,
        ) as pool:
            # Every item in a worker process, whatever auto measures: a crash
            # or hang must fail one line, never this command.
            pool._isolate = "powerpool run keeps every item in a worker process"
            done, resumed, failed = _drive(pool, settings, stream, journal, total)
            stats = pool.stats()
            plan = pool.last_plan
    except ValueError as exc:
        if isinstance(exc, CheckpointMismatchError):
            raise
        # The pool validates options (some only once auto has chosen a backend,
        # e.g. a timeout that serial can't enforce). The user's own exceptions
        # never get here: errors="return" turns them into results.
        raise InputError(str(exc)) from None
    except KeyboardInterrupt:
        if journal is None:
            raise Interrupted(None) from None
        journal.flush()
        raise Interrupted(len(journal.done_indices())) from None
    finally:
        if journal is not None:
            journal.close()
        if stream is not sys.stdin.buffer:
            stream.close()
    from .profile import describe_auto

    return RunSummary(
        total=total,
        done=done,
        resumed=resumed,
        failed=failed,
        wall_s=time.perf_counter() - start,
        backend=stats.backend or (plan.backend if plan is not None else settings.backend),
        workers=stats.workers or (plan.workers if plan is not None else 0),
        auto=describe_auto(plan) if plan is not None else "",
    )


def _drive(
    pool: Pool,
    settings: RunSettings,
    stream: IO[bytes],
    journal: Journal | None,
    total: int | None,
) -> tuple[int, int, int]:
    """Feed the pool, merge old and new results, write them; returns (done, resumed, failed)."""
    done_before = journal.done_indices() if journal is not None else set()
    old: Iterator[tuple[int, str]] = iter(())
    if journal is not None:
        old = journal.snapshot(by="completion" if settings.unordered else "index")
    pending = None if total is None else total - len(done_before)
    feed = _Feed(read_records(stream, lines=settings.lines), done_before, pending)
    out = _Sink(settings.output_path)
    errs = _Sink(settings.errors_path) if settings.errors_path else None
    bar = _progress_bar(settings.progress, total, len(done_before))
    done = failed = resumed = 0
    keep_partial = journal is None
    try:
        fn = call_record_for(settings.function)
        if settings.unordered:
            for index, value in old:
                out.write(_result_line(index, value))
                resumed += 1
            results: Iterator[tuple[int, Any]] = pool.imap_unordered(fn, feed, with_index=True)
        else:
            results = enumerate(pool.imap(fn, feed))
        head = next(old, None)
        for position, value in results:
            record = feed.inflight.pop(position)
            while head is not None and head[0] < record.index:
                out.write(_result_line(*head))
                resumed += 1
                head = next(old, None)
            if isinstance(value, BaseException):
                failed += 1
                entry = _error_entry(record, value)
                if errs is not None:
                    errs.write(_json_line(entry))
                elif failed <= ERRORS_SHOWN:
                    message = (
                        f"powerpool: item {record.index} (input line {record.line}) failed: "
                        f"{entry['error']}: {_first_line(entry['message'])}"
                    )
                    if bar is not None:
                        bar.write(message, file=sys.stderr)  # above the bar, not through it
                    else:
                        print(message, file=sys.stderr)
            else:
                done += 1
                out.write(_result_line(record.index, value))
                if journal is not None:
                    journal.record(record.index, value)
            if bar is not None:
                bar.update(1)
                if failed:
                    bar.set_postfix(failed=failed, refresh=False)
        while head is not None:
            out.write(_result_line(*head))
            resumed += 1
            head = next(old, None)
        if journal is not None:
            journal.flush()
        if feed.error is not None:
            raise feed.error
    except BaseException:  # Ctrl-C too: the journal keeps its rows (execute_run flushes it)
        out.abandon(keep=keep_partial)
        if errs is not None:
            errs.abandon(keep=keep_partial)
        raise
    finally:
        if bar is not None:
            bar.close()
        close = getattr(old, "close", None)
        if close is not None:
            close()
    out.finish()
    if errs is not None:
        errs.finish()
    if failed > ERRORS_SHOWN and errs is None:
        _note(f"... and {failed - ERRORS_SHOWN} more failures (use --errors FILE to keep them all)")
    return done, resumed, failed


def _progress_bar(mode: bool | None, total: int | None, initial: int) -> Any:
    show = sys.stderr.isatty() if mode is None else mode
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="item", dynamic_ncols=True, file=sys.stderr, leave=False
    )


def _json_line(entry: dict[str, Any]) -> str:
    import json

    return json.dumps(entry, ensure_ascii=False, default=repr) + "\n"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _note(message: str) -> None:
    print(f"powerpool: {message}", file=sys.stderr)


def format_summary(summary: RunSummary, settings: RunSettings) -> str:
    """One line for stderr: counts, where failures went, time and backend."""
    parts = [f"{summary.done + summary.resumed} done"]
    if summary.resumed:
        parts[0] += f" ({summary.resumed} from the checkpoint)"
    if summary.failed:
        where = f" -> {settings.errors_path}" if settings.errors_path else ""
        parts.append(f"{summary.failed} failed{where}")
    parts.append(f"{summary.wall_s:.2f} s")
    backend = f"{summary.backend} x{summary.workers}" if summary.workers else summary.backend
    if settings.backend == "auto" and summary.auto:
        backend += f" (auto measured {summary.auto})"
    parts.append(backend)
    return "powerpool: " + ", ".join(parts)

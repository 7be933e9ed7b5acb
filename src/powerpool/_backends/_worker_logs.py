"""``logging`` inside worker processes, delivered to the parent's handlers.

A record logged in a worker is captured by :class:`ForwardingHandler` (the
only handler left in the worker), flattened to a plain dict as
``logging.handlers.QueueHandler`` does, and sent over the worker's own pipe
as a ``("log", [record dict, ...], dropped)`` message, ahead of the chunk's
results. The parent's dispatcher rebuilds each record, attaches
``item_index`` and ``worker_id``, and hands it to
``logging.getLogger(name).handle()``: the parent's filters, handlers and
levels apply as if the call had been made there.

Floods are bounded on the worker's side, where they start: at most
``LOG_RECORDS_PER_S`` records a second leave a worker (a burst of as many
is allowed), the rest are counted and reported as one warning in the
parent. So a loop that logs a million lines can neither fill the parent's
memory nor keep its dispatcher (which also feeds the other workers) busy.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

__all__ = [
    "LOG_BATCH",
    "LOG_FLUSH_S",
    "LOG_RECORDS_PER_S",
    "ChunkCapture",
    "ForwardingHandler",
    "captured",
    "deliver",
    "flatten",
    "forward_to_parent",
    "logger_levels",
    "rebuild",
]

LOG_RECORDS_PER_S = 1000
"""Records a second one worker may send (token bucket, burst of as many).
Far above what anyone reads, far below what would keep the parent's
dispatcher from feeding workers (~10 us per record handled there)."""

LOG_BATCH = 100
"""Records sent in one message at most: batching makes a burst cheap, a
small batch keeps one message (and the parent's turn handling it) short."""

LOG_FLUSH_S = 0.05
"""A record waits at most this long in the worker for others to share its
message (unless the item is still running and logs nothing more; then it
goes with the chunk's results)."""

_PICKLE = pickle.HIGHEST_PROTOCOL
_DROP_KEYS = ("args", "exc_info", "msg")


class ForwardingHandler(logging.Handler):
    """Buffers a worker's records and sends them to the parent in batches.

    Sends happen only on the worker's main thread (the one that owns the
    pipe); records from other threads wait for its next flush. Invariant:
    ``_buffer`` and ``_dropped`` change only under the handler's own lock.
    """

    def __init__(self, conn: Connection, position: Callable[[], int]) -> None:
        super().__init__(logging.NOTSET)
        self._conn = conn
        self._position = position
        self._main = threading.get_ident()
        self._buffer: list[dict[str, Any]] = []
        self._dropped = 0
        self._tokens = float(LOG_RECORDS_PER_S)
        self._refilled = time.monotonic()
        self._flushed = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        self._tokens = min(
            float(LOG_RECORDS_PER_S), self._tokens + (now - self._refilled) * LOG_RECORDS_PER_S
        )
        self._refilled = now
        if self._tokens < 1.0:
            self._dropped += 1
            return
        self._tokens -= 1.0
        try:
            self._buffer.append(flatten(record, self._position()))
        except Exception:
            self.handleError(record)
            return
        if threading.get_ident() == self._main and (
            len(self._buffer) >= LOG_BATCH or now - self._flushed >= LOG_FLUSH_S
        ):
            self._send(now)

    def flush(self) -> None:
        """Send what is buffered (main thread only: the pipe is its alone)."""
        if not (self._buffer or self._dropped) or threading.get_ident() != self._main:
            return  # checked without the lock: a record added meanwhile goes next time
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._send(time.monotonic())

    def _send(self, now: float) -> None:
        if not self._buffer and not self._dropped:
            return
        batch, self._buffer = self._buffer, []
        dropped, self._dropped = self._dropped, 0
        self._flushed = now
        try:
            blob = pickle.dumps(("log", batch, dropped), _PICKLE)
        except Exception:
            blob = pickle.dumps(("log", [_plain(entry) for entry in batch], dropped), _PICKLE)
        with contextlib.suppress(OSError):  # the parent is gone; the worker will notice
            self._conn.send_bytes(blob)


def flatten(record: logging.LogRecord, position: int) -> dict[str, Any]:
    """The record as a dict of plain values (what QueueHandler.prepare does),
    with the position in its chunk of the item that logged it (-1: none)."""
    data = dict(record.__dict__)
    data["message"] = record.getMessage()
    if record.exc_info and not record.exc_text:
        data["exc_text"] = logging.Formatter().formatException(record.exc_info)
    for key in _DROP_KEYS:
        data.pop(key, None)
    data["msg"] = data["message"]
    data["_powerpool_position"] = position
    return data


class ChunkCapture(logging.Handler):
    """Records this thread logs while it runs one chunk (dask: where a worker's
    threads run several tasks at once, and no pipe of ours leads home; the
    records travel back with the chunk's results)."""

    def __init__(self, position: Callable[[], int]) -> None:
        super().__init__(logging.NOTSET)
        self._thread = threading.get_ident()
        self._position = position
        self.records: list[dict[str, Any]] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if threading.get_ident() != self._thread:
            return  # another task's
        if len(self.records) >= LOG_RECORDS_PER_S:
            self.dropped += 1
            return
        try:
            self.records.append(_plain(flatten(record, self._position())))
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def captured(position: Callable[[], int]) -> Iterator[ChunkCapture]:
    """Capture this thread's log records for the duration (see ChunkCapture)."""
    handler = ChunkCapture(position)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def deliver(
    entries: list[dict[str, Any]],
    dropped: int,
    indices: Sequence[int] | None,
    worker: str,
    recorder: Any,
) -> None:
    """In the parent: hand a worker's records to this process's loggers, as if logged here.

    ``indices`` maps an item's position in its chunk to its input index;
    ``recorder`` (or None) keeps the records' times for a report.
    """
    for entry in entries:
        try:
            record, index = rebuild(entry, indices, worker)
            logger = logging.getLogger(record.name if record.name != "root" else None)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
            if recorder is not None:
                recorder.log(worker, record, index)
        except Exception:  # a broken record or handler must not stop the caller's thread
            continue
    if dropped:
        logging.getLogger("powerpool").warning(
            "%d log records from worker %s were dropped: it logged more than %d a second",
            dropped,
            worker,
            LOG_RECORDS_PER_S,
        )


def _plain(entry: dict[str, Any]) -> dict[str, Any]:
    """A record dict whose unpicklable extras (``extra={...}``) became their repr."""
    plain: dict[str, Any] = {}
    for key, value in entry.items():
        try:
            pickle.dumps(value, _PICKLE)
            plain[key] = value
        except Exception:
            plain[key] = repr(value)
    return plain


def forward_to_parent(
    conn: Connection, position: Callable[[], int], levels: dict[str, int]
) -> ForwardingHandler:
    """Route every record of this worker process to the parent; return the handler.

    Handlers inherited through fork are removed (they would write a second
    copy from here); the parent's logger levels are applied so that records
    it would drop are not even formatted here.
    """
    handler = ForwardingHandler(conn, position)
    manager = logging.Logger.manager
    for logger in list(manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.propagate = True
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    root.addHandler(handler)
    return handler


def logger_levels() -> dict[str, int]:
    """The parent's configured logger levels ("" is the root), for the workers."""
    levels = {"": logging.getLogger().level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def rebuild(
    entry: dict[str, Any], indices: Sequence[int] | None, worker: str
) -> tuple[logging.LogRecord, int | None]:
    """The parent-side record for a worker's record dict, and its item's input index."""
    position = entry.pop("_powerpool_position", -1)
    index: int | None = None
    if indices is not None and isinstance(position, int) and 0 <= position < len(indices):
        index = indices[position]
    record = logging.makeLogRecord(entry)
    record.item_index = index
    record.worker_id = worker
    return record, index

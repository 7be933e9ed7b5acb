"""The ``run`` command's checkpoint: a SQLite journal of finished items.

Why SQLite: one file, atomic commits, and a reader can take a consistent
snapshot while the writer appends. Why JSON and never pickle: a checkpoint is a
file people copy around, and unpickling one would run whatever code it holds.

Layout::

    meta(key TEXT PRIMARY KEY, value TEXT)      schema, fingerprint, what it was made for
    results(idx INTEGER PRIMARY KEY,            input index of the item
            seq INTEGER NOT NULL,               completion order (for --unordered)
            result TEXT NOT NULL)               the result, already encoded as JSON

Durability: WAL mode with ``synchronous=NORMAL``. A commit is then one
``write()`` to the WAL with no fsync, which survives the *process* being
SIGKILLed (the kernel holds the bytes) but not a power cut. Killing a run loses
only the rows buffered since the last commit; the next run simply recomputes
them. Items that failed are not journaled, so a re-run retries them.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from ._errors import CheckpointMismatchError

__all__ = ["COMMIT_EVERY_ITEMS", "COMMIT_EVERY_S", "Fingerprint", "Journal"]

SCHEMA_VERSION = 1
"""Bumped when the table layout changes; an older file is then refused, not misread."""

COMMIT_EVERY_ITEMS = 500
"""Commit after this many buffered rows. Larger batches cost fewer commits
(~30 us each in WAL mode, on top of ~4 us per row inserted) but a SIGKILL
loses more finished work; at 500 the commits are < 2% of journaling."""

COMMIT_EVERY_S = 0.25
"""...or once the oldest buffered row has waited this long, so slow items are
journaled almost at once while fast ones are still batched."""


@dataclass(frozen=True)
class Fingerprint:
    """What a checkpoint was made for; a run with a different one is refused."""

    function: str
    """The function, normalized: ``module:pkg.mod:func`` or ``file:/abs/path.py:func``."""
    input_sha256: str
    """SHA-256 of the input bytes, hex."""
    mode: str
    """How the input is read: ``"jsonl"`` or ``"lines"``."""

    def digest(self) -> str:
        """One hex string that stands for the whole fingerprint."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


class Journal:
    """Finished items of one ``run``, kept in a SQLite file.

    Only the thread that opened the journal may use it (sqlite3's rule).
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: Fingerprint,
        *,
        input_name: str = "",
        commit_every_items: int = COMMIT_EVERY_ITEMS,
        commit_every_s: float = COMMIT_EVERY_S,
    ) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._commit_every_items = commit_every_items
        self._commit_every_s = commit_every_s
        self._buffer: list[tuple[int, int, str]] = []
        self._oldest = 0.0
        self._conn = _connect(self.path)
        try:
            self._seq = self._prepare(input_name)
        except BaseException:
            self._conn.close()
            raise

    def _prepare(self, input_name: str) -> int:
        conn = self._conn
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not tables:
            conn.execute("PRAGMA journal_mode=WAL")
            with conn:
                conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                conn.execute(
                    "CREATE TABLE results("
                    "idx INTEGER PRIMARY KEY, seq INTEGER NOT NULL, result TEXT NOT NULL)"
                )
                meta = {
                    "schema": str(SCHEMA_VERSION),
                    "fingerprint": self.fingerprint.digest(),
                    "made_for": json.dumps({**asdict(self.fingerprint), "input": input_name}),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            return 0
        if not {"meta", "results"} <= tables:
            raise CheckpointMismatchError(
                f"{self.path} is an SQLite file but not a powerpool checkpoint; "
                "pass another --checkpoint path"
            )
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise CheckpointMismatchError(
                f"{self.path} was written by another powerpool version "
                f"(checkpoint schema {meta.get('schema')}, this one reads {SCHEMA_VERSION}); "
                "delete it to start over"
            )
        if meta.get("fingerprint") != self.fingerprint.digest():
            raise CheckpointMismatchError(
                f"{self.path} was made for {_describe(meta.get('made_for'))}, "
                f"not for {_describe_fp(self.fingerprint, input_name)}; "
                "delete it to start over or pass another --checkpoint path"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM results").fetchone()
        return int(seq)

    # -- reading -----------------------------------------------------------------

    def done_indices(self) -> set[int]:
        """Indices of the items already journaled (committed or buffered)."""
        done = {row[0] for row in self._conn.execute("SELECT idx FROM results")}
        done.update(idx for idx, _, _ in self._buffer)
        return done

    def snapshot(self, *, by: str = "index") -> Iterator[tuple[int, str]]:
        """Yield ``(index, result_json)`` of the rows committed *now*, lazily.

        Reads through a second connection whose read transaction starts before
        this function returns, so rows written later by this journal are not
        seen: the caller can merge old results with new ones without
        duplicates. ``by`` is ``"index"`` or ``"completion"``.
        """
        self.flush()
        order = "idx" if by == "index" else "seq"
        reader = _connect(self.path)
        cursor = reader.execute(f"SELECT idx, result FROM results ORDER BY {order}")
        # sqlite3 steps a SELECT once inside execute(), so the snapshot is fixed now.
        return _rows(reader, cursor)

    # -- writing -----------------------------------------------------------------

    def record(self, index: int, result_json: str) -> None:
        """Journal one finished item (committed with its batch)."""
        if not self._buffer:
            self._oldest = time.monotonic()
        self._seq += 1
        self._buffer.append((index, self._seq, result_json))
        if (
            len(self._buffer) >= self._commit_every_items
            or time.monotonic() - self._oldest >= self._commit_every_s
        ):
            self.flush()

    def flush(self) -> None:
        """Commit every buffered row now."""
        if not self._buffer:
            return
        with self._conn:
            self._conn.executemany(
                "INSERT OR IGNORE INTO results(idx, seq, result) VALUES (?, ?, ?)", self._buffer
            )
        self._buffer.clear()

    def close(self) -> None:
        """Commit what is buffered and close the file; safe to call twice."""
        try:
            self.flush()
        finally:
            self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None would autocommit every statement; the default
    # (deferred transactions, committed by `with conn`) is what batching needs.
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(path, timeout=10.0)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()  # Python 3.13 warns (an error in the tests) about one left open
        _refuse(path, exc)
    assert conn is not None
    return conn


def _refuse(path: Path, exc: sqlite3.DatabaseError) -> NoReturn:
    """The error for a checkpoint file that cannot be opened or is not one."""
    if isinstance(exc, sqlite3.OperationalError):
        # unable to open (a directory, no permission), locked
        raise OSError(f"cannot open checkpoint {path}: {exc}") from None
    raise CheckpointMismatchError(  # "file is not a database"
        f"{path} is not a powerpool checkpoint ({exc}); pass another --checkpoint path"
    ) from None


def _rows(reader: sqlite3.Connection, cursor: sqlite3.Cursor) -> Iterator[tuple[int, str]]:
    try:
        for idx, result in cursor:
            yield int(idx), str(result)
    finally:
        reader.close()


def _describe(made_for: str | None) -> str:
    try:
        info = json.loads(made_for or "{}")
        return _describe_fp(
            Fingerprint(info["function"], info["input_sha256"], info["mode"]), info.get("input", "")
        )
    except (ValueError, KeyError, TypeError):
        return "another run"


def _describe_fp(fp: Fingerprint, input_name: str) -> str:
    source = f"{input_name} " if input_name else ""
    return f"{fp.function} on {source}(sha256 {fp.input_sha256[:12]}, {fp.mode})"

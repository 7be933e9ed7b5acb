"""The ``run`` command's SQLite journal (powerpool._checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from powerpool._checkpoint import Fingerprint, Journal
from powerpool._errors import CheckpointMismatchError

pytestmark = pytest.mark.timeout(60)

FP = Fingerprint(function="module:work:f", input_sha256="ab" * 32, mode="jsonl")


def committed(path: Path) -> dict[int, str]:
    """What another process would see: only committed rows."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT idx, result FROM results").fetchall())
    finally:
        conn.close()


def test_records_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ck.db"
    with Journal(path, FP) as journal:
        for i in range(5):
            journal.record(i, json.dumps({"i": i}))
    with Journal(path, FP) as journal:
        assert journal.done_indices() == set(range(5))
        journal.record(7, "null")
    assert committed(path) == {**{i: json.dumps({"i": i}) for i in range(5)}, 7: "null"}


def test_commits_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "ck.db"
    with Journal(path, FP, commit_every_items=3, commit_every_s=3600) as journal:
        journal.record(0, "0")
        journal.record(1, "1")
        assert committed(path) == {}  # still buffered
        assert journal.done_indices() == {0, 1}  # but counted as done here
        journal.record(2, "2")
        assert set(committed(path)) == {0, 1, 2}


def test_slow_items_are_committed_by_time(tmp_path: Path) -> None:
    path = tmp_path / "ck.db"
    with Journal(path, FP, commit_every_items=1000, commit_every_s=0.0) as journal:
        journal.record(0, "0")
        assert set(committed(path)) == {0}


def test_sigkill_loses_only_the_uncommitted_batch(tmp_path: Path) -> None:
    path = tmp_path / "ck.db"
    script = textwrap.dedent(
        f"""
        import os, signal
        from powerpool._checkpoint import Fingerprint, Journal
        fp = Fingerprint(function={FP.function!r}, input_sha256={FP.input_sha256!r}, mode="jsonl")
        journal = Journal({str(path)!r}, fp, commit_every_items=5, commit_every_s=3600)
        for i in range(12):   # commits after 5 and 10; 10 and 11 stay buffered
            journal.record(i, str(i))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=30, check=False)
    assert proc.returncode == -signal.SIGKILL
    with Journal(path, FP) as journal:
        assert journal.done_indices() == set(range(10))


@pytest.mark.parametrize(
    "other",
    [
        Fingerprint(function="module:work:g", input_sha256=FP.input_sha256, mode="jsonl"),
        Fingerprint(function=FP.function, input_sha256="cd" * 32, mode="jsonl"),
        Fingerprint(function=FP.function, input_sha256=FP.input_sha256, mode="lines"),
    ],
    ids=["function", "input", "mode"],
)
def test_refuses_another_runs_checkpoint(tmp_path: Path, other: Fingerprint) -> None:
    path = tmp_path / "ck.db"
    with Journal(path, FP, input_name="in.jsonl") as journal:
        journal.record(0, "0")
    with pytest.raises(CheckpointMismatchError, match=r"was made for module:work:f on in\.jsonl"):
        Journal(path, other, input_name="in.jsonl")
    assert committed(path) == {0: "0"}  # refused, and untouched


def test_refuses_files_that_are_not_checkpoints(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 200)
    with pytest.raises(CheckpointMismatchError, match="not a powerpool checkpoint"):
        Journal(text, FP)
    assert text.read_text() == "hello\n" * 200
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    with pytest.raises(CheckpointMismatchError, match="not a powerpool checkpoint"):
        Journal(other, FP)


def test_unopenable_path_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot open checkpoint"):
        Journal(tmp_path / "no" / "such" / "dir.db", FP)


def test_snapshot_excludes_later_rows_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "ck.db"
    with Journal(path, FP) as journal:
        for i in (5, 1, 3):
            journal.record(i, str(i))
        by_index = journal.snapshot(by="index")
        by_completion = journal.snapshot(by="completion")
        assert next(by_index) == (1, "1")
        assert next(by_completion) == (5, "5")
        for i in (0, 2, 4):
            journal.record(i, str(i))
        journal.flush()
        assert list(by_index) == [(3, "3"), (5, "5")]
        assert list(by_completion) == [(1, "1"), (3, "3")]


def test_stores_json_text_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "ck.db"
    with Journal(path, FP) as journal:
        journal.record(0, json.dumps([1, "two", None]))
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        ((kind, value),) = conn.execute("SELECT typeof(result), result FROM results").fetchall()
    finally:
        conn.close()
    assert kind == "text"
    assert json.loads(value) == [1, "two", None]


def test_close_twice_is_safe(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "ck.db", FP)
    journal.record(0, "0")
    journal.close()
    journal.close()
    assert not os.path.exists(tmp_path / "ck.db-wal") or committed(tmp_path / "ck.db") == {0: "0"}

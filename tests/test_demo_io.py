"""``powerpool demo --work io``: the slow local server, the clients, the five rows.

No bound here depends on the machine's speed: the server holds every answer
back a fixed delay, so sequential fetching costs at least n x delay whatever
the CPU, and overlapping the waits must win by a wide margin.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from powerpool._demo_io import (
    REQUESTS,
    THREADS,
    afetch,
    fetch,
    format_io_report,
    run_io_demo,
    serve,
)

pytestmark = pytest.mark.timeout(120)


def test_server_answers_checkable_values_and_stops_with_its_block() -> None:
    with serve(0.001) as url:
        assert url.startswith("http://127.0.0.1:")
        assert fetch(f"{url}/square/12") == 144
        assert asyncio.run(afetch(f"{url}/square/7")) == 49
        with pytest.raises(OSError, match="HTTP 404"):
            fetch(f"{url}/nothing")
        with pytest.raises(OSError, match="HTTP 404"):
            asyncio.run(afetch(f"{url}/nothing"))
        servers = [p for p in psutil.Process().children() if "powerpool._demo_io" in p.cmdline()]
        assert len(servers) == 1
    assert not servers[0].is_running() or servers[0].status() == psutil.STATUS_ZOMBIE
    with pytest.raises(ConnectionRefusedError):  # nobody listens there any more
        fetch(f"{url}/square/1")


def test_io_demo_overlapping_wins_and_processes_do_not_beat_threads() -> None:
    report = run_io_demo("small")
    rows = {row.mode: row for row in report.rows}
    assert list(rows) == ["sequential", "threads", "asyncio", "processes", "auto"]
    assert report.all_agree
    assert report.n_requests == REQUESTS["small"]
    sequential = rows["sequential"].wall_s
    assert sequential >= report.n_requests * report.delay_s  # the server's delay, one by one
    # 32 threads need 4 rounds of 20 ms, asyncio 1: both far below 100 x 20 ms.
    assert rows["threads"].wall_s < sequential / 4
    assert rows["asyncio"].wall_s < sequential / 4
    assert rows["auto"].backend in ("threads", "asyncio")
    assert rows["auto"].wall_s < sequential / 2
    # Processes do the same overlapping waits plus start-up: never much faster than threads.
    assert rows["processes"].workers == rows["threads"].workers == THREADS
    assert rows["processes"].wall_s > 0.7 * rows["threads"].wall_s
    text = format_io_report(report)
    assert "releases the GIL" in text
    assert "one event loop" in text
    assert "start-up for nothing" in text
    assert "chose threads" in text or "chose asyncio" in text
    assert "same, right answers" in text


def test_demo_command_all_prints_both_tables(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "powerpool", "demo", "--work", "all", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "prime?" in proc.stdout
    assert "Fetch 100 URLs" in proc.stdout
    assert proc.stdout.count("same, right answers") == 2
    data = json.loads(out.read_text())
    assert data["cpu"]["all_agree"] is True
    assert data["io"]["all_agree"] is True
    assert [row["mode"] for row in data["io"]["rows"]] == [
        "sequential",
        "threads",
        "asyncio",
        "processes",
        "auto",
    ]


def test_demo_command_rejects_unknown_work() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "powerpool", "demo", "--work", "gpu"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "--work" in proc.stderr

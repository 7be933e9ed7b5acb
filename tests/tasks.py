"""Task functions shared by the test modules.

They live in a module of their own (not in a test file) so that process
workers started by fork, forkserver or spawn can import them by name, and so
that each is written once.
"""

from __future__ import annotations

import time
from pathlib import Path

import powerpool as pp


def square(x: int) -> int:
    return x * x


def nap(seconds: float) -> float:
    """Sleep, but return early once powerpool asks the task to stop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pp.should_stop():
            break
        time.sleep(0.01)
    return seconds


def flaky(marker_dir: str, x: int) -> int:
    """Odd items fail their first two calls (the call count lives in a file)."""
    calls = Path(marker_dir) / f"calls-{x}"
    with calls.open("a") as f:
        f.write(".")
    if x % 2 and calls.stat().st_size <= 2:
        raise OSError(f"transient failure {calls.stat().st_size} for {x}")
    return x


def wait_for_gate(marker_dir: str, x: int) -> int:
    """Block until the test creates the file ``gate`` (at most 20 s)."""
    directory = Path(marker_dir)
    (directory / f"started-{x}").touch()
    deadline = time.monotonic() + 20
    while not (directory / "gate").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def sleep_20ms(x: int) -> int:
    """Waits: I/O-like."""
    time.sleep(0.02)
    return x


def spin(x: int) -> int:
    """Pure Python, holds the GIL: ~5-10 ms idle, more on a loaded machine."""
    total = 0
    for i in range(60_000):
        total += i * i
    return total + x

"""Module-level functions for the auto tests (importable by worker processes by name).

Durations are set by the clock, not by loop counts, so that what the tests
check (how long an item is relative to a hand-off) holds on any CPU speed.
"""

from __future__ import annotations

import ctypes
import faulthandler
import hashlib
import os
import time

CRASH_AT = 7
"""The item that segfaults in :func:`crash_at_7`."""

BUFFER = bytes(2**20)
"""hashlib releases the GIL while it hashes buffers over 2 KiB."""


def busy_for(seconds: float) -> None:
    """Compute in Python (holding the GIL) for ``seconds`` of wall time."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sum(range(200))


def where_2ms(x: int) -> tuple[int, int]:
    """~2 ms of pure Python; returns (x, the pid that ran it)."""
    busy_for(0.002)
    return x, os.getpid()


def crash_at_7(x: int) -> int:
    """~2 ms of pure Python; item CRASH_AT segfaults its process (a real SIGSEGV)."""
    busy_for(0.002)
    if x == CRASH_AT:
        faulthandler.disable()  # no stack dump for an expected crash
        ctypes.string_at(0)
    return x


def first_sleeps(x: int) -> int:
    """Item 0 sleeps 30 s, the others return at once."""
    if x == 0:
        time.sleep(30)
    return x


def nap_and_record(directory: str, x: int) -> tuple[int, int]:
    """Sleep 20 ms, then note (pid, x) in a file of ``directory`` (one call, one line)."""
    time.sleep(0.02)
    pid = os.getpid()
    with open(os.path.join(directory, f"calls-{pid}.txt"), "a", encoding="utf-8") as out:
        out.write(f"{x}\n")
    return x, pid


def hash_for(x: int) -> int:
    """~10 ms of hashing that releases the GIL; returns x."""
    deadline = time.perf_counter() + 0.01
    while time.perf_counter() < deadline:
        hashlib.sha256(BUFFER).digest()
    return x


def spin_10ms(x: int) -> int:
    """~10 ms of pure Python (holds the GIL), whatever the CPU speed."""
    busy_for(0.01)
    return x


def planner_loaded(x: int) -> bool:
    """Whether the worker running this item inherited auto's planner from its parent."""
    import sys

    return "powerpool._plan" in sys.modules

"""Worker functions for test_report.py (a module, so forkserver and spawn workers import them)."""

from __future__ import annotations

import logging
import os
import time

LOGGER = "powerpool_test_report"


def warn_once(x: int) -> int:
    """Log one warning naming the item, then return it."""
    logging.getLogger(LOGGER).warning("item %s says hello", x)
    return x


def flood(n: int) -> int:
    """Log ``n`` warnings as fast as possible."""
    log = logging.getLogger(LOGGER)
    for i in range(n):
        log.warning("flood %d", i)
    return n


def nap(x: int) -> int:
    """Sleep a few milliseconds (longer for every fifth item)."""
    time.sleep(0.004 if x % 5 else 0.012)
    return x


def fail_on_3(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def crash_once(directory: str, x: int) -> int:
    """Kill this worker process on item 5 the first time (a marker file remembers)."""
    mark = os.path.join(directory, "crashed")
    if x == 5 and not os.path.exists(mark):
        with open(mark, "w"):
            pass
        os._exit(3)
    return x

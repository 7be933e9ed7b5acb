"""Facts about the machine that every planner and backend needs."""

from __future__ import annotations

import functools
import math
import os

__all__ = ["usable_cores"]


@functools.lru_cache(maxsize=1)
def usable_cores() -> int:
    """Cores this process may use: CPU affinity, then a cgroup v2 CPU quota if stricter.

    ``os.cpu_count()`` reports the machine's cores even inside a container
    limited to two; oversubscribing such a container is a common slowdown.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)

"""Facts about the machine that every planner and backend needs."""

from __future__ import annotations

import functools
import math
import os

__all__ = ["set_worker_cores", "usable_cores", "worker_cores"]

# This process's share of the cores when it is a worker of powerpool's
# process backend (None otherwise). Set once, at the worker's start.
_worker_cores: int | None = None


def set_worker_cores(cores: int) -> None:
    """Declare this process a process-backend worker entitled to ``cores`` cores."""
    global _worker_cores  # process-wide fact, set once per worker
    _worker_cores = max(1, cores)


def worker_cores() -> int | None:
    """This worker's share of the cores, or None outside powerpool's worker processes.

    Work started inside a worker (a nested map) must stay within it: the other
    cores are the other workers'.
    """
    return _worker_cores


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

    ``os.cpu_count()`` reports the machine's cores even inside a container
    limited to two; sizing pools by it oversubscribes such containers. In a
    worker process, its share of them (see :func:`worker_cores`).
    """
    if _worker_cores is not None:
        return _worker_cores
    return _machine_cores()


@functools.lru_cache(maxsize=1)
def _machine_cores() -> int:
    """usable_cores() outside workers; cached: it is asked for on every pool start."""
    count = _affinity_count()
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def _affinity_count() -> int:
    process_cpu_count = getattr(os, "process_cpu_count", None)  # 3.13+
    if process_cpu_count is not None:
        return int(process_cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cgroup_quota() -> int | None:
    """CPU quota of this process's cgroup (v2 ``cpu.max``, v1 CFS), rounded up; cached."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2
            for base in (f"/sys/fs/cgroup{path}", "/sys/fs/cgroup"):
                text = _read(os.path.join(base, "cpu.max"))
                if text is not None:
                    return _parse_cpu_max(text)
        elif "cpu" in controllers.split(","):  # cgroup v1
            for base in (
                f"/sys/fs/cgroup/{controllers}{path}",
                f"/sys/fs/cgroup/{controllers}",
                "/sys/fs/cgroup/cpu",
            ):
                quota = _read(os.path.join(base, "cpu.cfs_quota_us"))
                period = _read(os.path.join(base, "cpu.cfs_period_us"))
                if quota is not None and period is not None:
                    return _parse_cfs(quota, period)
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _parse_cpu_max(text: str) -> int | None:
    """``"max 100000"`` -> None; ``"150000 100000"`` -> 2."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _quota(fields[0], fields[1])


def _parse_cfs(quota: str, period: str) -> int | None:
    """cgroup v1: quota ``-1`` means no limit."""
    return _quota(quota.strip(), period.strip())


def _quota(quota: str, period: str) -> int | None:
    try:
        q, per = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or per <= 0:
        return None
    return max(1, math.ceil(q / per))

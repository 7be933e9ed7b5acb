"""Low-level probes the profiler reads while the sampled items run.

* :class:`Heartbeat`: a thread that measures how long the GIL stays held.
* :class:`SchedClock`: how long a thread waited for a CPU (Linux schedstat),
  so that a busy machine is not mistaken for work that waits.
* :class:`RssProbe` and :func:`max_rss`: resident memory, cheaply.

All of them are cheap enough to run around real work (about a microsecond
a reading) and degrade to "not measured" where the OS lacks the source.
"""

from __future__ import annotations

import os
import sys
import threading
import time

__all__ = ["HEARTBEAT_S", "Heartbeat", "RssProbe", "SchedClock", "max_rss"]

HEARTBEAT_S = 1e-3
"""Heartbeat sleep. Shorter ticks measure short items better but cost more CPU
(~10 us per tick); 1 ms is well below the 5 ms switch interval it must detect."""


class SchedClock:
    """Seconds the thread that created it spent ready to run but waiting for a CPU.

    Read from ``/proc/thread-self/schedstat`` (its second field, ns). On a
    loaded machine a CPU-bound item can spend most of its wall time in the
    run queue: without this, its CPU/wall ratio would look like waiting.
    Reads 0.0 where the file does not exist. ``native_id`` picks another
    thread of this process (its ``threading.Thread.native_id``).
    """

    def __init__(self, native_id: int | None = None) -> None:
        path = ("/proc/thread-self/schedstat" if native_id is None
                else f"/proc/self/task/{native_id}/schedstat")
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError:
            self._fd = -1

    def waited_s(self) -> float:
        if self._fd < 0:
            return 0.0
        try:
            return int(os.pread(self._fd, 64, 0).split()[1]) * 1e-9
        except (OSError, ValueError, IndexError):
            return 0.0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RssProbe:
    """Reads this process's resident memory in ~1 us from /proc (Linux).

    Elsewhere it reads 0 and the peak comes from getrusage alone: psutil would
    cost ~30 ms to import and ~20 us a reading, too much for a 1 ms heartbeat.
    """

    def __init__(self) -> None:
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError, ValueError):
            self._fd = -1

    def read(self) -> int:
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page if self._fd >= 0 else 0
        except (OSError, ValueError, IndexError):
            return 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def max_rss() -> int:
    """The process's lifetime peak RSS in bytes (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class Heartbeat:
    """A thread that sleeps ``HEARTBEAT_S`` in a loop and records how late it wakes.

    Waking needs the GIL. If the sampled function holds it, the heartbeat
    waits until the interpreter forces a switch: late by about the switch
    interval (5 ms). If the function releases it, the heartbeat is late only
    by the OS wake-up slack. Time the heartbeat spent in the run queue (a busy
    machine, not the GIL) is subtracted, so the measure holds under load.
    It also samples resident memory at each tick that was on time.

    The thread calls nothing that releases the GIL except its sleep: each
    release would cost it another switch interval to get the GIL back from
    GIL-holding code. So its run-queue clock is read from this side, and it
    reads memory only on ticks that were on time (no GIL contention).

    Invariant: ``_ticks`` and ``_rss`` are appended only by the heartbeat
    thread and read only after :meth:`stop` joined it.
    """

    def __init__(self) -> None:
        self._ticks: list[tuple[float, float]] = []  # (when it was due, when it woke)
        self._rss: list[int] = []
        self._windows: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._probe = RssProbe()
        self._maxrss_before = max_rss()
        self._rss_before = self._probe.read()
        self.peak_rss = 0
        """Highest RSS seen, bytes (valid after :meth:`stop`)."""
        self.rss_growth = 0
        """Rise of RSS above its level at the start, bytes (valid after :meth:`stop`)."""
        self._thread = threading.Thread(target=self._run, name="powerpool-profile-heartbeat",
                                        daemon=True)
        self._thread.start()
        self._clock = SchedClock(self._thread.native_id)
        self._queued_s = -self._clock.waited_s()  # becomes the total at stop()

    def _run(self) -> None:
        perf, wait, read = time.perf_counter, self._done.wait, self._probe.read
        ticks, rss = self._ticks, self._rss
        on_time = sys.getswitchinterval() / 2
        while True:
            due = perf() + HEARTBEAT_S
            if wait(HEARTBEAT_S):  # releases the GIL while it sleeps
                return
            woke = perf()  # waking up needed the GIL
            ticks.append((due, woke))
            if woke - due < on_time:
                rss.append(read())

    def mark(self, start: float, end: float) -> None:
        """Record that an item ran from ``start`` to ``end`` (perf_counter seconds)."""
        self._windows.append((start, end))

    def stop(self) -> None:
        """End the thread and settle the memory readings."""
        self._done.set()
        self._thread.join()
        self._queued_s += self._clock.waited_s()
        self._clock.close()
        rss_after = self._probe.read()
        self._probe.close()
        peak = max([rss_after, self._rss_before, *self._rss])
        maxrss = max_rss()
        if maxrss > self._maxrss_before:  # the lifetime peak rose while sampling: it is ours
            peak = max(peak, maxrss)
        self.peak_rss = peak
        self.rss_growth = max(0, peak - self._rss_before) if self._rss_before else 0

    def gil_estimate(self) -> tuple[tuple[float, int, float] | None, float]:
        """((held fraction, ticks used, median lateness s) or None, window seconds).

        Only ticks due while the marked items ran count. Each tick scores its
        GIL lateness / the switch interval, capped at 1; the fraction is the
        mean score. The heartbeat's run-queue wait, spread evenly over its
        ticks, is not GIL lateness and is subtracted. None when no tick was
        conclusive: the window was too short, or GIL-holding code kept the
        heartbeat from even starting its first tick.
        """
        if not self._windows:
            return None, 0.0
        start, end = self._windows[0][0], self._windows[-1][1]
        si = sys.getswitchinterval()
        queued = max(0.0, self._queued_s) / max(1, len(self._ticks))
        late: list[float] = []
        for due, woke in self._ticks:
            if not start <= due < end:
                continue
            if woke <= end:
                late.append(max(0.0, woke - due - queued))
            elif end - due - queued >= si / 2:
                # Still blocked when the last item ended: a lower bound, but
                # already long enough to count as GIL holding.
                late.append(end - due - queued)
        if not late:
            return None, end - start
        fraction = sum(min(x / si, 1.0) for x in late) / len(late)
        return (fraction, len(late), sorted(late)[len(late) // 2]), end - start

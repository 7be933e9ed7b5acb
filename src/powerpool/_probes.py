"""Low-level probes the profiler reads while the sampled items run.

* :class:`Heartbeat`: a thread that tells whether the sampled code holds the GIL.
* :class:`SwitchCounter`: how often a thread blocked (Linux).
* :class:`SchedClock`: how long a thread waited for a CPU (Linux schedstat),
  so that a busy machine is not mistaken for work that waits.
* :class:`RssProbe` and :func:`max_rss`: resident memory, cheaply.
* :func:`pickle_cost`: what sending a value to another process costs.

All of them are cheap enough to run around real work (about a microsecond
a reading) and degrade to "not measured" where the OS lacks the source.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from typing import Any

__all__ = [
    "HEARTBEAT_S",
    "Heartbeat",
    "RssProbe",
    "SchedClock",
    "SwitchCounter",
    "max_rss",
    "pickle_cost",
    "thread_blocks",
]

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
        path = (
            "/proc/thread-self/schedstat"
            if native_id is None
            else f"/proc/self/task/{native_id}/schedstat"
        )
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


def thread_blocks() -> int:
    """How often the calling thread blocked so far (its voluntary context
    switches: I/O, sleep, locks); -1 where unknown (not Linux).

    A thread that only computes is preempted (involuntary) but never blocks,
    so a low CPU/wall ratio with no blocks means a starved CPU, not waiting.
    """
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw)
    except (ImportError, AttributeError, OSError, ValueError):
        return -1


class SwitchCounter:
    """Voluntary context switches of one thread of this process (Linux).

    A thread switches voluntarily each time it blocks: a sleep, a lock, or
    waiting for the GIL. Waiting in the run queue for a CPU is not voluntary,
    which is what makes this count immune to a loaded machine. Reads None
    where ``/proc`` is missing.
    """

    def __init__(self, native_id: int | None) -> None:
        try:
            self._fd = os.open(f"/proc/self/task/{native_id}/status", os.O_RDONLY)
        except (OSError, TypeError):
            self._fd = -1

    def read(self) -> int | None:
        if self._fd < 0:
            return None
        try:
            data = os.pread(self._fd, 8192, 0)
            at = data.index(b"\nvoluntary_ctxt_switches:") + 25
            return int(data[at : data.index(b"\n", at)])
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Heartbeat:
    """A thread that sleeps ``HEARTBEAT_S`` in a loop, to tell whether the GIL is held.

    Waking needs the GIL. If the sampled function holds it, each tick must
    block for the GIL until the interpreter forces a switch (late by about
    the switch interval, 5 ms); if it releases it, each tick blocks only in
    its sleep. On Linux the heartbeat's voluntary context switches are
    counted: one per tick means no GIL waits, two or more means GIL waits.
    Unlike lateness, the count does not grow on a loaded machine, where
    waking threads wait in the run queue (involuntary, not counted). Where
    ``/proc`` is missing, the lateness itself is the measure.

    The thread calls nothing that releases the GIL except its sleep: any
    other release (a /proc read, say) would make it wait for the GIL again
    when the sampled thread grabs it on its way out of native code, and
    that wait would count against GIL-free functions. So memory is read by
    the sampling thread, before and after each item (:meth:`begin`,
    :meth:`end`), and the lifetime peak from getrusage catches what rose
    higher in between.

    Invariant: ``_ticks`` is appended, and ``_started`` increased, only by
    the heartbeat thread; the sampling thread reads ``_ticks`` only after
    :meth:`stop` joined it, and ``_started`` (an int) at any time.
    """

    def __init__(self, max_ticks: int | None = None) -> None:
        # After max_ticks the heartbeat stops ticking (its score rests on those):
        # each tick against GIL-holding code forces a GIL hand-off, which costs
        # the sampled code a little (much more under gVisor); None: tick until stop().
        self._max_ticks = max_ticks
        # The cap counts from begin(): until then (the sampled code not started
        # yet, maybe a preempted caller) ticks are not capped.
        self._begun_ticks: float = float("inf")
        self._ticks: list[tuple[float, float]] = []  # (when it was due, when it woke)
        self._started = 0  # ticks begun; each costs exactly one voluntary switch (its sleep)
        self._rss_peak = 0
        self._windows: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._ready = threading.Event()
        self._probe = RssProbe()
        self._maxrss_before = max_rss()
        self._rss_before = self._probe.read()
        self.peak_rss = 0
        """Highest RSS seen, bytes (valid after :meth:`stop`)."""
        self.rss_growth = 0
        """Rise of RSS above its level at the start, bytes (valid after :meth:`stop`)."""
        self._thread = threading.Thread(
            target=self._run, name="powerpool-profile-heartbeat", daemon=True
        )
        try:
            self._thread.start()
        except RuntimeError:  # no thread to be had: leave nothing open behind
            self._probe.close()
            raise
        # Wait (GIL released) until the loop runs, so that its start-up is
        # neither mistaken for GIL lateness nor counted as GIL waits.
        self._ready.wait(1.0)
        self._switches = SwitchCounter(self._thread.native_id)
        self._begun: tuple[int, int | None] = (0, None)
        self._ticks_in_items = 0
        self._switches_in_items: int | None = 0

    def _run(self) -> None:
        perf, wait, ticks = time.perf_counter, self._done.wait, self._ticks
        self._ready.set()
        while True:
            self._started += 1
            if self._max_ticks is not None and self._started > self._begun_ticks + self._max_ticks:
                # Counted as a tick that only slept: this wait blocks once, then
                # nothing more happens here until stop().
                wait()
                return
            due = perf() + HEARTBEAT_S
            if wait(HEARTBEAT_S):  # releases the GIL while it sleeps
                return
            ticks.append((due, perf()))  # waking up needed the GIL

    def begin(self) -> None:
        """Call right before an item: counts start here, so the profiler's own
        code between items (holding the GIL) is not blamed on the item."""
        self._begun = self._counts()
        self._begun_ticks = self._begun[0]
        self._rss_peak = max(self._rss_peak, self._probe.read())

    def end(self, start: float, end: float) -> None:
        """Call right after the item, which ran from ``start`` to ``end`` (perf_counter s)."""
        ticks, switches = self._counts()
        self._rss_peak = max(self._rss_peak, self._probe.read())
        ticks0, switches0 = self._begun
        self._windows.append((start, end))
        if switches is None or switches0 is None or self._switches_in_items is None:
            self._switches_in_items = None
            return
        begun, blocked = ticks - ticks0, switches - switches0
        if begun == 0 and blocked > 0:
            # No tick began during the item, yet the heartbeat blocked: it was
            # stuck waiting for the GIL throughout. That is one observation,
            # whose sleep switch fell before the item.
            begun, blocked = 1, blocked + 1
        self._ticks_in_items += begun
        self._switches_in_items += blocked

    def _counts(self) -> tuple[int, int | None]:
        """(ticks begun, voluntary switches), read consistently.

        Reading /proc releases the GIL, so the heartbeat may finish a tick and
        begin the next during the read, its sleep switch landing on either
        side of it: a tick counted without its switch, or the reverse. A
        read during which no tick began is consistent; retry until one is.
        """
        for _ in range(5):
            ticks = self._started
            switches = self._switches.read()
            if self._started == ticks:
                break
        return ticks, switches

    def stop(self) -> None:
        """End the thread and settle the memory readings."""
        self._done.set()
        self._thread.join()
        self._switches.close()
        rss_after = self._probe.read()
        self._probe.close()
        peak = max(rss_after, self._rss_before, self._rss_peak)
        maxrss = max_rss()
        if maxrss > self._maxrss_before:  # the lifetime peak rose while sampling: it is ours
            peak = max(peak, maxrss)
        self.peak_rss = peak
        self.rss_growth = max(0, peak - self._rss_before) if self._rss_before else 0

    def gil_estimate(self) -> tuple[tuple[float, int, float] | None, float]:
        """((held score 0..1, ticks used, median lateness s) or None, window seconds).

        Linux: the score is the heartbeat's extra voluntary switches (GIL
        waits) per tick while items ran, capped at 1. Elsewhere: the mean
        lateness of the ticks due while the items ran, over the switch
        interval, capped at 1. None when no tick fell inside the items: too
        short a window to tell.
        """
        if not self._windows:
            return None, 0.0
        start, end = self._windows[0][0], self._windows[-1][1]
        si = sys.getswitchinterval()
        late = [max(0.0, min(woke, end) - due) for due, woke in self._ticks if start <= due < end]
        median = sorted(late)[len(late) // 2] if late else 0.0
        if self._switches_in_items is not None:
            ticks, switches = self._ticks_in_items, self._switches_in_items
            if ticks < 1:
                return None, end - start
            extra = switches - ticks
            return (min(1.0, max(0.0, extra / ticks)), ticks, median), end - start
        if not late:
            return None, end - start
        score = sum(min(x / si, 1.0) for x in late) / len(late)
        return (score, len(late), median), end - start


def pickle_cost(objs: list[Any]) -> tuple[int, float, str | None, bool]:
    """(mean bytes, mean seconds to dump and load, why unpicklable or None, used cloudpickle)."""
    if not objs:
        return 0, 0.0, None, False
    total_bytes, total_s, used_cloudpickle = 0, 0.0, False
    perf = time.perf_counter
    for obj in objs:
        t0 = perf()
        try:
            data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        except Exception:
            try:
                import cloudpickle

                t0 = perf()  # the first import of cloudpickle is not a per-item cost
                data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                return 0, 0.0, f"{type(exc).__name__}: {exc}", True
            used_cloudpickle = True
        try:
            pickle.loads(data)
        except Exception as exc:
            return 0, 0.0, f"pickles but does not unpickle: {type(exc).__name__}: {exc}", False
        total_s += perf() - t0
        total_bytes += len(data)
    return total_bytes // len(objs), total_s / len(objs), None, used_cloudpickle

"""Functions that process workers run in the fault and engine tests.

They live in a module of their own (not in a test module) so that a worker
started by forkserver or spawn imports them by name without importing pytest
test modules; ``tests/`` is on ``sys.path`` under pytest, and the fork server
inherits that path.

Every faulty function misbehaves only for :data:`BAD` (or for a path it is
given), so one map shows both the failed item and the healthy ones.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import powerpool

BAD = 3
"""The input on which the faulty functions below misbehave."""

LONG_S = 60.0
"""How long "hanging" items sleep: far past any test's patience, so only a
kill, a timeout or a cancel can end them (their tests have lower timeouts)."""


def square(x: int) -> int:
    return x * x


def pid_of(_: object) -> int:
    """The worker's pid (which process ran the item)."""
    return os.getpid()


def pid_after(seconds: float) -> int:
    """The worker's pid, after holding the worker for a while."""
    time.sleep(seconds)
    return os.getpid()


# -- crashes -----------------------------------------------------------------


def _quiet_crash() -> None:
    """Don't let a faulthandler inherited from pytest print a dump for an expected crash."""
    faulthandler.disable()


def segfault_by_signal(x: int) -> int:
    if x == BAD:
        _quiet_crash()
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(LONG_S)  # the signal is delivered before this returns
    return x * x


def segfault_by_null_read(x: int) -> int:
    if x == BAD:
        _quiet_crash()
        ctypes.string_at(0)  # reads address 0: a real SIGSEGV in native code
    return x * x


def exit_3(x: int) -> int:
    if x == BAD:
        os._exit(3)
    return x * x


def sigkill_self(x: int) -> int:
    if x == BAD:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(LONG_S)
    return x * x


def sys_exit_4(x: int) -> int:
    if x == BAD:
        sys.exit(4)
    return x * x


def hang(x: int) -> int:
    if x == BAD:
        time.sleep(LONG_S)
    return x * x


def pid_then_hang(path: str, x: int) -> int:
    """For BAD: write the worker's pid to ``path`` (atomically), then hang."""
    if x == BAD:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(str(os.getpid()))
        os.replace(tmp, path)
        time.sleep(LONG_S)
    return x * x


def started_then_hang(directory: str, x: int) -> int:
    """Mark ``directory/started-<x>`` (so the test knows it runs), then hang."""
    Path(directory, f"started-{x}").touch()
    time.sleep(LONG_S)
    return x


def started_then_sleep(directory: str, seconds: float) -> float:
    Path(directory, "started").touch()
    time.sleep(seconds)
    return seconds


# -- errors that do not survive pickling --------------------------------------


class CustomError(Exception):
    pass


def raise_custom(x: int) -> int:
    if x == BAD:
        raise CustomError(f"bad input {x}")
    return x * x


class CustomBaseException(BaseException):
    """Not an ``Exception``: what a library's control-flow signal looks like."""


def raise_base_exception(x: int) -> int:
    if x == BAD:
        raise CustomBaseException(f"bad input {x}")
    return x * x


def raise_keyboard_interrupt(x: int) -> int:
    """Raises KeyboardInterrupt itself (no signal): the item's error, not a Ctrl-C."""
    if x == BAD:
        raise KeyboardInterrupt(f"bad input {x}")
    return x * x


class LockedError(Exception):
    """An exception holding a lock: pickling it fails in the worker."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class LambdaError(Exception):
    """An exception holding a lambda: plain pickle cannot store it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.callback = lambda: message


class TwoArgError(Exception):
    """Pickles fine, but unpickling calls ``TwoArgError(message)``: TypeError."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code


def raise_locked(x: int) -> int:
    if x == BAD:
        raise LockedError(f"bad input {x}")
    return x * x


def raise_lambda_holder(x: int) -> int:
    if x == BAD:
        raise LambdaError(f"bad input {x}")
    return x * x


def raise_two_arg(x: int) -> int:
    if x == BAD:
        raise TwoArgError(7, f"bad input {x}")
    return x * x


def return_two_arg_error(x: int) -> Any:
    """For BAD, a *result* that pickles in the worker but won't unpickle in the caller."""
    if x == BAD:
        return TwoArgError(2, "as a result")
    return x * x


def return_lock(x: int) -> Any:
    if x == BAD:
        return threading.Lock()
    return x * x


def make_two_arg_error() -> TwoArgError:
    """An argument that pickles in the parent but cannot be unpickled in the worker."""
    return TwoArgError(1, "as an argument")


def identity(x: Any) -> Any:
    return x


def call_it(f: Any) -> Any:
    """Call the argument (a lambda shipped by cloudpickle)."""
    return f()


# -- initializers ------------------------------------------------------------

_state: dict[str, Any] = {}


def failing_initializer() -> None:
    raise CustomError("initializer failed on purpose")


def exiting_initializer() -> None:
    os._exit(5)


def slow_initializer(seconds: float) -> None:
    time.sleep(seconds)


def recording_initializer(directory: str, value: str) -> None:
    """Set per-worker state, and leave one file per call so tests can count calls."""
    _state["value"] = value
    _state["calls"] = _state.get("calls", 0) + 1
    Path(directory, f"init-{os.getpid()}-{time.monotonic_ns()}").touch()


def read_state(_: object) -> tuple[Any, int, int]:
    return _state.get("value"), _state.get("calls", 0), os.getpid()


# -- retries -----------------------------------------------------------------


def flaky(directory: str, x: int) -> int:
    """For BAD: crash the worker the first time (no marker yet), succeed after."""
    if x == BAD:
        marker = Path(directory, "crashed-once")
        if not marker.exists():
            marker.touch()
            os._exit(1)
    return x * x


def record_then_exit(directory: str, x: int) -> int:
    """Leave a file per run of ``x`` (to count runs); always crash the worker on BAD."""
    Path(directory, f"run-{x}-{time.monotonic_ns()}").touch()
    if x == BAD:
        os._exit(1)
    return x * x


def record_then_hang(directory: str, x: int) -> int:
    """Leave a file per run of ``x``; hang on BAD (for timeouts)."""
    Path(directory, f"run-{x}-{time.monotonic_ns()}").touch()
    if x == BAD:
        time.sleep(LONG_S)
    return x * x


def add(x: int, y: int = 0, *, scale: int = 1) -> int:
    if x == BAD:
        os._exit(3)
    return (x + y) * scale


# -- engine behaviour ------------------------------------------------------------


def len_plus(blob: bytes, x: int) -> int:
    return len(blob) + x


def native_threads(_: object) -> tuple[str, list[int]]:
    """OMP_NUM_THREADS as the worker sees it, and the BLAS pools' sizes."""
    import numpy  # noqa: F401 - loads the BLAS whose pool threadpoolctl reports
    from threadpoolctl import threadpool_info

    return os.environ["OMP_NUM_THREADS"], [
        info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"
    ]


def poll_until_stopped(directory: str) -> float:
    """Poll should_stop(); return how long it took to turn true (-1 if it never did)."""
    Path(directory, "started").touch()
    start = time.monotonic()
    while time.monotonic() - start < LONG_S / 3:
        if powerpool.should_stop():
            return time.monotonic() - start
        time.sleep(0.01)
    return -1.0


def stop_requested(_: object) -> bool:
    return powerpool.should_stop()


def return_two_arg_error_or_raise(x: int) -> Any:
    """BAD returns a result that won't unpickle in the caller; BAD + 1 raises."""
    if x == BAD + 1:
        raise CustomError(f"bad input {x}")
    return return_two_arg_error(x)


def array_or_two_arg_error(x: int) -> Any:
    """An array of ``x`` items, except BAD: a result that won't unpickle in the caller."""
    import numpy as np

    if x == BAD:
        return TwoArgError(3, "beside arrays")
    return np.arange(x)


WORKER_ONLY_MODULE = "powerpool_test_worker_only"
"""A module that only the worker that returned BAD's result has (never the caller)."""


def return_worker_only_class(x: int) -> Any:
    """For BAD, a result that loads in the worker and not in the caller: an
    instance (nested in a dict and a list) of a class whose module exists only
    in the worker; the next item shares a list with it."""
    if x == BAD + 1:
        return ("neighbour", x * x)
    if x != BAD:
        return x * x
    import types

    module = sys.modules.get(WORKER_ONLY_MODULE)
    if module is None:
        module = types.ModuleType(WORKER_ONLY_MODULE)
        exec("class Thing:\n    def __init__(self, x):\n        self.x = x\n", module.__dict__)
        sys.modules[WORKER_ONLY_MODULE] = module
    return {"nested": [module.Thing(x)]}


class LoadsOnlyInWorkers:
    """Pickles anywhere; loading it raises in the caller (a process that has no
    ``multiprocessing`` parent) and works in a worker process."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load_only_in_workers, (self.x,))


def _load_only_in_workers(x: int) -> LoadsOnlyInWorkers:
    import multiprocessing

    if multiprocessing.parent_process() is None:
        raise RuntimeError("this value loads only in a worker process")
    return LoadsOnlyInWorkers(x)


def return_loads_only_in_workers(x: int) -> Any:
    """For BAD, a result whose reconstruction raises only in the caller."""
    return (x, LoadsOnlyInWorkers(x)) if x == BAD else x * x


# -- large data ----------------------------------------------------------------


def array_info(a: Any) -> tuple[float, bool, str]:
    """Sum, writeability and type of an array argument (how it arrived)."""
    return float(a.sum()), bool(a.flags.writeable), type(a).__name__


def write_first(a: Any) -> float:
    """Write into the argument (allowed only when arguments are writable)."""
    a[0] = -1.0
    return float(a[0])


def echo_type(value: Any) -> tuple[str, int]:
    return type(value).__name__, len(value)


def same(value: Any) -> Any:
    return value


def big_then_crash(x: Any) -> int:
    """For a large array argument whose first element is BAD: die like a segfault."""
    if int(x[0]) == BAD:
        _quiet_crash()
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(LONG_S)
    return int(x[0])


def megabyte(_: object) -> bytes:
    return bytes(1_000_000)


_LEAKED: list[Any] = []


def leak_40mb(x: int) -> tuple[int, int, int]:
    """Leak 40 MB (touched, so it counts in RSS); report (x, pid, RSS after)."""
    import numpy as np
    import psutil

    _LEAKED.append(np.ones(5_000_000))
    return x, os.getpid(), psutil.Process().memory_info().rss


def oom_once(marker: str, x: int) -> tuple[int, float, float]:
    """For BAD, the first time: grow to ~330 MB, wait to be seen, die by SIGKILL
    (as the OOM killer does). Every item reports (x, start, end) times."""
    start = time.monotonic()
    if x == BAD and not os.path.exists(marker):
        import numpy as np

        Path(marker).touch()
        _LEAKED.append(np.ones(40_000_000))
        time.sleep(1.5)  # the worker's watch thread records its RSS meanwhile
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(LONG_S)
    time.sleep(0.2)
    return x, start, time.monotonic()


def dask_memory_limit(_: object) -> int:
    """The memory limit of the dask worker running this item."""
    import distributed

    return int(distributed.get_worker().memory_manager.memory_limit or 0)

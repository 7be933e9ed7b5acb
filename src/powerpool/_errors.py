"""Every exception powerpool raises, in one place.

Each class also inherits the standard-library class people already catch, so
code written for ``concurrent.futures`` keeps working::

    PowerpoolError
    ├── PoolClosedError         (RuntimeError)      you shut the pool down, then used it
    ├── BackendUnavailableError (ImportError)       the backend needs a package that is missing
    ├── CheckpointMismatchError (ValueError)        a checkpoint made for another function/input
    ├── WorkerError             (BrokenExecutor)    a worker broke while running an item
    │   ├── WorkerCrashedError                      it died: segfault, os._exit, SIGKILL/OOM
    │   └── InitializerError                        the initializer raised (real error as cause)
    ├── ItemTimeoutError        (TimeoutError)      an item ran past ``timeout``
    └── SerializationError      (pickle.PicklingError)
                                                     a function, argument, result or
                                                     exception could not be pickled

"You closed it" (:class:`PoolClosedError`) is deliberately a different error
from "it broke" (:class:`WorkerError`): the first is a bug in the caller, the
second a fault at run time that retries may cure.

Exceptions raised by *your* function are never wrapped: they are re-raised
with their own type, and the worker's formatted traceback is attached as
``__cause__`` (a :class:`RemoteTraceback`), the same convention as
``concurrent.futures.ProcessPoolExecutor``.
"""

from __future__ import annotations

import pickle
import signal
from concurrent.futures import BrokenExecutor

__all__ = [
    "BackendUnavailableError",
    "CheckpointMismatchError",
    "InitializerError",
    "ItemTimeoutError",
    "PoolClosedError",
    "PowerpoolError",
    "RemoteTraceback",
    "SerializationError",
    "WorkerCrashedError",
    "WorkerError",
]


class PowerpoolError(Exception):
    """Base class of every error powerpool itself raises."""


class PoolClosedError(PowerpoolError, RuntimeError):
    """The pool was shut down (by you) and then asked to do more work."""


class BackendUnavailableError(PowerpoolError, ImportError):
    """The chosen backend needs an optional package that is not installed."""


class CheckpointMismatchError(PowerpoolError, ValueError):
    """A checkpoint file belongs to a different function or input."""


class WorkerError(PowerpoolError, BrokenExecutor):
    """A worker broke while it held this item; the pool itself keeps working."""


class WorkerCrashedError(WorkerError):
    """The worker process died while running the item.

    ``exitcode`` is the process exit code (negative: killed by that signal).
    """

    def __init__(self, message: str, *, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_crash, (str(self), self.exitcode))

    @classmethod
    def from_exitcode(cls, exitcode: int | None, *, pid: int | None = None) -> WorkerCrashedError:
        """Build the error with a message that names the signal and its likely cause."""
        who = f"worker process {pid}" if pid else "worker process"
        if exitcode is None:
            return cls(f"{who} vanished without an exit code", exitcode=None)
        if exitcode < 0:
            try:
                name = signal.Signals(-exitcode).name
            except ValueError:
                name = f"signal {-exitcode}"
            hint = _SIGNAL_HINTS.get(name, "")
            return cls(f"{who} was killed by {name}{hint}", exitcode=exitcode)
        return cls(f"{who} exited with code {exitcode} while running this item", exitcode=exitcode)


def _rebuild_crash(message: str, exitcode: int | None) -> WorkerCrashedError:
    return WorkerCrashedError(message, exitcode=exitcode)


_SIGNAL_HINTS = {
    "SIGKILL": " (often the kernel's out-of-memory killer, or someone ran kill -9)",
    "SIGSEGV": " (a segmentation fault: a bug in native code, or a stack overflow)",
    "SIGBUS": " (a bus error: native code touched unmapped memory)",
    "SIGABRT": " (abort(): a native library hit a fatal assertion)",
    "SIGFPE": " (a floating-point exception in native code)",
    "SIGTERM": " (asked to terminate from outside)",
}


class InitializerError(WorkerError):
    """The pool's ``initializer`` raised; the original exception is ``__cause__``."""

    @classmethod
    def wrap(cls, exc: BaseException) -> InitializerError:
        """The error every item of a pool with a failed initializer gets."""
        error = cls(f"the pool's initializer raised {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error


class ItemTimeoutError(PowerpoolError, TimeoutError):
    """The item ran longer than the pool's ``timeout``; its worker was stopped."""


class SerializationError(PowerpoolError, pickle.PicklingError):
    """Something that must cross a process boundary could not be pickled.

    Also stands in for an exception raised by your function that cannot itself
    be pickled: the message then holds its type name and text.
    """


class RemoteTraceback(Exception):
    """Carries the formatted traceback from the worker; set as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'

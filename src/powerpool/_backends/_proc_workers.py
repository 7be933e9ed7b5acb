"""The process engine's worker processes as the parent sees them.

What :mod:`._processes` (the dispatcher) uses to start and hold its workers:
the start method (:func:`choose_context`, with the fork server's preload),
the :class:`Worker` handle with its ledger, stopping them at shutdown
(:func:`stop_workers`), and the exit hook that shuts every live backend down
before multiprocessing's own. The code that runs inside a
worker is :mod:`._worker`.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import multiprocessing
import select
import sys
import threading
import time
import weakref
from collections import OrderedDict
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from .._chunk import Chunk
from .._mainfn import require_guard
from ._worker import WORKER_FN_CACHE

if TYPE_CHECKING:
    from ._processes import ProcessBackend

__all__ = ["JOIN_GRACE_S", "Worker", "choose_context", "exiting", "live", "stop_workers"]

_TRACKER_PATCHERS = ("joblib.externals.loky.backend.resource_tracker",)
"""Modules that, once imported, make every forkserver worker import them too."""

SERVER_PRELOADS = ("numpy", "scipy", "pandas", "sklearn", "torch")
"""Heavy libraries the fork server imports when the caller already has. A
worker forked from the server then starts with them, instead of importing
them to unpickle its first function: numpy alone took each worker ~130 ms,
on every cold pool and every replaced worker, in a process with a thread
alive (where powerpool starts workers through the fork server: a Jupyter
kernel, a program that used a thread pool). Only what the caller imported:
its functions likely need it, and it is known to import here."""


JOIN_GRACE_S = 5.0
"""How long shutdown waits for an idle worker to exit before killing it."""

# Every backend not yet shut down, for the exit handler below.
live: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()
exiting = False
"""Set at interpreter exit; read by dispatcher threads: no new workers from then on."""


def _shut_down_at_exit() -> None:
    """Shut every live process backend down in order, before multiprocessing's own
    exit handler (atexit runs handlers last-registered first, and this module
    registers after importing multiprocessing): otherwise that handler kills
    our workers first, the dispatchers see deaths and start replacements while
    the interpreter and the fork server go away (EOFError tracebacks)."""
    global exiting
    exiting = True
    for backend in list(live):
        backend.shutdown(wait=True)


atexit.register(_shut_down_at_exit)


def choose_context(start_method: str | None) -> BaseContext:
    """The user's start method, else fork while this process is single-threaded.

    fork is the fastest start (no re-import) but unsafe once other threads may
    hold locks; then forkserver (fast, safe), else spawn. Raises
    PowerpoolError where the start method would run an unguarded script again
    in every worker (spawn; see _mainfn).
    """
    methods = multiprocessing.get_all_start_methods()
    if start_method is None:
        if "fork" in methods and threading.active_count() == 1:
            start_method = "fork"
        else:
            start_method = "forkserver" if "forkserver" in methods else "spawn"
    context = multiprocessing.get_context(start_method)
    if start_method == "spawn" or (start_method == "forkserver" and not _preload_worker(context)):
        require_guard(start_method)
    return context


_PRELOAD = __name__.rsplit(".", 1)[0] + "._preload"


def _preload_worker(context: BaseContext) -> bool:
    """Have the fork server import :mod:`._preload`; True if its workers will skip the script.

    The user's own preload modules are kept. Once the server runs, its list is
    fixed: then only a list that already names ours is trusted.
    """
    import multiprocessing.forkserver  # here: fork needs none of it; keeps a cold start fast

    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    modules = list(getattr(server, "_preload_modules", None) or [])
    if _PRELOAD in modules:
        return True
    if getattr(server, "_forkserver_pid", None) is not None:
        return False  # started without it
    # "__main__" (multiprocessing's default entry) is dropped: nothing needs the
    # script there (see _mainfn), a server that ran it would run an unguarded
    # script's work, and on 3.10-3.13 the server never gets its path anyway.
    # joblib's loky replaces multiprocessing's resource tracker; each worker
    # would then import joblib to unpickle it (1-2 s on a loaded machine)
    # unless the server already has.
    patchers = [name for name in _TRACKER_PATCHERS if name in sys.modules]
    # Before _PRELOAD, whose scan of native thread pools then sees them.
    heavy = [name for name in SERVER_PRELOADS if name in sys.modules and name not in modules]
    preload = [m for m in modules if m != "__main__"] + patchers + heavy + [_PRELOAD]
    context.set_forkserver_preload(preload)
    return True


class Worker:
    """One worker process and the ledger of what it holds.

    A slotted class, not a dataclass: see "Records" in docs/architecture.md.
    """

    __slots__ = (
        "chunk",
        "conn",
        "functions",
        "hung_up",
        "process",
        "retiring",
        "sent_at",
        "sent_bytes",
        "slot",
    )

    def __init__(self, process: BaseProcess, conn: Connection, slot: int) -> None:
        self.process = process
        """The worker process (its sentinel tells the dispatcher when it dies)."""
        self.conn = conn
        """The parent's end of this worker's pipe."""
        self.slot = slot
        """Index of its (position, started) pair in the shared status array."""
        self.chunk: Chunk | None = None
        """The chunk it is running; None when idle (the ledger)."""
        self.sent_at = 0.0
        """time.monotonic() when the chunk was sent: a deadline never starts earlier."""
        self.sent_bytes = 0
        """Size of the chunk's pickled arguments (reported with its result, for auto)."""
        self.functions: OrderedDict[bytes, None] = OrderedDict()
        """Digests of the functions this worker holds, least recently used first."""
        self.retiring = False
        """It reached its limits (_recycle) and exits after its last results: send it nothing."""
        self.hung_up = False
        """Its pipe reached EOF: the process is exiting; only its sentinel is still awaited."""

    @property
    def name(self) -> str:
        return f"process-{self.slot}"

    def remember(self, fn_id: bytes) -> bool:
        """Note that ``fn_id`` is sent or used; True if the worker lacks it.

        Mirrors the worker's own cache (same LRU rule, same sequence of ids),
        so parent and worker always agree on what the worker holds.
        """
        if fn_id in self.functions:
            self.functions.move_to_end(fn_id)
            return False
        self.functions[fn_id] = None
        if len(self.functions) > WORKER_FN_CACHE:
            self.functions.popitem(last=False)
        return True


class Watch:
    """What the dispatcher waits on: the wake pipe and every worker's pipe and
    sentinel, in one poll set kept from one wait to the next.

    ``multiprocessing.connection.wait`` builds a selector and registers every
    descriptor on each call: 2 per worker on every wake-up of the dispatcher,
    which comes about once per chunk (33 registrations per chunk with 16
    workers, ~5 us each).
    """

    def __init__(self, wake_fd: int) -> None:
        self._poll = select.poll()
        self._poll.register(wake_fd, select.POLLIN)
        self._wake_fd = wake_fd
        self._fds: dict[int, tuple[Worker, bool]] = {}  # fd -> (worker, is its pipe)

    def add(self, worker: Worker) -> None:
        for fd, is_pipe in ((worker.conn.fileno(), True), (worker.process.sentinel, False)):
            self._poll.register(fd, select.POLLIN)
            self._fds[fd] = (worker, is_pipe)

    def remove(self, worker: Worker, *, pipe_only: bool = False) -> None:
        """Stop watching its pipe (at EOF a pipe is always ready) and, unless
        ``pipe_only``, its sentinel: before either is closed."""
        for fd, (owner, is_pipe) in list(self._fds.items()):
            if owner is worker and (is_pipe or not pipe_only):
                self._poll.unregister(fd)
                del self._fds[fd]

    def wait(self, timeout_s: float | None) -> tuple[bool, list[Worker], list[Worker]]:
        """Block until something happens or ``timeout_s`` passes: (woken, the
        workers with a message to read, the workers whose process may have ended)."""
        ms = None if timeout_s is None else math.ceil(timeout_s * 1000)
        woken = False
        talking: list[Worker] = []
        ended: list[Worker] = []
        for fd, _ in self._poll.poll(ms):
            if fd == self._wake_fd:
                woken = True
            elif fd in self._fds:
                worker, is_pipe = self._fds[fd]
                (talking if is_pipe else ended).append(worker)
        return woken, talking, ended


def stop_workers(workers: list[Worker], *, kill: bool) -> None:
    """Ask every worker to exit (an empty message), or kill them all; wait
    :data:`JOIN_GRACE_S` for them together, kill the late; empty ``workers``."""
    for worker in workers:
        if kill:
            worker.process.kill()
        else:
            with contextlib.suppress(OSError):  # already gone: nothing to ask
                worker.conn.send_bytes(b"")
    deadline = time.monotonic() + JOIN_GRACE_S
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
    workers.clear()

"""Reaching a dask cluster and looking after it for the dask backend.

* :func:`_connect`: a Client for ``address=``, ``scheduler_file=``,
  ``client=`` (borrowed, never closed here) or a LocalCluster of our own;
* :class:`_Restarter`: restarts, through their nanny, the workers whose item
  ran past its timeout (the only way to end a thread dask cannot stop);
* :func:`_close_at_exit`: shuts the backends down at interpreter exit before
  distributed's own exit hooks close their clusters under them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, Protocol

from .._options import DASK_OPTION_NAMES

__all__ = [
    "_OPTIONS",
    "_Restarter",
    "_check_options",
    "_close_at_exit",
    "_connect",
    "check_worker_limits",
]

_log = logging.getLogger("powerpool")

# distributed's Client and LocalCluster are only partly annotated.
_Client = Any
_Cluster = Any


class _ShutsDown(Protocol):
    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None: ...


_OPTIONS = DASK_OPTION_NAMES
"""Keys of ``BackendConfig.options`` this backend understands; others are typos."""


_RESTART_TIMEOUT_S = 30.0
# How long a nanny gets to stop a worker whose item ran late (it asks the
# worker to close, and kills it after 80 % of this): generous, because a
# restart that gives up leaves the abandoned thread running.


class _Restarter:
    """Restarts workers whose item ran late, one at a time, off the results thread.

    A restart takes seconds (the nanny stops the process and starts a new
    one); doing it here keeps the other chunks' results flowing meanwhile.
    The thread starts on the first restart and ends at :meth:`close`.
    """

    def __init__(self, client: _Client, name: str) -> None:
        self._client = client
        self._name = name
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def restart(self, worker: str) -> None:
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put(worker)

    def stop(self) -> None:
        """Start no further restart; one under way goes on (see :meth:`join`)."""
        with self._lock:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)

    def join(self) -> None:
        """Wait for the thread: for a restart under way to finish, or to fail
        because the caller closed the client (what shutdown does with a
        LocalCluster of its own, which is about to go anyway)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while (worker := self._queue.get()) is not None:
            if self._closed:
                continue
            try:
                # The scheduler's own call: it kills the process through the
                # nanny and returns, without waiting for the new process to
                # join (Client.restart_workers waits, and first fetches every
                # worker's details: slow on a big cluster, and a shutdown
                # would cut its wait short with an error in the log).
                self._client.sync(
                    self._client.scheduler.restart_workers,
                    workers=[worker],
                    timeout=_RESTART_TIMEOUT_S,
                    wait_for_workers=False,
                    on_error="return",
                    stimulus_id=f"powerpool-late-item-{time.time()}",
                )
            except BaseException:  # gone already, or the scheduler or client is: nothing to stop
                _log.debug("could not restart dask worker %s", worker, exc_info=True)


_LIVE: weakref.WeakSet[_ShutsDown] = weakref.WeakSet()
"""Backends not yet shut down, closed by :func:`_close_live` at interpreter exit."""
_LIVE_LOCK = threading.Lock()
_AT_EXIT_REGISTERED = False


def _close_at_exit(backend: _ShutsDown) -> None:
    """Make sure ``backend`` is shut down at exit *before* distributed's own exit hooks.

    A warm pool's backend would otherwise be shut down by powerpool's exit
    hook, which runs after distributed's (``atexit`` runs hooks in reverse
    order, and distributed registers its hooks when first imported, after
    powerpool): the LocalCluster would be closed under a live client and
    live futures ("lost scattered data", restarts cut short). Registering
    here, after ``import distributed``, puts this hook first.
    """
    global _AT_EXIT_REGISTERED
    with _LIVE_LOCK:
        _LIVE.add(backend)
        if not _AT_EXIT_REGISTERED:
            import distributed.deploy.spec  # noqa: F401  (its exit hook must be registered first)

            atexit.register(_close_live)
            _AT_EXIT_REGISTERED = True


def _close_live() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for backend in live:
        with contextlib.suppress(Exception):
            backend.shutdown(wait=False)


def check_worker_limits(
    max_tasks_per_child: int | None, max_worker_memory: int | None, options: Mapping[str, Any]
) -> None:
    """Map powerpool's worker limits to Dask's, or refuse what Dask cannot do.

    ``max_worker_memory`` becomes the ``memory_limit`` of the LocalCluster
    powerpool starts (Dask pauses, spills and restarts workers by it); a
    cluster someone else started has its own limits, set where it was
    started. Dask has no per-worker task count, so ``max_tasks_per_child``
    is refused rather than ignored.
    """
    if max_tasks_per_child is not None:
        raise ValueError(
            "max_tasks_per_child is not available on the dask backend (Dask workers have no "
            "task-count limit); use max_worker_memory, or backend='processes'"
        )
    connected = any(options.get(k) is not None for k in ("address", "scheduler_file", "client"))
    if max_worker_memory is not None and connected:
        raise ValueError(
            "max_worker_memory applies to a LocalCluster powerpool starts; for an existing "
            "cluster, start its workers with --memory-limit"
        )


def _check_options(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown dask option(s) {', '.join(unknown)}; known: {', '.join(sorted(_OPTIONS))}"
        )
    given = [k for k in ("address", "scheduler_file", "client") if options.get(k) is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of address, scheduler_file, client (got {given})")
    if options.get("client") is not None and options.get("security") is not None:
        raise ValueError("security= applies to a new Client; the given client has its own")
    if options.get("cluster_kwargs") and given:
        raise ValueError("cluster_kwargs only applies when powerpool starts a LocalCluster")


def _connect(
    distributed: Any, options: Mapping[str, Any], workers: int
) -> tuple[_Client, _Cluster | None, bool]:
    """Return (client, cluster we started or None, whether we own the client)."""
    client = options.get("client")
    if client is not None:
        if not isinstance(client, distributed.Client):
            raise TypeError(f"client= must be a distributed.Client, not {type(client).__name__}")
        if client.asynchronous:
            raise ValueError("client= must be a synchronous Client (asynchronous=False)")
        return client, None, False
    security = options.get("security")
    address = options.get("address")
    scheduler_file = options.get("scheduler_file")
    if address is not None or scheduler_file is not None:
        where = address if address is not None else f"scheduler file {scheduler_file}"
        try:
            new = distributed.Client(
                address,
                scheduler_file=scheduler_file,
                security=security,
                set_as_default=False,  # never hijack the caller's default dask scheduler
            )
        except OSError as exc:
            raise OSError(f"could not connect to the dask scheduler at {where}: {exc}") from exc
        return new, None, True
    kwargs: dict[str, Any] = {
        "n_workers": max(1, workers),
        "threads_per_worker": 1,  # the pool's workers are processes, like backend="processes"
        "processes": True,
        # A free port, not :8787: a second cluster would find 8787 taken and
        # warn (None does not help: the scheduler's HTTP server still takes 8787).
        "dashboard_address": ":0",
    }
    if security is not None:
        kwargs["security"] = security
    kwargs.update(options.get("cluster_kwargs") or {})
    if kwargs.get("processes", True):
        _require_guard_for_nannies()
    cluster = distributed.LocalCluster(**kwargs)
    try:
        new = distributed.Client(cluster, security=cluster.security, set_as_default=False)
    except BaseException:
        cluster.close()
        raise
    return new, cluster, True


def _require_guard_for_nannies() -> None:
    """Refuse, with a readable message, what would end in "Nanny failed to start".

    Dask's nannies start their workers with ``spawn`` (or ``forkserver``),
    both of which import the user's script again in each new process: an
    unguarded script would start a second cluster there, and distributed
    only reports that the nanny died.
    """
    import dask

    from .._mainfn import require_guard

    method = str(dask.config.get("distributed.worker.multiprocessing-method", "spawn"))
    if method != "fork":
        require_guard(
            method,
            "or start the LocalCluster's workers as threads (cluster_kwargs={'processes': False})",
        )

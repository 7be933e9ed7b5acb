"""The small protocol every backend implements, and the settings it receives.

A backend only runs chunks. Ordering, the in-flight window, chunk sizing,
retries, errors policy, progress and statistics live once in the pool core.

Life of a backend::

    b = Backend(config, deliver)    # start workers (may be lazy)
    b.submit(chunk)                 # many times, from any thread; must not block long
    ...                             # b calls deliver(ChunkResult) once per chunk,
                                    # from any thread, unless chunk.claim() said no
    b.cancel(epoch)                 # work of epochs <= epoch should stop
    b.shutdown(wait=..., kill=...)  # idempotent

Per-item failures the backend detects itself (a worker crash, a timeout, an
unpicklable value) are reported as outcomes, never raised from ``submit``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Protocol

from .._chunk import Chunk, ChunkResult

__all__ = ["Backend", "BackendConfig", "Deliver", "chunk_floor_s"]

Deliver = Callable[[ChunkResult], None]


# A named tuple, not a dataclass: see "Records" in docs/architecture.md.
class BackendConfig(NamedTuple):
    """Settings that shape the workers themselves (not a single run)."""

    workers: int
    """Number of workers (threads, processes, or concurrent coroutines)."""
    initializer: Callable[..., Any] | None = None
    """Called once in each worker before its first item."""
    initargs: tuple[Any, ...] = ()
    """Arguments for ``initializer``."""
    native_threads: int | None = None
    """Cap on BLAS/OpenMP threads per worker process; None picks cores // workers."""
    start_method: str | None = None
    """multiprocessing start method; None picks a safe one."""
    max_tasks_per_child: int | None = None
    """Items a worker process runs before it is replaced by a fresh one; None: no limit."""
    max_worker_memory: int | None = None
    """RSS in bytes past which a worker process is replaced after its current item."""
    writable_arguments: bool = False
    """Large arguments arrive in workers copy-on-write instead of read-only."""
    options: Mapping[str, Any] = MappingProxyType({})
    """Backend-specific settings (e.g. ``address`` and ``client`` for dask)."""


class Backend(Protocol):
    """What the pool core needs from a backend."""

    name: ClassVar[str]
    """Registry name, e.g. ``"threads"``."""
    chunk_target_s: ClassVar[float]
    """How long one chunk should compute so the per-chunk overhead stays small."""
    supports_timeout: ClassVar[bool]
    """Whether ``Chunk.timeout_s`` is enforced (the worker is stopped and replaced)."""

    workers: int
    """How many items can run at once (threads on a cluster). The core reads it
    before each refill, so a backend whose capacity changes (workers joining
    or leaving a cluster) may update it, and ``chunk_target_s`` with it."""

    # Optional: ``chunk_floor_s`` (float), the least work a tapered tail chunk
    # holds; read through chunk_floor_s() below, 0 when a backend has none.

    def __init__(self, config: BackendConfig, deliver: Deliver) -> None: ...

    def submit(self, chunk: Chunk) -> None:
        """Queue ``chunk``; ``deliver`` will be called with its result later."""

    def cancel(self, epoch: int) -> None:
        """Ask running work of epochs <= ``epoch`` to stop (``should_stop()`` turns true)."""

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        """Stop the workers. ``kill`` stops running items at once where possible."""


def chunk_floor_s(backend: object) -> float:
    """Seconds of work below which the core never tapers a chunk (0: no floor).

    Only backends with a costly per-chunk round trip set ``chunk_floor_s``
    (Dask: a scheduler hop); for local pools the taper may go down to one item.
    """
    floor: float = getattr(backend, "chunk_floor_s", 0.0)
    return floor

"""Large buffers between processes through anonymous shared memory.

Numpy arrays, ``bytes``, ``bytearray`` and other buffer-protocol objects of
at least :data:`OUT_OF_BAND_BYTES` do not travel through a worker's pipe: the
pickle stream keeps a small reference and the data goes into a shared-memory
segment whose *file descriptor* is passed over the same (Unix socket) pipe::

    sender                                           receiver
    ──────                                           ────────
    pickle(obj, protocol 5, buffer_callback) ─┐
      large PickleBuffer / bytes ─► memfd ────┼─ SCM_RIGHTS fd ─► mmap ─► memoryview
      (one copy: os.write)                    │                     │
    small in-band pickle ─────────────────────┴─ pipe ──► pickle.loads(buffers=…)
                                                          numpy: a view of the mapping (0 copies)
                                                          bytes: one copy out of it

Not every big buffer takes a segment: array arguments under
:data:`PIPE_BELOW_BYTES` the first time they are sent in a run, and big
``bytes``/``bytearray`` results, are *piped*: sent as raw bytes after the
descriptors and read by the receiver straight into its object's memory
(``_transfer.send_buffers``, ``_transfer.receive_buffers``). Fresh pages are what costs
on a VM, and a segment is fresh memory on both sides on every chunk, where a
piped buffer lands in the worker's recycled heap (see the constants).

Why this and not joblib's memory-mapped files or ``multiprocessing.shared_memory``:

* **Nothing can leak.** A segment is a ``memfd_create`` file (elsewhere an
  unlinked temporary file): it never has a name in ``/dev/shm`` or on disk,
  and the kernel frees it when the last descriptor and mapping are gone. A
  crashed worker, Ctrl-C, or a SIGKILLed parent cannot leave one behind,
  with no resource tracker, no cleanup thread and no naming scheme.
  Named segments (``SharedMemory``, joblib's temp folder) need someone
  alive afterwards to unlink them; a SIGKILL skips every ``finally``.
* **Pickle protocol 5 finds the buffers** (PEP 574): numpy (and anything
  else that returns a ``PickleBuffer``) hands its memory over without
  copying, at any depth of the argument, with no type-specific code here.
  Big ``bytes``/``bytearray`` — which pickle always writes in-band — are
  found by a second pass only when the message is large and its items
  average :data:`SCAN_AVG_BYTES` or more, so a chunk of many small objects
  never pays a Python call per object.
* **One copy instead of four**: the pipe path pickles (copy), writes to a
  64 KiB pipe (copy, many wake-ups), reads (copy) and unpickles (copy).

Lifetime: a :class:`Segment` closes its descriptor when the last reference
to it goes. Arguments: the same object used by many items of one run is
written once (:class:`ScopeCache`, keyed by ``id()`` while the cache holds
the object, so the id cannot be reused) and each chunk passes the
descriptor again; the entry goes when the run does. Workers map arguments
per chunk and unmap them when the items' arguments are dropped; results
are mapped in the caller and live as long as the result objects.

Arguments arrive **read-only** (a write would change what other items and
workers see, or fail inside the mapping); ``writable_arguments=True`` maps
them copy-on-write instead: writes stay private to that worker.
Results arrive writable, owned by the caller alone.
"""

from __future__ import annotations

import ctypes
import functools
import io
import mmap
import os
import pickle
import tempfile
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ._wire import MAIN_MARK, SalvagingUnpickler

__all__ = [
    "COPY",
    "OUT_OF_BAND_BYTES",
    "OWN",
    "PIPED",
    "READ",
    "Packed",
    "ScopeCache",
    "Segment",
    "keep_freed_memory",
    "map_fds",
    "pack",
    "unpack",
]

OUT_OF_BAND_BYTES = 256 * 1024
"""Buffers this large or larger go through shared memory. A segment costs
~20-40 us (create, write, pass the descriptor, map, unmap); the pipe costs
~0.3 ms per MB plus wake-ups. Below ~256 KiB the pipe is as fast and makes
no system calls per buffer."""

PIPE_BELOW_BYTES = 32 * 1024 * 1024
"""Arguments' out-of-band buffers (arrays) smaller than this travel on the
pipe as messages of their own, read by the worker straight into the memory
the array then uses; larger ones, and any object already sent once in the
run, in a shared segment (written once, mapped by every chunk that uses it).
Measured here, warm pool, 200 MB of distinct float64 arrays per map (median
of 5, see benchmarks/RESULTS.md, "Round 3"): piped 0.15-0.25 s against segments 0.31-0.42 s
at every size from 0.5 MB to 16.8 MB; at 33.5 MB segments win 0.41 s to
1.3 s. The cause is fresh pages, expensive on a VM: a piped buffer lands in
the worker's recycled heap (see WORKER_MALLOC_KEEP_BYTES), up to glibc's
32 MB limit for heap allocations; a segment is fresh shared memory on both
sides on every chunk. The trade-off: the parent's dispatcher thread copies
piped buffers into the socket (it no longer only passes descriptors), and an
argument under this size used by every item is piped once, then shared.
Results are never piped as arrays: the caller maps a segment without a
copy, where a piped buffer is fresh memory in the caller's process
(measured: 16.8 MB results, segments 0.12-0.15 s, piped 0.47-0.51 s)."""

MAX_SEEN = 1024
"""Objects per run remembered as piped once (see ScopeCache.repeated): an
object used again after more than this many others is piped again."""

SCAN_AVG_BYTES = 64 * 1024
"""A message whose items average this many in-band pickled bytes is pickled
a second time to move big ``bytes``/``bytearray`` out of band. That pass
calls Python once per object, so it is kept for messages made of a few big
items, never for chunks of many small ones."""

WORKER_MALLOC_KEEP_BYTES = 64 * 1024 * 1024
"""Freed heap memory a worker process keeps for its next chunk instead of
returning it to the kernel (glibc's ``M_TRIM_THRESHOLD``; allocations up to
32 MB come from that heap, ``M_MMAP_THRESHOLD``). Fresh pages are what big
data costs on a VM: touching a page the kernel just handed out costs
~2-25 us here (measured: 7 ms per MB of fresh anonymous memory, 0.05 ms per
MB of recycled heap). By default glibc returns a chunk's freed results and
pickle buffers to the kernel, so every chunk of 1 MB results faulted all its
pages in again (20 000 faults per 200 MB; 0 with this). The price: a worker's
RSS stays up to this much above what it uses (what the chunk byte budget
lets a chunk hold: max_inflight_bytes, 64 MB by default); only in workers,
never in the caller's process."""

PICKLE_BUFFER, BYTES, BYTEARRAY, PIPED_BYTES, PIPED_BYTEARRAY, PIPED_BUFFER = 0, 1, 2, 3, 4, 5
"""Kinds of out-of-band buffers: how the receiver rebuilds each one. The
first three travel in segments; PIPED ones as messages of their own on the
pipe, received straight into the memory the receiver's object uses."""

PIPED = (PIPED_BYTES, PIPED_BYTEARRAY, PIPED_BUFFER)
"""The kinds that travel on the pipe (see _transfer)."""
_BUFFERS = (PICKLE_BUFFER, PIPED_BUFFER)  # pickle's own out-of-band buffers

Table = tuple[tuple[int, int], ...]
"""(kind, nbytes) per out-of-band buffer, in pickling order: segments' descriptors
are passed first, in that order, then the piped buffers, in that order."""

_PROTOCOL = 5
_HAS_MEMFD = hasattr(os, "memfd_create")


class Segment:
    """One buffer's worth of anonymous shared memory, held open by a descriptor.

    The descriptor is closed when the object goes (or by :meth:`close`);
    the memory lives on while a receiver still maps it.
    """

    __slots__ = ("__weakref__", "_finalizer", "fd", "nbytes")

    def __init__(self, data: memoryview) -> None:
        self.nbytes = data.nbytes
        """Size of the buffer in bytes."""
        self.fd = _anonymous_file()
        """The segment's descriptor in this process."""
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        try:
            _write_all(self.fd, data)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the descriptor now (idempotent)."""
        self._finalizer()


def _anonymous_file() -> int:
    """A file descriptor of nameless, memory-backed storage."""
    if _HAS_MEMFD:
        return os.memfd_create("powerpool", os.MFD_CLOEXEC)
    # Elsewhere: an unlinked temporary file (in RAM where /dev/shm exists).
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryFile(dir=where) as handle:
        return os.dup(handle.fileno())


def _write_all(fd: int, data: memoryview) -> None:
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while view:
        written = os.write(fd, view)
        view = view[written:]


def keep_freed_memory() -> None:
    """In a worker process: recycle freed heap memory (see WORKER_MALLOC_KEEP_BYTES).

    glibc only (elsewhere, nothing to do); setting these also turns off
    glibc's own moving thresholds, which is the point.
    """
    try:
        libc = _libc()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    mallopt(m_trim_threshold, WORKER_MALLOC_KEEP_BYTES)


class ScopeCache:
    """Argument segments shared by the chunks of one run (or scope).

    ``id(obj)`` is a safe key because the entry holds ``obj`` itself: while
    it is cached its id cannot be reused. The whole scope is dropped when
    the scope object (the run) is garbage-collected.
    """

    def __init__(self) -> None:
        # Invariant: _lock guards _scopes; entries are (obj, segment).
        self._lock = threading.Lock()
        self._scopes: dict[int, dict[int, tuple[object, Segment]]] = {}
        # Objects piped once per scope, by id, held weakly (see repeated()).
        self._seen: dict[int, dict[int, weakref.ref[Any]]] = {}

    def get(self, scope: object | None, obj: object, data: memoryview) -> Segment:
        """The segment holding ``obj``'s buffer for this scope, written on first use."""
        if scope is None:
            return Segment(data)
        key = id(scope)
        with self._lock:
            entries = self._scopes.get(key)
            entry = None if entries is None else entries.get(id(obj))
            if entry is not None and entry[0] is obj:
                return entry[1]
        segment = Segment(data)
        with self._lock:
            entries = self._scopes.get(key)
            if entries is None:
                entries = self._scopes[key] = {}
                weakref.finalize(scope, self._drop, key)
            entries[id(obj)] = (obj, segment)
        return segment

    def repeated(self, scope: object | None, obj: object) -> bool:
        """Whether ``obj`` was asked about before in this scope (or already has a
        segment): a buffer piped once goes into a shared segment the second
        time. Objects are remembered weakly (a run over many distinct arrays
        must not keep them alive); one that takes no weak reference never
        counts as repeated."""
        if scope is None:
            return False
        key = id(scope)
        with self._lock:
            entries = self._scopes.get(key)
            if entries is not None and id(obj) in entries and entries[id(obj)][0] is obj:
                return True
            seen = self._seen.setdefault(key, {})
            ref = seen.get(id(obj))
            if ref is not None and ref() is obj:
                return True
            try:
                seen[id(obj)] = weakref.ref(obj)
            except TypeError:
                return False
            if len(seen) > MAX_SEEN:  # the oldest: repeats are near each other
                del seen[next(iter(seen))]
            if len(seen) == 1 and key not in self._scopes:
                weakref.finalize(scope, self._drop, key)
        return False

    def release(self, scope: object) -> None:
        """Forget the scope's segments now (chunks already packed keep theirs)."""
        self._drop(id(scope))

    def _drop(self, key: int) -> None:
        with self._lock:
            self._scopes.pop(key, None)
            self._seen.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._scopes.values())


class Packed:
    """A pickled message: the in-band bytes, and its out-of-band buffers."""

    __slots__ = ("inband", "piped", "segments", "table")

    def __init__(
        self,
        inband: bytes,
        table: Table | None,
        segments: list[Segment],
        piped: list[memoryview] | None = None,
    ) -> None:
        self.inband = inband
        """The pickle stream (small: large buffers are only referenced)."""
        self.table = table
        """(kind, nbytes) per out-of-band buffer; None when there are none."""
        self.segments = segments
        """The segments to send, in the order of ``table``."""
        self.piped = [] if piped is None else piped
        """The buffers to send as messages of their own, in the order of ``table``."""

    @property
    def nbytes(self) -> int:
        """Total size of the message, in-band and out of band."""
        return len(self.inband) + (0 if self.table is None else sum(n for _, n in self.table))


def pack(
    obj: Any,
    *,
    items: int = 1,
    cache: ScopeCache | None = None,
    scope: object | None = None,
    pipe_bytes: bool = False,
    pipe_below: int | None = None,
) -> Packed:
    """Pickle ``obj``, moving buffers of OUT_OF_BAND_BYTES or more into segments.

    ``items`` is how many items the message holds (for the bytes scan rule);
    ``cache``/``scope`` share one segment per object across a run's chunks.
    ``pipe_bytes=True`` sends big ``bytes``/``bytearray`` as messages of
    their own on the pipe (:func:`send_buffers`), not in segments: for
    results, which the receiver would copy out of a segment anyway. On the
    pipe, the receiver reads each straight into the object it returns (one
    fresh allocation, the result itself) and the sender copies nothing in
    user space; a segment costs fresh shared pages on both sides on every
    chunk (measured, 200 x 1 MB bytes results, warm pool: see
    benchmarks/RESULTS.md, "Round 3"). ``pipe_below``: out-of-band buffers (arrays)
    smaller than this are piped too (default :data:`PIPE_BELOW_BYTES`).
    """
    if pipe_below is None:
        pipe_below = PIPE_BELOW_BYTES
    piped: list[memoryview] = []
    segments: list[Segment] = []
    kinds: list[tuple[int, int]] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < OUT_OF_BAND_BYTES:
            return True  # in-band
        owner = view.obj if view.obj is not None else buffer
        if view.nbytes < pipe_below and (cache is None or not cache.repeated(scope, owner)):
            piped.append(view)
            kinds.append((PIPED_BUFFER, view.nbytes))
            return False
        segment = cache.get(scope, owner, view) if cache is not None else Segment(view)
        segments.append(segment)
        kinds.append((PICKLE_BUFFER, view.nbytes))
        return False

    def reset() -> None:
        segments.clear()
        kinds.clear()
        piped.clear()

    inband = _dumps(obj, out_of_band, None, reset)
    if len(inband) >= OUT_OF_BAND_BYTES and len(inband) >= SCAN_AVG_BYTES * max(1, items):
        reset()

        def persistent_id(value: Any) -> Any:
            view = memoryview(value)
            if pipe_bytes or view.nbytes < pipe_below:
                piped.append(view)
                kind = PIPED_BYTES if type(value) is bytes else PIPED_BYTEARRAY
                kinds.append((kind, view.nbytes))
                return len(kinds) - 1
            kind = BYTES if type(value) is bytes else BYTEARRAY
            segment = cache.get(scope, value, view) if cache is not None else Segment(view)
            segments.append(segment)
            kinds.append((kind, view.nbytes))
            return len(kinds) - 1

        inband = _dumps(obj, out_of_band, persistent_id, reset)
    return Packed(inband, tuple(kinds) if kinds else None, segments, piped)


def _dumps(
    obj: Any,
    buffer_callback: Callable[[pickle.PickleBuffer], bool],
    persistent_id: Callable[[Any], Any] | None,
    reset: Callable[[], None],
) -> bytes:
    """By the rule of ``_wire.dumps``, with out-of-band buffers: plain pickle,
    else (or when the stream names ``__main__``, which workers never import)
    cloudpickle with ``__main__`` functions rebuilt by ``_mainfn``'s rules.
    ``reset`` forgets the buffers a first, abandoned attempt collected."""
    try:
        blob = _dump_with(pickle.Pickler, obj, buffer_callback, persistent_id)
        if MAIN_MARK not in blob:
            return blob
    except Exception:
        pass
    from .._mainfn import _main_pickler

    reset()
    return _dump_with(_main_pickler(), obj, buffer_callback, persistent_id)


def _dump_with(
    base: type[pickle.Pickler],
    obj: Any,
    buffer_callback: Callable[[pickle.PickleBuffer], bool],
    persistent_id: Callable[[Any], Any] | None,
) -> bytes:
    if base is pickle.Pickler and persistent_id is None:  # the common case, in C
        return pickle.dumps(obj, _PROTOCOL, buffer_callback=buffer_callback)
    out = io.BytesIO()
    pickler = base(out, _PROTOCOL, buffer_callback=buffer_callback)
    if persistent_id is not None:
        # Only big bytes/bytearray become references; everything else (None:
        # pickled as usual) is unaffected.
        def pid(value: Any) -> Any:
            kind = type(value)
            if (kind is bytes or kind is bytearray) and len(value) >= OUT_OF_BAND_BYTES:
                return persistent_id(value)
            return None

        pickler.persistent_id = pid  # type: ignore[method-assign]
    pickler.dump(obj)
    return out.getvalue()


READ, COPY, OWN = mmap.ACCESS_READ, mmap.ACCESS_COPY, mmap.ACCESS_WRITE
"""How a receiver maps segments: read-only (arguments, by default),
copy-on-write (``writable_arguments=True``: writes stay in that worker), or
writable and shared (results: the caller is the segment's only user)."""


def map_fds(table: Table, fds: list[int], access: int) -> list[memoryview]:
    """Map received descriptors (READ, COPY or OWN); takes ownership of ``fds``.

    The mappings live as long as the views (and whatever unpickling builds
    on them); the descriptors are closed here, at once.
    """
    sizes = [nbytes for kind, nbytes in table if kind not in PIPED]
    try:
        return [_map(fd, nbytes, access) for nbytes, fd in zip(sizes, fds, strict=True)]
    finally:
        for fd in fds:
            os.close(fd)


def _map(fd: int, nbytes: int, access: int) -> memoryview:
    """Map ``fd`` without keeping a descriptor open (``mmap.mmap`` keeps a dup
    per mapping: a thousand live result arrays would exhaust the fd limit).

    The view keeps a ctypes array over the mapping alive; the mapping is
    unmapped when the last view (or array built on it) is gone.
    """
    libc = _libc()
    prot = mmap.PROT_READ if access == READ else mmap.PROT_READ | mmap.PROT_WRITE
    flags = mmap.MAP_PRIVATE if access == COPY else mmap.MAP_SHARED
    address = libc.mmap(None, nbytes, prot, flags, fd, 0)
    if address is None or address == _MAP_FAILED:
        error = ctypes.get_errno()
        raise OSError(error, f"mmap of a shared segment failed: {os.strerror(error)}")
    memory = (ctypes.c_ubyte * nbytes).from_address(address)
    weakref.finalize(memory, libc.munmap, address, nbytes)
    view = memoryview(memory).cast("B")
    return view.toreadonly() if access == READ else view


_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def unpack(inband: bytes, table: Table | None, views: list[Any], *, salvaging: bool = False) -> Any:
    """Rebuild a packed message from its in-band bytes and mapped buffers.

    ``salvaging``: read it with ``_wire``'s unpickler that puts a marker
    where a value fails to load, instead of raising (after a fast read failed).
    """
    in_band_buffers = (
        None
        if table is None
        else [view for view, (kind, _) in zip(views, table) if kind in _BUFFERS]
    )
    if salvaging:
        unpickler: Any = _SalvagingUnpickler(io.BytesIO(inband), buffers=in_band_buffers)
    elif table is None:
        return pickle.loads(inband)
    else:
        unpickler = _Unpickler(io.BytesIO(inband), buffers=in_band_buffers)
    unpickler.table, unpickler.views = table, views
    return unpickler.load()


class _Unpickler(pickle.Unpickler):
    """Rebuilds big bytes/bytearray from their segments (module level: a class
    made per call would sit in a reference cycle, keeping mappings alive
    until the garbage collector runs)."""

    table: Table
    views: list[Any]

    def persistent_load(self, pid: Any) -> Any:
        return _from_segment(self.table, self.views, pid)


class _SalvagingUnpickler(SalvagingUnpickler):
    """:class:`_Unpickler`'s segments, read by ``_wire``'s salvaging rules."""

    table: Table
    views: list[Any]

    def persistent_load(self, pid: Any) -> Any:
        return _from_segment(self.table, self.views, pid)


def _from_segment(table: Table, views: list[Any], pid: Any) -> bytes | bytearray:
    kind, view = table[pid][0], views[pid]
    if kind in PIPED:
        return view  # type: ignore[no-any-return]  # received as the object itself
    return bytes(view) if kind == BYTES else bytearray(view)

"""How a packed message's out-of-band buffers cross a worker's socket.

After the header, in the order of the message's table (see ``_shm.Table``):
the segments' descriptors, passed with ``SCM_RIGHTS`` in batches, then the
piped buffers as raw bytes with no framing (the table gives each size). The
receiver reads piped buffers with ``recv``/``recv_into`` and MSG_WAITALL,
straight into the memory of the object it returns; ``Connection.recv_bytes``
would copy each message three times (``os.read`` pieces, a BytesIO, the
result). Both ends use a duplicate of the Connection's socket, blocking, as
the Connection expects of the shared file.
"""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection
from typing import Any

from ._shm import PIPED, PIPED_BUFFER, PIPED_BYTES, READ, Packed, Segment, Table, map_fds

__all__ = [
    "MAX_FDS_PER_MESSAGE",
    "Received",
    "open_buffers",
    "receive_buffers",
    "receive_fds",
    "segment_count",
    "send_buffers",
    "send_fds",
]

MAX_FDS_PER_MESSAGE = 250
"""Descriptors per ``sendmsg`` (Linux refuses more than 253, SCM_MAX_FD)."""


def send_fds(conn: Connection, segments: list[Segment]) -> None:
    """Pass the segments' descriptors over ``conn`` (a Unix socket pair), in order."""
    with _socket(conn) as sock:
        for start in range(0, len(segments), MAX_FDS_PER_MESSAGE):
            batch = [segment.fd for segment in segments[start : start + MAX_FDS_PER_MESSAGE]]
            socket.send_fds(sock, [bytes([len(batch)])], batch)


def receive_fds(conn: Connection, count: int) -> list[int]:
    """Receive ``count`` descriptors sent by :func:`send_fds` (raises EOFError if cut)."""
    fds: list[int] = []
    with _socket(conn) as sock:
        while len(fds) < count:
            want = min(MAX_FDS_PER_MESSAGE, count - len(fds))
            data, received, _, _ = socket.recv_fds(sock, 1, want)
            fds.extend(received)
            if not data or len(received) != want:
                for fd in fds:
                    os.close(fd)
                raise EOFError("the peer went away while passing shared-memory segments")
    return fds


def segment_count(table: Table | None) -> int:
    """How many descriptors a message with this table passes."""
    return 0 if table is None else sum(1 for kind, _ in table if kind not in PIPED)


class Received:
    """Out-of-band buffers read from a pipe, not yet mapped (see :func:`open_buffers`)."""

    __slots__ = ("fds", "piped")

    def __init__(self, fds: list[int], piped: list[bytes | bytearray]) -> None:
        self.fds = fds
        """Segments' descriptors, owned until :func:`open_buffers` closes them."""
        self.piped = piped
        """Piped buffers, in the order of the table."""


def send_buffers(conn: Connection, packed: Packed) -> None:
    """Send ``packed``'s out-of-band buffers: descriptors, then piped buffers
    (raw bytes, no framing: the receiver knows their sizes from the table)."""
    if packed.segments:
        send_fds(conn, packed.segments)
    if packed.piped:
        with _socket(conn) as sock:
            for view in packed.piped:
                sock.sendall(view.cast("B") if view.format != "B" or view.ndim != 1 else view)


def receive_buffers(conn: Connection, table: Table) -> Received:
    """Receive what :func:`send_buffers` sent (raises EOFError/OSError if cut).

    Piped buffers are read by the kernel straight into the memory of the
    object returned (``recv``/``recv_into`` with MSG_WAITALL): no copy in
    this process, where ``Connection.recv_bytes`` makes three.
    """
    fds = receive_fds(conn, segment_count(table))
    piped: list[bytes | bytearray] = []
    if len(fds) == len(table):
        return Received(fds, piped)
    try:
        with _socket(conn) as sock:
            for kind, nbytes in table:
                if kind == PIPED_BYTES:
                    data = sock.recv(nbytes, socket.MSG_WAITALL)
                    if len(data) < nbytes:  # a signal or EOF cut the wait short
                        rest = bytearray(nbytes - len(data))
                        _recv_into(sock, memoryview(rest))
                        data += rest
                    piped.append(data)
                elif kind in PIPED:
                    buffer = bytearray(nbytes)
                    _recv_into(sock, memoryview(buffer))
                    piped.append(buffer)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Received(fds, piped)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        got = sock.recv_into(view, len(view), socket.MSG_WAITALL)
        if got == 0:
            raise EOFError("the peer went away while sending a buffer")
        view = view[got:]


def open_buffers(table: Table, received: Received, access: int) -> list[Any]:
    """Per entry of ``table``: a mapped segment (a memoryview, mapped with
    ``access``), or the piped object (PIPED_BUFFER: a memoryview of it,
    read-only when ``access`` is READ). Takes ownership of the descriptors."""
    mapped = iter(map_fds(table, received.fds, access))
    piped = iter(received.piped)
    views: list[Any] = []
    for kind, _ in table:
        if kind == PIPED_BUFFER:
            view = memoryview(next(piped))
            views.append(view.toreadonly() if access == READ else view)
        elif kind in PIPED:
            views.append(next(piped))
        else:
            views.append(next(mapped))
    return views


def _socket(conn: Connection) -> socket.socket:
    # A duplicate, so closing the socket object leaves the Connection's own
    # descriptor open; blocking, as Connection expects of the shared file.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(conn.fileno()))
    sock.setblocking(True)
    return sock

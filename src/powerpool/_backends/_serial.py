"""The serial backend: every chunk runs in the calling thread, at submission.

The baseline every other backend is measured against, and what ``auto`` picks
for work too small to pay any pool's overhead.
"""

from __future__ import annotations

import time
from typing import ClassVar

from .._chunk import IN_CALLER_WORKER, Chunk, ChunkResult, Measures
from .._errors import InitializerError
from .._probes import thread_blocks
from .._stop import CancelFlag, StopToken, running
from ._base import BackendConfig, Deliver
from ._itemloop import VALUES, chunk_entries, run_chunk

__all__ = ["SerialBackend"]


class SerialBackend:
    name: ClassVar[str] = "serial"
    # No hand-off at all; 10 ms chunks just keep progress and cancel responsive.
    chunk_target_s: ClassVar[float] = 0.01
    supports_timeout: ClassVar[bool] = False

    def __init__(self, config: BackendConfig, deliver: Deliver) -> None:
        self.workers = 1
        self._deliver = deliver
        self._flag = CancelFlag()
        self._init_error: BaseException | None = None
        if config.initializer is not None:
            try:
                config.initializer(*config.initargs)
            except Exception as exc:
                self._init_error = exc

    def submit(self, chunk: Chunk) -> None:
        if not chunk.claim():
            return
        if self._init_error is not None:
            error = InitializerError.wrap(self._init_error)
            self._deliver(ChunkResult.failed(chunk, error, IN_CALLER_WORKER))
            return
        # Blocks tell waiting from a preempted caller's thread (a loaded
        # machine), so a tiny function is not taken for I/O (auto's evidence).
        blocks_started = thread_blocks()
        cpu_started = time.thread_time()
        started = time.perf_counter()
        token = StopToken(self._flag, chunk.epoch)
        entries, convention = chunk_entries(chunk)
        with running(token):
            # in_caller: a KeyboardInterrupt here is the user's Ctrl-C, and stops the run.
            kind, results = run_chunk(chunk.fn, entries, convention, in_caller=True)
        busy_s = time.perf_counter() - started
        cpu_s = time.thread_time() - cpu_started
        blocks = -1 if blocks_started < 0 else thread_blocks() - blocks_started
        measures = Measures(cpu_s, False, blocks=blocks)
        values, outcomes = (results, None) if kind == VALUES else (None, results)
        self._deliver(
            ChunkResult(
                chunk,
                outcomes,
                IN_CALLER_WORKER,
                busy_s,
                values=values,
                started_s=started,
                measures=measures,
            )
        )

    def cancel(self, epoch: int) -> None:
        self._flag.value = max(self._flag.value, epoch)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        return None

"""The serial backend: every chunk runs in the calling thread, at submission.

The baseline every other backend is measured against, and what ``auto`` picks
for work too small to pay any pool's overhead.
"""

from __future__ import annotations

import time
from typing import ClassVar

from .._errors import InitializerError
from .._execute import run_items
from .._stop import CancelFlag, StopToken
from .._task import Chunk, ChunkResult, Outcome
from ._base import BackendConfig, Deliver

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
            outcomes: list[Outcome] = [(False, error)] * len(chunk)
            self._deliver(ChunkResult(chunk, outcomes, "serial", 0.0))
            return
        started = time.perf_counter()
        outcomes = run_items(chunk.fn, chunk, StopToken(self._flag, chunk.epoch))
        busy_s = time.perf_counter() - started
        self._deliver(ChunkResult.of(chunk, outcomes, "serial", busy_s, started))

    def cancel(self, epoch: int) -> None:
        self._flag.value = max(self._flag.value, epoch)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        return None

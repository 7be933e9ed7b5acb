"""The serial backend: every chunk runs in the calling thread, at submission.

The baseline every other backend is measured against, and what ``auto`` picks
for work too small to pay any pool's overhead.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, ClassVar

from .._errors import InitializerError
from .._execute import run_items
from .._stop import CancelFlag, StopToken, running
from .._task import IN_CALLER_WORKER, Chunk, ChunkResult, Measures, Outcome
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
            failed: list[Outcome] = [(False, error)] * len(chunk)
            self._deliver(ChunkResult(chunk, failed, IN_CALLER_WORKER, 0.0))
            return
        cpu_started = time.thread_time()
        started = time.perf_counter()
        token = StopToken(self._flag, chunk.epoch)
        values: list[Any] = []
        outcomes: list[Outcome] | None = None
        if chunk.kwargs is None:
            # The fast path for tiny items: the builtin map runs the calls in C.
            # On an error, ``values`` keeps the items before it (list.extend
            # appends as it goes), so no item runs twice.
            try:
                with running(token):
                    values.extend(
                        itertools.starmap(chunk.fn, chunk.args)
                        if chunk.star
                        else map(chunk.fn, chunk.args)
                    )
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                outcomes = self._finish_after_error(chunk, values, exc, token)
        else:
            outcomes = run_items(chunk.fn, chunk, token)
        busy_s = time.perf_counter() - started
        measures = Measures(time.thread_time() - cpu_started, False)
        if outcomes is None:
            self._deliver(
                ChunkResult(
                    chunk,
                    None,
                    IN_CALLER_WORKER,
                    busy_s,
                    values=values,
                    started_s=started,
                    measures=measures,
                )
            )
        else:
            self._deliver(
                ChunkResult.of(chunk, outcomes, IN_CALLER_WORKER, busy_s, started, measures)
            )

    @staticmethod
    def _finish_after_error(
        chunk: Chunk, values: list[Any], exc: BaseException, token: StopToken
    ) -> list[Outcome]:
        """Outcomes when item ``len(values)`` raised: the rest run one by one after it."""
        outcomes: list[Outcome] = [(True, value) for value in values]
        outcomes.append((False, exc))
        done = len(outcomes)
        rest = Chunk(chunk.id, chunk.fn, star=chunk.star)
        rest.args = chunk.args[done:]
        rest.indices = range(len(rest.args))
        return run_items(chunk.fn, rest, token, outcomes=outcomes)

    def cancel(self, epoch: int) -> None:
        self._flag.value = max(self._flag.value, epoch)

    def shutdown(self, *, wait: bool = True, kill: bool = False) -> None:
        return None

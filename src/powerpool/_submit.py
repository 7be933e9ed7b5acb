"""``Pool.submit``: one call as a one-item chunk, retried by the pool's policy.

A submitted call skips the run machinery (no window, no chunk sizing, no
order to keep): it becomes a chunk of one item on the backend the pool
chose, and its ``Future`` is settled from that chunk's result. A failure
the retry policy accepts sends the item again, on the same backend, unless
the future was cancelled meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ._chunk import Chunk, ChunkResult, Item, ItemLost
from ._run import Attempts

if TYPE_CHECKING:
    from ._backends import Backend
    from ._ledger import StatsLedger
    from ._recorder import Recorder
    from ._run import RunOptions

__all__ = ["Submitter"]


class Submitter:
    """Sends a pool's single calls to its backends and settles their futures."""

    def __init__(
        self,
        ledger: StatsLedger,
        defaults: RunOptions,
        new_chunk_id: Callable[[], int],
        recorder: Callable[[], Recorder] | None,
    ) -> None:
        self._ledger = ledger
        self._defaults = defaults
        self._new_chunk_id = new_chunk_id
        self._recorder = recorder  # the pool's recorder (Pool(report=...)), made on first use
        self.recorded = False
        """Whether a future went into the pool's report since it was last written."""

    def start(
        self,
        backend: Backend,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: Future[Any],
        epoch: int,
    ) -> None:
        """Run ``fn(*args, **kwargs)`` on ``backend`` for ``future`` (cancel epoch ``epoch``)."""
        item: Item = (0, args, kwargs)
        claim = future.set_running_or_notify_cancel
        self._send(backend, fn, item, future, epoch, Attempts(), claim)

    def _send(
        self,
        backend: Backend,
        fn: Callable[..., Any],
        item: Item,
        future: Future[Any],
        epoch: int,
        attempts: Attempts,
        claim: Callable[[], bool],
    ) -> None:
        recorder = self._recorder() if self._recorder is not None else None

        def on_done(result: ChunkResult) -> None:
            self._ledger.chunk(result.worker, result.busy_s)
            if recorder is not None:  # futures go in the pool's report (written at shutdown)
                self.recorded = True
                from ._recorder import failed_items

                recorder.chunk(result, failed_items(result), kind="future")
            ok, value = result.outcomes[0]
            if ok:
                self._ledger.items(done=1)
                future.set_result(value)
                return
            error = attempts.after(value, self._defaults)
            if error is None:
                if not isinstance(value, ItemLost):
                    self._ledger.items(retried=1)
                    if recorder is not None:
                        recorder.event("retry", worker=result.worker, detail=repr(value)[:200])
                again = _not_cancelled(future)
                self._send(backend, fn, item, future, epoch, attempts, again)
                return
            self._ledger.items(failed=1)
            future.set_exception(error)

        chunk = Chunk(
            id=self._new_chunk_id(),
            fn=fn,
            items=[item],
            timeout_s=self._defaults.timeout_s,
            epoch=epoch,
            claim=claim,
            on_done=on_done,
        )
        chunk.recorder = recorder
        backend.submit(chunk)


def _not_cancelled(future: Future[Any]) -> Callable[[], bool]:
    return lambda: not future.done()

"""Progress bars counting items (not chunks), with rate and ETA.

tqdm is imported only when a bar is actually shown.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

__all__ = ["AUTO_DELAY_S", "Progress", "ProgressMode"]

ProgressMode = bool | Literal["auto"]

AUTO_DELAY_S = 2.0
"""With progress="auto" a bar appears only once a run has lasted this long:
short runs stay quiet, long ones show they are alive."""


class Progress:
    """A bar over a run; a no-op when disabled."""

    def __init__(self, mode: ProgressMode, *, total: int | None, desc: str) -> None:
        self._bar: Any = None
        if mode is False:
            return
        if mode == "auto" and not sys.stderr.isatty():
            return
        from tqdm.auto import tqdm

        class _Bar(tqdm):  # type: ignore[misc]
            # tqdm's monitor thread lives as long as the process and exists to
            # unstick bars updated too rarely; ours update once per chunk.
            monitor_interval = 0

        self._bar = _Bar(
            total=total,
            desc=desc,
            unit="item",
            delay=AUTO_DELAY_S if mode == "auto" else 0.0,
            dynamic_ncols=True,
            leave=True,
        )
        self._failed = 0

    def update(self, done: int, failed: int = 0) -> None:
        if self._bar is None:
            return
        if failed:
            self._failed += failed
            self._bar.set_postfix(failed=self._failed, refresh=False)
        self._bar.update(done + failed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

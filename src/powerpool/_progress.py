"""Progress bars counting items (not chunks), with rate and ETA.

tqdm is imported only when a bar is actually shown.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

__all__ = ["AUTO_DELAY_S", "Progress", "ProgressMode", "tqdm_class"]

ProgressMode = bool | Literal["auto"]

AUTO_DELAY_S = 2.0
"""With progress="auto" a bar appears only once a run has lasted this long:
short runs stay quiet, long ones show they are alive."""


def tqdm_class() -> Any:
    """tqdm's widget bar in a notebook that has ipywidgets, its text bar everywhere else.

    ``tqdm.auto`` picks the widget bar in any notebook and, when ipywidgets is
    missing, falls back to text only after a TqdmWarning (an error under
    ``-W error``); checking first gives the same bar without the warning.
    """
    if _in_notebook():
        import importlib.util  # here, not at the top: it keeps import powerpool fast

        if importlib.util.find_spec("ipywidgets") is not None:
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
    from tqdm.std import tqdm

    return tqdm


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (IPython is only looked at if already loaded)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:
        return False


class Progress:
    """A bar over a run; a no-op when disabled."""

    def __init__(self, mode: ProgressMode, *, total: int | None, desc: str) -> None:
        self._bar: Any = None
        if mode is False:
            return
        if mode == "auto" and not sys.stderr.isatty():
            return
        tqdm = tqdm_class()

        class _Bar(tqdm):  # type: ignore[misc,valid-type]
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

"""Backend registry: each backend lives in its own module, imported on first use.

``import powerpool`` imports none of them, so ``distributed`` (dask) or
``asyncio`` machinery cost nothing until asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .._errors import BackendUnavailableError
from ._base import Backend, BackendConfig, Deliver

if TYPE_CHECKING:
    from .._options import WorkerBackendName

__all__ = ["BACKENDS", "Backend", "BackendConfig", "Deliver", "load"]

BACKENDS: dict[WorkerBackendName, str] = {
    "serial": "._serial:SerialBackend",
    "threads": "._threads:ThreadBackend",
    "asyncio": "._asyncio:AsyncioBackend",
    "processes": "._processes:ProcessBackend",
    "dask": "._dask:DaskBackend",
}
"""Name -> "module:class" (module relative to this package); the names are
checked against ``_options.WorkerBackendName``, where they are written."""


def load(name: str) -> type[Backend]:
    """Import and return the backend class registered under ``name``."""
    try:
        target = BACKENDS[name]  # type: ignore[index]  # a str from a caller; KeyError below
    except KeyError:
        known = ", ".join(sorted([*BACKENDS, "auto"]))
        raise ValueError(f"unknown backend {name!r}; choose one of: {known}") from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name, __name__)
    except ImportError as exc:
        if isinstance(exc, BackendUnavailableError):
            raise
        raise BackendUnavailableError(f"backend {name!r} could not be imported: {exc}") from exc
    cls: type[Backend] = getattr(module, class_name)
    return cls

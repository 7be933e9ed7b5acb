"""powerpool: use all of your computer from Python, then a cluster's, without guessing.

The public names are re-exported here; everything else is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._errors import (
    BackendUnavailableError,
    CheckpointMismatchError,
    InitializerError,
    ItemTimeoutError,
    PoolClosedError,
    PowerpoolError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashedError,
    WorkerError,
)
from ._pool import Pool, PoolState
from ._stop import should_stop
from ._warm_pools import imap, imap_unordered, map, shutdown_warm_pools

if _TYPE_CHECKING:
    from ._aio import aimap, amap
    from ._executor import Executor
    from ._plan import Plan, plan
    from ._profile import Profile, Workload, profile
    from ._recorder import RunReport
    from ._stats import PoolStats

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CheckpointMismatchError",
    "Executor",
    "InitializerError",
    "ItemTimeoutError",
    "Plan",
    "Pool",
    "PoolClosedError",
    "PoolState",
    "PoolStats",
    "PowerpoolError",
    "Profile",
    "RemoteTraceback",
    "RunReport",
    "SerializationError",
    "WorkerCrashedError",
    "WorkerError",
    "Workload",
    "aimap",
    "amap",
    "imap",
    "imap_unordered",
    "map",
    "plan",
    "profile",
    "should_stop",
    "shutdown_warm_pools",
]


def _show_as_public(obj: _Any) -> None:
    # Tracebacks, reprs and docs say ``powerpool.Pool``, not the private module
    # it lives in (trio's fixup_module_metadata). Pickle finds each class here.
    if isinstance(obj, type) and obj.__module__.startswith(__name__ + "."):
        obj.__module__ = __name__


for _name in __all__:
    if _name in globals():
        _show_as_public(globals()[_name])
del _name

_LAZY = {
    "Executor": "._executor",
    "Plan": "._plan",
    "Profile": "._profile",
    "PoolStats": "._stats",
    "RunReport": "._recorder",
    "Workload": "._profile",
    "aimap": "._aio",
    "amap": "._aio",
    "plan": "._plan",
    "profile": "._profile",
}


def __getattr__(name: str) -> _Any:
    # The profiler pulls in more of the standard library than most runs need,
    # the run recorder is only for runs asked to report, the asyncio face and
    # the Executor only for code that uses them, PoolStats only for code that
    # asks for statistics (a dataclass: 1-2 ms to create): import them on first
    # use (the pattern of concurrent.futures' __init__). It keeps import
    # powerpool fast.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'powerpool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    _show_as_public(value)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

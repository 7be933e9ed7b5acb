"""Imported only in multiprocessing's fork server, which powerpool asks to preload it.

Every worker the server forks then starts with powerpool's worker loop
already imported (measured: 2-worker pool start 0.09 s -> 0.02 s), and never
runs the user's script again (see :mod:`powerpool._mainfn`).
"""

from __future__ import annotations

# sharedctypes (ctypes): every worker unpickles its status array with it,
# 60-150 ms per worker on a loaded 2-core machine when the server lacks it.
import multiprocessing.sharedctypes  # noqa: F401 - imported for the workers it forks

from .._mainfn import keep_workers_off_the_script
from . import _native_threads, _worker  # noqa: F401 - _worker: imported for the workers

keep_workers_off_the_script()
_native_threads.prepare()  # threadpoolctl's scan once here, not in each worker

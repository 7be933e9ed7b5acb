"""Imported only in multiprocessing's fork server, which powerpool asks to preload it.

Every worker the server forks then starts with powerpool's worker loop
already imported (measured: 2-worker pool start 0.09 s -> 0.02 s), and never
runs the user's script again (see :mod:`powerpool._mainfn`).
"""

from __future__ import annotations

from .._mainfn import keep_workers_off_the_script
from . import _worker  # noqa: F401 - imported for the workers it forks

keep_workers_off_the_script()

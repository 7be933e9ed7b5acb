"""Shared fixtures: every test is checked for leaked threads and processes.

``backend`` is the one fixture parametrized over the sync backends; each
test that takes it runs once per backend, and its teardown (the autouse
``no_leaks``) asserts that the pool shut down promptly and left nothing
running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

import powerpool
from dask_cluster import (  # noqa: F401  (session fixtures: a real dask cluster)
    DaskTestCluster,
    dask_cluster,
    dask_helper_threads,
)

# distributed (through tblib) registers a pickler in copyreg for every exception
# class that exists when it is first imported. Imported here, before any test
# module defines its exception classes, so those always pickle the plain way,
# whichever test happens to import distributed first (test_faults' "fails to
# unpickle" helpers depend on it).
with contextlib.suppress(ImportError):
    import distributed  # noqa: F401

SYNC_BACKENDS = ["serial", "threads", "processes"]
PARALLEL_BACKENDS = ["threads", "processes"]

LEAK_GRACE_S = 10.0
"""How long teardown waits for workers to exit before calling them leaked
(generous: a loaded 2-core CI machine can be slow to reap)."""

# Long-lived helpers that multiprocessing itself starts once per session.
# Matched on their own command lines: a worker forked *from* the fork server
# inherits pytest's command line, so it is still caught as a leak.
_HELPER_MARKERS = (
    "from multiprocessing.forkserver import main",
    "resource_tracker import main",  # multiprocessing's, and loky's (joblib)
)


def _children() -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(marker in cmdline for marker in _HELPER_MARKERS):
            continue
        found[child.pid] = child
    return found


@pytest.fixture(scope="session")
def cluster_if_installed(request: pytest.FixtureRequest) -> DaskTestCluster | None:
    """The session's dask cluster, or None without distributed. Take it as a
    test's argument (not through ``getfixturevalue`` in the body): session
    fixtures are set up before the leak check counts processes and threads."""
    if importlib.util.find_spec("distributed") is None:
        return None
    request.getfixturevalue("dask_helper_threads")
    cluster: DaskTestCluster = request.getfixturevalue("dask_cluster")
    return cluster


@pytest.fixture(autouse=True)
def cold_auto() -> None:
    """Every test starts auto cold: no decision remembered from another test's function."""
    from powerpool._speculate import forget

    forget()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves threads or processes of its own running."""
    threads_before = set(threading.enumerate())
    children_before = set(_children())
    yield
    powerpool.shutdown_warm_pools()
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = [p for pid, p in _children().items() if pid not in children_before]
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            for child in children:  # don't let one leak poison the next tests
                child.kill()
            pytest.fail(
                f"leaked threads: {[t.name for t in threads]}; "
                f"leaked processes: {[(p.pid, p.name()) for p in children]}"
            )
        time.sleep(0.05)


@pytest.fixture(params=SYNC_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each sync backend in turn."""
    name: str = request.param
    return name


@pytest.fixture(params=PARALLEL_BACKENDS)
def parallel_backend(request: pytest.FixtureRequest) -> str:
    """The backends that run items beside the caller (threads, processes)."""
    name: str = request.param
    return name

"""A real dask cluster on loopback for the tests: one scheduler, two workers.

Started once per test session as subprocesses of the venv's ``dask`` command::

    dask scheduler --host 127.0.0.1 --port 0 --scheduler-file F --no-dashboard
    dask worker --scheduler-file F --nworkers 2 --nthreads 1 --no-dashboard

and stopped by pid at the end (SIGTERM, SIGKILL after a grace period, then
wait), together with any worker process the nannies left behind; the
temporary directory (scheduler file, logs, worker scratch space) is removed.
On Linux they also get SIGTERM from the kernel if pytest itself is killed.

To run the tests against a cluster you started yourself, point
``POWERPOOL_DASK_SCHEDULER_FILE`` at its scheduler file. Its workers must be
able to import powerpool and the test module (start them with
``PYTHONPATH=tests``), and it needs at least two single-threaded workers; it
is left running afterwards.

Register the fixtures in ``tests/conftest.py`` with::

    from dask_cluster import dask_cluster, dask_helper_threads  # noqa: F401
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "ENV_VAR",
    "DaskTestCluster",
    "dask_cluster",
    "dask_helper_threads",
    "session_cluster_pids",
    "wait_until",
]

ENV_VAR = "POWERPOOL_DASK_SCHEDULER_FILE"
"""Use the already running cluster whose scheduler file this names."""

N_WORKERS = 2
START_TIMEOUT_S = 60.0
# Bounded wait for the scheduler file and both workers. Each worker process
# is spawned and imports distributed and numpy: about 2 s on an idle 2-core
# machine, far more when the machine is shared, hence the wide margin.
STOP_GRACE_S = 10.0
# SIGTERM lets the nannies close their workers cleanly; after this we SIGKILL.

_session_roots: list[int] = []
"""Pids of the ``dask scheduler`` and ``dask worker`` commands while the cluster runs."""

_TESTS_DIR = Path(__file__).resolve().parent
_SRC_DIR = _TESTS_DIR.parent / "src"


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class DaskTestCluster:
    """A running scheduler and its workers, with a client for inspecting them."""

    scheduler_file: str
    """Path of the scheduler's JSON file (``scheduler_file=`` option)."""
    address: str
    """Scheduler address, e.g. ``tcp://127.0.0.1:40321`` (``address=`` option)."""
    client: Any
    """A ``distributed.Client`` owned by the fixture; tests may use it, not close it."""
    n_workers: int = N_WORKERS
    """Workers the tests may count on."""

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid of the process running its tasks."""
        pids: dict[str, int] = self.client.run(os.getpid)
        return pids

    def wait_for_workers(self, n: int = N_WORKERS, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until ``n`` workers are connected (e.g. after a test killed one)."""
        self.client.wait_for_workers(n, timeout=timeout_s)

    def scheduler_keys(self, contains: str) -> list[str]:
        """Keys of tasks the scheduler still knows about whose name contains ``contains``."""

        def keys(dask_scheduler: Any) -> list[str]:
            return sorted(str(k) for k in dask_scheduler.tasks if contains in str(k))

        found: list[str] = self.client.run_on_scheduler(keys)
        return found


def session_cluster_pids() -> set[int]:
    """Pids of the session cluster's processes (nanny-started workers included).

    They are children of the pytest process, so a check that lists or kills
    "every child of this process" must leave these alone (an empty set when
    the cluster is not running).
    """
    import psutil

    pids: set[int] = set()
    for root in _session_roots:
        with contextlib.suppress(psutil.Error):
            pids.add(root)
            pids.update(p.pid for p in psutil.Process(root).children(recursive=True))
    return pids


def _dask_command() -> str:
    exe = Path(sys.executable).parent / "dask"
    if not exe.exists():
        pytest.skip(f"no dask command next to {sys.executable}")
    return str(exe)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` and its children by pid; kill what outlives the grace period."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_GRACE_S)
    _, alive = psutil.wait_procs(children, timeout=STOP_GRACE_S)
    for child in alive:  # orphans of a nanny that did not get to close them
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=STOP_GRACE_S)


def _die_with_parent() -> None:
    """Runs in the child before exec: on Linux, SIGTERM it when pytest dies.

    Teardown stops the cluster in a normal run; this covers a pytest killed
    by a CI timeout or SIGKILL, which would otherwise leave the scheduler and
    workers running forever. (``dask worker`` passes SIGTERM on to its
    nannies, which close their worker processes.)
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start(tmp: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    dask = _dask_command()
    scheduler_file = tmp / "scheduler.json"
    env = dict(os.environ)
    # Workers unpickle the tests' helper functions by reference: they must
    # import the test modules (and powerpool, if it is not installed).
    paths = [str(_TESTS_DIR), str(_SRC_DIR), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    # Every dask server (the scheduler too) makes a scratch directory under
    # this; inside our temp dir it goes away with it.
    env["DASK_TEMPORARY_DIRECTORY"] = str(tmp)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [dask, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp,
                # One prctl() call, no locks taken: safe despite pytest's threads.
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        procs.append(proc)
        _session_roots.append(proc.pid)
        return proc

    try:
        scheduler = spawn(
            [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--scheduler-file",
                str(scheduler_file),
                "--no-dashboard",
            ],
            tmp / "scheduler.log",
        )

        def scheduler_ready() -> bool:
            if scheduler.poll() is not None:
                pytest.fail(f"dask scheduler exited:\n{_log_tail(tmp / 'scheduler.log')}")
            try:
                return bool(json.loads(scheduler_file.read_text())["address"])
            except (OSError, ValueError, KeyError):
                return False

        wait_until(scheduler_ready, START_TIMEOUT_S, "the dask scheduler file")
        address = str(json.loads(scheduler_file.read_text())["address"])
        spawn(
            [
                "worker",
                "--scheduler-file",
                str(scheduler_file),
                "--nworkers",
                str(N_WORKERS),
                "--nthreads",
                "1",
                "--no-dashboard",
            ],
            tmp / "workers.log",
        )
    except BaseException:
        for proc in reversed(procs):
            _stop(proc)
        _session_roots.clear()
        raise
    return address, procs


@pytest.fixture(scope="session")
def dask_helper_threads() -> None:
    """Start distributed's process-wide helper thread before any test counts threads.

    distributed runs one "Dask-Offload" thread per process, started on first
    use and kept for the life of the process (like multiprocessing's
    resource tracker). Starting it here keeps a leak check from blaming
    whichever test happened to use it first.
    """
    utils = pytest.importorskip("distributed.utils")
    executor = getattr(utils, "_offload_executor", None)  # private; absent in some versions
    if executor is not None:
        executor.submit(int).result(timeout=START_TIMEOUT_S)


@pytest.fixture(scope="session")
def dask_cluster(dask_helper_threads: None) -> Iterator[DaskTestCluster]:
    """A scheduler and two single-threaded worker processes on 127.0.0.1."""
    distributed = pytest.importorskip("distributed")
    external = os.environ.get(ENV_VAR)
    tmp = Path(tempfile.mkdtemp(prefix="powerpool-dask-"))
    procs: list[subprocess.Popen[bytes]] = []
    client: Any = None
    try:
        if external:
            scheduler_file = external
            address = str(json.loads(Path(external).read_text())["address"])
        else:
            scheduler_file = str(tmp / "scheduler.json")
            address, procs = _start(tmp)
        client = distributed.Client(address, set_as_default=False, timeout=START_TIMEOUT_S)
        try:
            client.wait_for_workers(N_WORKERS, timeout=START_TIMEOUT_S)
        except TimeoutError:
            pytest.fail(f"dask workers did not connect:\n{_log_tail(tmp / 'workers.log')}")
        yield DaskTestCluster(scheduler_file, address, client)
    finally:
        if client is not None:
            client.close()
        for proc in reversed(procs):  # workers first, then the scheduler
            _stop(proc)
        _session_roots.clear()
        shutil.rmtree(tmp, ignore_errors=True)

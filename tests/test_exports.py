"""The public face: ``__all__`` is exactly the public namespace, and importing is cheap.

(httpx's ``tests/test_exported_members.py`` is the model.)
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import pytest

import powerpool

pytestmark = pytest.mark.timeout(60)

LAZY = ("Plan", "Profile", "RunReport", "Workload", "plan", "profile")
"""Names ``powerpool.__getattr__`` imports on first use."""

HEAVY_MODULES = (
    "asyncio",
    "cProfile",
    "cloudpickle",
    "dask",
    "distributed",
    "matplotlib",
    "numpy",
    "pstats",
    "psutil",
    "tqdm",
    "powerpool._recorder",
)
"""Modules ``import powerpool`` must not pull in: each costs milliseconds to tens
of milliseconds, and only some runs need it (the recorder: runs with ``report=``)."""

IMPORT_BUDGET_S = 1.0


def _public(names: list[str]) -> set[str]:
    return {
        name
        for name in names
        if not name.startswith("_")
        and name != "annotations"
        and not isinstance(getattr(powerpool, name, None), types.ModuleType)
    }


def test_all_is_sorted_and_unique() -> None:
    assert powerpool.__all__ == sorted(powerpool.__all__)
    assert len(set(powerpool.__all__)) == len(powerpool.__all__)


def test_all_matches_dir() -> None:
    assert set(powerpool.__all__) == _public(dir(powerpool))


def test_all_matches_the_module_namespace() -> None:
    # dir() is defined from __all__, so check the namespace itself too: a name
    # imported into __init__ without being exported (or a typing helper left
    # public) shows up here. The lazy names appear once they have been used.
    namespace = _public(list(vars(powerpool))) | set(LAZY)
    assert set(powerpool.__all__) == namespace


def test_every_exported_name_resolves() -> None:
    missing = [m for m in ("powerpool._plan", "powerpool._profile") if not _exists(m)]
    if missing:
        pytest.skip(f"the profile/plan helper has not written {', '.join(missing)} yet")
    for name in powerpool.__all__:
        assert getattr(powerpool, name) is not None, name


def test_eager_names_resolve() -> None:
    for name in powerpool.__all__:
        if name not in LAZY:
            assert getattr(powerpool, name) is not None, name


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        powerpool.no_such_thing  # noqa: B018 - the access is the test


def test_errors_inherit_what_people_already_catch() -> None:
    from concurrent.futures import BrokenExecutor

    assert issubclass(powerpool.PoolClosedError, RuntimeError)
    assert issubclass(powerpool.ItemTimeoutError, TimeoutError)
    assert issubclass(powerpool.WorkerCrashedError, BrokenExecutor)
    assert issubclass(powerpool.InitializerError, powerpool.WorkerError)
    assert issubclass(powerpool.BackendUnavailableError, ImportError)
    assert issubclass(powerpool.CheckpointMismatchError, ValueError)
    for name in powerpool.__all__:
        obj = getattr(powerpool, name) if name not in LAZY else None
        if isinstance(obj, type) and issubclass(obj, Exception) and name.endswith("Error"):
            assert issubclass(obj, powerpool.PowerpoolError), name


def test_import_is_fast_and_light() -> None:
    code = (
        "import json, sys, time\n"
        "started = time.perf_counter()\n"
        "import powerpool\n"
        "elapsed = time.perf_counter() - started\n"
        f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "print(json.dumps({'elapsed': elapsed, 'heavy': heavy}))\n"
    )
    best = None
    for _ in range(3):  # a loaded machine can stall one start; take the best of three
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
        )
        report = json.loads(out.stdout)
        assert report["heavy"] == [], f"import powerpool imported {report['heavy']}"
        best = report["elapsed"] if best is None else min(best, report["elapsed"])
    assert best is not None
    assert best < IMPORT_BUDGET_S


def _exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_the_recorder_loads_only_for_a_report() -> None:
    """A run without ``report=`` never imports the recorder (its dataclasses cost
    ~7 ms of every cold start); one with it does."""
    code = (
        "import sys\n"
        "import powerpool as pp\n"
        "pp.map(abs, range(4), backend='processes')\n"
        "before = 'powerpool._recorder' in sys.modules\n"
        "pp.map(abs, range(4), backend='processes', report=True)\n"
        "print(before, 'powerpool._recorder' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr

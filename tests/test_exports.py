"""The public face: ``__all__`` is exactly the public namespace, and importing is cheap.

(httpx's ``tests/test_exported_members.py`` is the model.)
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import powerpool

pytestmark = pytest.mark.timeout(60)

LAZY = ("Executor", "Plan", "Profile", "RunReport", "Workload", "aimap", "amap", "plan", "profile")
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
    "hashlib",
    "multiprocessing.forkserver",
    "powerpool._aio",
    "powerpool._executor",
    "powerpool._profile",
    "powerpool._recorder",
)
"""Modules ``import powerpool`` must not pull in: each costs milliseconds to tens
of milliseconds, and only some runs need it (the recorder: runs with ``report=``;
the asyncio face and the Executor: code that uses them)."""

COLD_MAP_SPARES = (
    "asyncio",
    "hashlib",
    "powerpool._aio",
    "powerpool._executor",
    "powerpool._profile.measure",
    "powerpool._recorder",
)
"""Modules a script's first ``pp.map`` (auto) must not load in the caller."""


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


def test_import_is_light() -> None:
    """``import powerpool`` loads none of the heavy optional modules. (What it
    costs in milliseconds is measured by benchmarks/importcost.py, not here: a
    test must pass on any machine, however slow or loaded.)"""
    code = (
        "import json, sys\n"
        "import powerpool\n"
        f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == [], f"import powerpool imported {out.stdout}"


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


def _fresh(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; its stdout, split into words."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.split()


def test_the_lazy_names_load_their_modules_on_first_use() -> None:
    code = (
        "import sys\n"
        "import powerpool\n"
        "print('powerpool._aio' in sys.modules, 'powerpool._executor' in sys.modules)\n"
        "powerpool.amap, powerpool.Executor\n"
        "print('powerpool._aio' in sys.modules, 'powerpool._executor' in sys.modules)\n"
        "print(powerpool.Executor.__module__)\n"
    )
    assert _fresh(code) == ["False", "False", "True", "True", "powerpool"]


def test_the_planner_loads_without_the_profiler() -> None:
    """auto loads the planner mid-run (while the workers start): the profiler's
    records come with it, the profiler itself (sampling, cProfile hot spots)
    only when ``pp.profile`` is used."""
    code = (
        "import sys\n"
        "import powerpool._decide, powerpool._plan\n"
        "print('powerpool._profile.measure' in sys.modules)\n"
        "from powerpool._profile import profile, profile_calls\n"
        "print('powerpool._profile.measure' in sys.modules)\n"
        "print(profile.__name__, profile_calls.__name__)\n"
    )
    assert _fresh(code) == ["False", "True", "profile", "profile_calls"]


def test_the_process_engine_loads_cloudpickle_before_its_workers_start() -> None:
    """Workers forked after the engine loaded inherit cloudpickle (a script's
    functions travel by value), instead of each importing it to load its
    first function; the engine's digests do not load hashlib's OpenSSL."""
    code = (
        "import sys\n"
        "import powerpool._backends._processes\n"
        "print('cloudpickle' in sys.modules, 'hashlib' in sys.modules)\n"
    )
    assert _fresh(code) == ["True", "False"]


def _after_a_cold_map(tmp_path: Path, then: str) -> list[str]:
    """Run a script whose first ``pp.map`` (auto) squares 8 numbers, then ``then``
    (lines indented for the script's main block); its stdout lines."""
    script = tmp_path / "cold_map.py"
    script.write_text(
        "import dataclasses, sys\n"
        "import powerpool as pp\n"
        "\n"
        "def square(x):\n"
        "    return x * x\n"
        "\n"
        "if __name__ == '__main__':\n"
        "    assert pp.map(square, range(8)) == [x * x for x in range(8)]\n"
        "    pp.shutdown_warm_pools()\n" + then
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.splitlines()


def test_a_cold_map_leaves_the_heavy_modules_alone(tmp_path: Path) -> None:
    """A script's first ``pp.map`` (auto: the process engine, then the planner)
    loads neither hashlib nor the profiler, the asyncio face nor the Executor."""
    printed = _after_a_cold_map(
        tmp_path,
        f"    heavy = {COLD_MAP_SPARES!r}\n"
        "    print(sorted(m for m in heavy if m in sys.modules))\n",
    )
    assert printed == ["[]"]


def test_a_cold_map_creates_no_dataclass(tmp_path: Path) -> None:
    """The records a cold ``pp.map`` builds are named tuples or slotted classes:
    creating a dataclass costs 1-2 ms (see "Records" in docs/architecture.md).
    The user-facing ones (``PoolStats``, ``Plan``) load when first asked for."""
    printed = _after_a_cold_map(
        tmp_path,
        "    made = sorted(\n"
        "        f'{name}.{attr}'\n"
        "        for name, module in list(sys.modules.items()) if name.startswith('powerpool')\n"
        "        for attr, obj in vars(module).items()\n"
        "        if isinstance(obj, type) and dataclasses.is_dataclass(obj)\n"
        "        and obj.__module__ == name\n"
        "    )\n"
        "    print(made)\n"
        "    with pp.Pool() as pool:\n"
        "        stats = pool.stats()\n"
        "    print(type(stats).__name__, 'powerpool._stats' in sys.modules)\n",
    )
    assert printed == ["[]", "PoolStats True"]

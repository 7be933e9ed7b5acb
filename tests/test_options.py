"""Options are typed: a type checker catches a misspelt option or backend before a run.

The same names drive the run-time checks, for callers without a type checker.
"""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import powerpool as pp
from powerpool import _options
from powerpool._backends import BACKENDS

pytestmark = pytest.mark.timeout(300)

USER_FILE = """\
import asyncio
import powerpool as pp


def double(x: int) -> int:
    return x * 2


async def text(x: int) -> str:
    return str(x)


xs = [1, 2, 3]
pp.map(double, xs, chunk_size=3)  # E1
pp.map(double, xs, backend="procesess")  # E2
pp.map(double, xs, report="run.html", progress=True)
pp.map(double, xs, explain=True)
pp.imap(double, xs, explain=True, max_inflight_bytes=2**20)
pp.Pool("processes", max_tasks_per_child=10).map(double, xs, explain=True)
pp.Pool().map(double, xs, retires=2)  # E3
pp.Pool(backend="procesess")  # E4
pp.Pool().submit(double, "one")  # E5
pp.Executor(backend="threads").submit(double, 1, 2)  # E6
done: list[int] = pp.map(double, xs, backend="processes", chunksize=3, retries=2, timeout=1.5)
with pp.Pool("threads", workers=2, progress=False, explain=True) as pool:
    number: int = pool.submit(double, 1).result()
    word: str = pool.submit(text, 1).result()
    pool.imap_unordered(double, xs, with_index=True, errors="skip")
with pp.Executor(4, backend="dask", address="tcp://h:8786") as ex:
    other: int = ex.submit(double, 1).result()
asyncio.run(pp.amap(double, xs, workers=3, errors="return"))
"""

EXPECTED = {
    "E1": 'Unexpected keyword argument "chunk_size" for "map"',
    "E2": 'Argument "backend" to "map" has incompatible type "Literal[\'procesess\']"',
    "E3": 'Unexpected keyword argument "retires" for "map" of "Pool"',
    "E4": 'Argument "backend" to "Pool" has incompatible type',
    "E5": 'No overload variant of "submit" of "Pool"',
    "E6": 'No overload variant of "submit" of "Executor"',
}


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy_strict_flags_misspelt_options_and_backends(tmp_path: Path) -> None:
    user = tmp_path / "user.py"
    user.write_text(USER_FILE)
    src = Path(pp.__file__).resolve().parent.parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",  # powerpool's own errors are not the user's
            "--no-error-summary",
            f"--cache-dir={tmp_path / 'cache'}",
            str(user),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,  # mypy exits 1 when it finds the errors this test expects
        cwd=tmp_path,
        env={"MYPYPATH": str(src), "PATH": "/usr/bin:/bin"},
    )
    errors = [line for line in proc.stdout.splitlines() if ": error: " in line]
    lines = USER_FILE.splitlines()
    got = {}
    for error in errors:
        number = int(error.split(":")[1])
        marker = lines[number - 1].rpartition("# ")[2]
        assert marker in EXPECTED, f"unexpected error on a correct line: {error}"
        got[marker] = error
    for marker, message in EXPECTED.items():
        assert marker in got, f"mypy missed {marker}: {message}\n{proc.stdout}{proc.stderr}"
        assert message in got[marker]


def test_backend_names_are_written_once() -> None:
    assert set(BACKENDS) == set(_options.WORKER_BACKEND_NAMES)
    assert ("auto", *_options.WORKER_BACKEND_NAMES) == _options.BACKEND_NAMES


def test_option_records_nest() -> None:
    assert _options.RUN_OPTION_NAMES < _options.MAP_OPTION_NAMES == _options.POOL_OPTION_NAMES
    assert _options.DASK_OPTION_NAMES < _options.MAP_OPTION_NAMES
    assert "chunksize" in _options.RUN_OPTION_NAMES
    assert "workers" not in _options.RUN_OPTION_NAMES


@pytest.mark.parametrize(
    "call",
    [
        lambda: pp.map(abs, [1], chunk_size=3),
        lambda: pp.imap(abs, [1], backend="threads", retires=2),
        lambda: pp.Pool("threads").map(abs, [1], retires=2),
        lambda: pp.Pool("threads", retires=2),
        lambda: pp.Executor(retires=2),
    ],
)
def test_misspelt_options_fail_at_run_time_too(call: object) -> None:
    with pytest.raises(TypeError, match="unexpected option"):
        call()  # type: ignore[operator]


def test_misspelt_backend_fails_at_run_time_too() -> None:
    for call in (
        lambda: pp.map(abs, [1], backend="procesess"),  # type: ignore[arg-type]
        lambda: pp.imap(abs, [1], backend="procesess"),  # type: ignore[arg-type]
        lambda: pp.Pool("procesess"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="procesess"):
            call()


def test_dask_options_on_another_backend_are_refused() -> None:
    with pytest.raises(TypeError, match="address"):
        pp.Pool("threads", address="tcp://h:8786")


async def _twice(x: int) -> int:
    return 2 * x


def test_coroutines_refuse_pool_only_options() -> None:
    """Coroutines run on the caller's loop: every run option applies, worker-process ones don't."""
    import asyncio

    with pytest.raises(TypeError, match="coroutines: native_threads"):
        asyncio.run(pp.amap(_twice, [1], native_threads=2))
    assert asyncio.run(pp.amap(_twice, [1, 2], workers=2, timeout=5, errors="raise")) == [2, 4]
    assert asyncio.run(pp.amap(_twice, [1, 2, 3], chunksize=2, retries=1)) == [2, 4, 6]


def test_plain_functions_in_amap_take_pool_options() -> None:
    import asyncio

    got = asyncio.run(pp.amap(abs, [-1, -2], backend="threads", chunksize=1, progress=False))
    assert got == [1, 2]


def test_public_classes_say_powerpool() -> None:
    for name in pp.__all__:
        value = getattr(pp, name)
        if isinstance(value, type):
            assert value.__module__ == "powerpool", name
            if issubclass(value, BaseException):
                assert type(pickle.loads(pickle.dumps(value("x")))) is value
    assert "powerpool.Pool" in repr(pp.Pool)
    text = textwrap.dedent(
        """
        import pickle, powerpool
        state = pickle.loads(pickle.dumps(powerpool.PoolState.OPEN))
        print(type(state).__module__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", text], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "powerpool"

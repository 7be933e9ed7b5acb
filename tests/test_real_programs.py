"""Programs written the way users write them: plain scripts, changed globals,
nested maps, scripts that simply end. Each case failed before powerpool made
``__main__`` travel by value (see ``docs/process-engine.md``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import powerpool as pp

pytestmark = pytest.mark.timeout(120)

SCRIPT_TIMEOUT_S = 60
"""A generous bound for one small script, on a loaded 2-core machine."""

UNGUARDED = """
import sys, threading, time
import powerpool as pp

print("top-level code ran", flush=True)
k = 1

def burn(n):
    s = 0
    for i in range(n):
        s += i * i % 7
    return s + k

# A live thread (as a warm threads pool leaves): fork is unsafe from here on.
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
# auto gets enough work (~0.5 s) to choose processes on any machine.
items = [20_000] * (20 if sys.argv[1] == "processes" else 200)
a = pp.map(burn, items, backend=sys.argv[1], explain=True)
k = 2
b = pp.map(burn, items, backend=sys.argv[1])
print("OK" if all(y == x + 1 for x, y in zip(a, b)) else f"STALE {a[:2]} {b[:2]}")
"""


def run_script(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a script from its own folder, as a user would (powerpool importable)."""
    here = str(Path(pp.__file__).parent.parent)
    path_var = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
        cwd=path.parent,
        env={**os.environ, "PYTHONPATH": path_var},
    )


@pytest.mark.parametrize("backend", ["processes", "auto"])
def test_unguarded_script_with_a_live_thread(tmp_path: Path, backend: str) -> None:
    """No ``if __name__ == "__main__":``: its top-level code runs once, the map works,
    and the second map sees the changed global."""
    script = tmp_path / "user_script.py"
    script.write_text(UNGUARDED)
    done = run_script(script, backend)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines.count("top-level code ran") == 1, done.stdout
    assert lines[-1] == "OK", done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "call",
    [
        "backend='processes', start_method='spawn'",
        # distributed's nannies spawn their workers: before, "Nanny failed to start".
        "backend='dask'",
    ],
)
def test_spawn_names_the_missing_guard(tmp_path: Path, call: str) -> None:
    if "dask" in call:
        pytest.importorskip("distributed")
    script = tmp_path / "no_guard.py"
    script.write_text(
        f"import powerpool as pp\ndef f(x):\n    return x\nprint(pp.map(f, range(3), {call}))\n"
    )
    done = run_script(script)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("powerpool.PowerpoolError:"), done.stderr
    assert 'if __name__ == "__main__":' in last
    assert str(script) in last


def test_initializer_state_is_seen_by_main_functions(tmp_path: Path) -> None:
    """An initializer setting a global, or filling a global dict, in a script:
    the functions see it, on every start method, while other globals stay fresh."""
    script = tmp_path / "init_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import powerpool as pp

            model = None
            cache = {}
            scale = 1

            def load(m):
                global model
                model = m
                cache["loaded"] = m * 2

            def predict(x):
                return (model, cache.get("loaded"), x * scale)

            if __name__ == "__main__":
                with pp.Pool("processes", workers=2, initializer=load, initargs=(5,),
                             start_method=sys.argv[1]) as pool:
                    first = pool.map(predict, range(3))
                    scale = 10
                    second = pool.map(predict, range(3))
                print(first == [(5, 10, x) for x in range(3)],
                      second == [(5, 10, 10 * x) for x in range(3)])
            """
        )
    )
    for method in ("fork", "forkserver", "spawn"):
        done = run_script(script, method)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "True True", (method, done.stdout)


def test_a_changed_closure_is_sent_again_an_unchanged_one_never() -> None:
    big = bytes(1_000_000)
    k = 7

    def h(x: int) -> int:
        return x + k + len(big) - len(big)

    sends: list[int] = []
    from multiprocessing.connection import Connection

    real_send = Connection.send_bytes

    def counting_send(self: Connection, buf: Any, *args: Any) -> None:
        if len(buf) >= len(big):
            sends.append(len(buf))
        real_send(self, buf, *args)

    with pp.Pool("processes", workers=2, progress=False) as pool:
        assert pool.map(h, range(10)) == [x + 7 for x in range(10)]
        k = 100
        assert pool.map(h, range(10)) == [x + 100 for x in range(10)]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Connection, "send_bytes", counting_send)
            assert pool.map(h, range(40), chunksize=1) == [x + 100 for x in range(40)]
            assert pool.map(h, range(40), chunksize=1) == [x + 100 for x in range(40)]
    # Unchanged since the workers got it: its megabyte never travels again.
    assert sends == []


def test_a_redefined_main_function_is_sent_again(tmp_path: Path) -> None:
    script = tmp_path / "redefine.py"
    script.write_text(
        textwrap.dedent(
            """
            import powerpool as pp
            def f(x):
                return x
            print(pp.map(f, range(3), backend="processes"))
            def f(x):
                return -x
            print(pp.map(f, range(3), backend="processes"))
            """
        )
    )
    done = run_script(script)
    assert done.stdout.splitlines() == ["[0, 1, 2]", "[0, -1, -2]"], done.stderr


# -- nested maps -------------------------------------------------------------------------


def nested(n: int) -> int:
    return sum(pp.map(abs, range(-n, 0), backend="processes"))


def test_nested_process_maps_return_the_right_answer() -> None:
    with pp.Pool("processes", workers=2, progress=False) as pool:
        assert pool.map(nested, [3, 4, 5]) == [6, 10, 15]


def explain_nested(n: int) -> str:
    pool = pp.Pool("auto", progress=False)
    with pool:
        pool.map(abs, range(n))
        assert pool.last_plan is not None
        return str(pool.last_plan)


def test_explain_says_how_nested_work_runs() -> None:
    with pp.Pool("processes", workers=2, progress=False) as pool:
        (text,) = pool.map(explain_nested, [2000])
    assert "inside a powerpool worker process" in text, text


# -- the end of a script -----------------------------------------------------------------

TWO_POOLS = """
import sys, threading, time
import powerpool as pp

def sq(x):
    return x * x

def main(method):
    if method == "default":
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        method = None
    a = pp.map(sq, range(20), backend="processes", workers=2, start_method=method)
    b = pp.map(sq, range(20), backend="processes", workers=1, start_method=method)
    print("done", a == b, flush=True)

if __name__ == "__main__":
    main(sys.argv[1])
"""

EXIT_RUNS = {"default": 12, "fork": 3, "forkserver": 3, "spawn": 2}
"""Runs of the two-pool script per start method ("default": a live thread, so
forkserver, the case that printed an EOFError at exit in 1 run of 3). The issue
asks for 50 runs: 70 took 50-130 s of a loaded 2-core machine, too much of the
suite's time, so the suite runs 20 (any one failing run in 3 would show with
probability 1 - (2/3)**12 > 99% in the default case alone); 50 runs of the
default case were checked by hand (docs/process-engine.md, At exit)."""


@pytest.mark.timeout(300)
def test_scripts_with_two_warm_pools_exit_cleanly(tmp_path: Path) -> None:
    script = tmp_path / "two_pools.py"
    script.write_text(TWO_POOLS)
    runs = [method for method, n in EXIT_RUNS.items() for _ in range(n)]
    with ThreadPoolExecutor(4) as executor:
        results = list(executor.map(lambda m: (m, run_script(script, m)), runs))
    for method, done in results:
        assert (done.returncode, done.stdout, done.stderr) == (0, "done True\n", ""), method


DASK_SCRIPT = """
import powerpool as pp

def sq(x):
    return x * x

if __name__ == "__main__":  # dask's LocalCluster spawns its workers: it needs the guard
    print(pp.map(sq, range(50), backend="dask", workers=2)[:3])
"""


@pytest.mark.timeout(300)
def test_a_dask_script_ends_without_lost_data_errors(tmp_path: Path) -> None:
    """distributed closed its LocalCluster at exit before powerpool released the
    scattered function: "... caused the cluster to lose scattered data" (4 runs of 4)."""
    pytest.importorskip("distributed")
    script = tmp_path / "dask_script.py"
    script.write_text(DASK_SCRIPT)
    for _ in range(2):
        done = run_script(script)
        assert (done.returncode, done.stdout) == (0, "[0, 1, 4]\n"), done.stderr
        assert "lose scattered data" not in done.stderr
        assert "ERROR" not in done.stderr, done.stderr


# -- inputs that fail ----------------------------------------------------------------------


def failing_input(n: int = 100, bad: int = 50) -> Iterator[int]:
    for i in range(n):
        if i == bad:
            raise KeyError("input item 50")
        yield i


def double(x: int) -> int:
    return 2 * x


def take_until_error(results: Iterator[Any], seen: list[Any]) -> None:
    for value in results:
        seen.append(value)


@pytest.mark.parametrize("backend", ["serial", "threads", "processes", "auto"])
@pytest.mark.parametrize("kind", ["map", "imap", "imap_unordered"])
def test_an_input_that_raises_acts_like_the_builtin_map(backend: str, kind: str) -> None:
    """Every result before the failure, then the input's own exception."""
    seen: list[int] = []
    with pp.Pool(backend, progress=False) as pool:
        if kind == "map":
            with pytest.raises(KeyError, match="input item 50"):
                pool.map(double, failing_input())
            return  # like list(map(...)): nothing to hand back
        results = getattr(pool, kind)(double, failing_input(), chunksize=7)
        with pytest.raises(KeyError, match="input item 50"):
            take_until_error(results, seen)
    expected = [2 * x for x in range(50)]
    assert (seen if kind == "imap" else sorted(seen)) == expected


def test_module_imap_yields_the_results_then_the_input_error() -> None:
    seen: list[int] = []
    with pytest.raises(KeyError):
        take_until_error(pp.imap(double, failing_input(), backend="processes"), seen)
    assert seen == [2 * x for x in range(50)]

"""The ``powerpool`` command line, driven for real in a subprocess.

Every test runs ``python -m powerpool ...`` with a timeout; functions under
test live in a ``work.py`` written into tmp_path, so process workers must get
them by value (they are not importable by name).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from dask_cluster import dask_helper_threads  # noqa: F401  (needed by the dask_cluster fixture)
from powerpool._cli.inputs import InputError, call_record_for, load_function, read_records

pytestmark = pytest.mark.timeout(120)

WORK = textwrap.dedent(
    """
    import os
    import time

    def square(x):
        return x * x

    def picky(x):
        if x % 5 == 3:
            raise ValueError(f"{x} ends in 3 or 8")
        return x

    def add(a, b=0):
        return a + b

    def shout(line):
        return line.upper()

    def slow(x):
        time.sleep(0.03)
        return {"x": x, "pid_free": x * 3}

    def crash(x):
        if x == 2:
            os._exit(7)
        return x

    def segfault(x):
        import ctypes
        if x == 2:
            ctypes.string_at(0)
        return x

    async def asquare(x):
        return x * x

    NOT_CALLABLE = 42
    """
)

SLOW_N = 300
"""Items of the kill tests: at 30 ms each on 2 workers the run lasts >= 4.5 s, so a
starved test process still kills it part-way."""


def powerpool(
    *args: str | Path, cwd: Path, stdin: str | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run the real command line; never hangs past ``timeout``."""
    return subprocess.run(
        [sys.executable, "-m", "powerpool", *map(str, args)],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, values: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work.py").write_text(WORK)
    write_lines(tmp_path / "nums.jsonl", list(range(20)))
    return tmp_path


# -- help -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["run"], ["bench"], ["profile"], ["demo"]])
def test_help(command: list[str], tmp_path: Path) -> None:
    proc = powerpool(*command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: powerpool" in proc.stdout


# -- run: results -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["serial", "threads", "processes", "auto"])
def test_run_writes_results_in_input_order(work: Path, backend: str) -> None:
    proc = powerpool("run", "work.py:square", "nums.jsonl", "--backend", backend, cwd=work)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [{"index": i, "result": i * i} for i in range(20)]
    assert "20 done" in proc.stderr


def test_run_module_function_from_the_working_directory(work: Path) -> None:
    proc = powerpool("run", "work:square", "nums.jsonl", "--backend", "processes", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 20


def test_run_args_kwargs_and_stdin(work: Path) -> None:
    stdin = '{"args": [1, 2]}\n{"args": [3], "kwargs": {"b": 5}}\n\n{"kwargs": {"a": 7}}\n'
    proc = powerpool("run", "work.py:add", cwd=work, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["result"] for line in proc.stdout.splitlines()] == [3, 8, 7]


def test_run_plain_text_lines(work: Path) -> None:
    (work / "words.txt").write_text("alpha\nbeta\n\ngamma\n")
    proc = powerpool("run", "work.py:shout", "words.txt", "--lines", "-o", "out.jsonl", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert [r["result"] for r in results(work / "out.jsonl")] == ["ALPHA", "BETA", "", "GAMMA"]
    assert not (work / "out.jsonl.partial").exists()


def test_run_unordered_has_every_index_once(work: Path) -> None:
    proc = powerpool(
        "run", "work.py:slow", "nums.jsonl", "--unordered", "--backend", "threads", cwd=work
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(20))


def test_run_async_function(work: Path) -> None:
    proc = powerpool("run", "work.py:asquare", "nums.jsonl", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["result"] for line in proc.stdout.splitlines()] == [
        i * i for i in range(20)
    ]


# -- run: failures ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["serial", "processes"])
def test_failures_go_to_the_errors_file(work: Path, backend: str) -> None:
    proc = powerpool(
        "run", "work.py:picky", "nums.jsonl", "-o", "out.jsonl", "--errors", "err.jsonl",
        "--backend", backend, cwd=work,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert [r["index"] for r in results(work / "out.jsonl")] == [i for i in range(20) if i % 5 != 3]
    errors = results(work / "err.jsonl")
    assert [e["index"] for e in errors] == [3, 8, 13, 18]
    first = errors[0]
    assert first["input"] == 3
    assert first["error"] == "ValueError"
    assert first["message"] == "3 ends in 3 or 8"
    assert "work.py" in str(first["traceback"])
    assert 'raise ValueError(f"{x} ends in 3 or 8")' in str(first["traceback"])
    assert "16 done, 4 failed" in proc.stderr


def test_failures_without_errors_file_are_noted(work: Path) -> None:
    proc = powerpool("run", "work.py:picky", "nums.jsonl", "--backend", "serial", cwd=work)
    assert proc.returncode == 1
    assert "item 3 (input line 4) failed: ValueError: 3 ends in 3 or 8" in proc.stderr


def test_a_crashing_worker_fails_only_its_item(work: Path) -> None:
    write_lines(work / "five.jsonl", list(range(5)))
    proc = powerpool(
        "run", "work.py:crash", "five.jsonl", "--errors", "err.jsonl",
        "--backend", "processes", "--workers", "2", "--chunksize", "1", cwd=work,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert [json.loads(line)["index"] for line in proc.stdout.splitlines()] == [0, 1, 3, 4]
    (error,) = results(work / "err.jsonl")
    assert error["index"] == 2
    assert error["error"] == "WorkerCrashedError"
    assert "exited with code 7" in str(error["message"])


def test_unencodable_result_fails_that_item(work: Path) -> None:
    (work / "sets.py").write_text("def f(x):\n    return {x} if x == 1 else x\n")
    write_lines(work / "three.jsonl", [0, 1, 2])
    proc = powerpool("run", "sets.py:f", "three.jsonl", "--errors", "err.jsonl", cwd=work)
    assert proc.returncode == 1
    (error,) = results(work / "err.jsonl")
    assert error["index"] == 1
    assert "not JSON serializable" in str(error["message"])


# -- run: bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchmodule:f", "nums.jsonl"], "no module named 'nosuchmodule'"),
        (["work:nosuch", "nums.jsonl"], "work has no attribute 'nosuch'"),
        (["work.py:NOT_CALLABLE", "nums.jsonl"], "work.py:NOT_CALLABLE is not callable"),
        (["missing.py:f", "nums.jsonl"], "cannot read missing.py"),
        (["work.py", "nums.jsonl"], "expected MODULE:FUNC"),
        (["work.py:square", "missing.jsonl"], "cannot read missing.jsonl"),
        (["work.py:square", "."], "cannot read ."),
        (["broken.py:f", "nums.jsonl"], "importing broken.py failed: SyntaxError"),
        (["work.py:square", "bad.jsonl"], "input line 3 is not valid JSON"),
        (["work.py:add", "badargs.jsonl"], 'input line 1: "args" must be a JSON array'),
        (["work.py:square", "nums.jsonl", "--backend", "serial", "--timeout", "1"], "--timeout"),
        (["work.py:square", "nums.jsonl", "--workers", "-1"], "'--workers': -1 is not"),
        (["work.py:square", "nums.jsonl", "--timeout", "0"], "'--timeout': 0.0 is not"),
        (["work.py:square", "nums.jsonl", "--no-such-option"], "no such option"),
        (["work.py:square", "nums.jsonl", "-o", "nums.jsonl"], "same file as INPUT"),
        (["work.py:square", "nums.jsonl", "-o", "x.jsonl", "--errors", "x.jsonl"], "same file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(work: Path, args: list[str], message: str) -> None:
    (work / "broken.py").write_text("def f(x):\n    return (\n")
    (work / "bad.jsonl").write_text('1\n2\n{"oops": \n4\n')
    (work / "badargs.jsonl").write_text('{"args": 5}\n')
    proc = powerpool("run", *args, cwd=work)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("powerpool: error: ")


def test_output_over_the_input_is_refused_and_the_input_kept(work: Path) -> None:
    before = (work / "nums.jsonl").read_bytes()
    (work / "link.jsonl").symlink_to(work / "nums.jsonl")
    for output in ("nums.jsonl", "./nums.jsonl", "link.jsonl"):
        proc = powerpool("run", "work.py:square", "nums.jsonl", "-o", output, cwd=work)
        assert proc.returncode == 2, proc.stderr
        assert (work / "nums.jsonl").read_bytes() == before


def test_malformed_line_on_stdin_keeps_what_came_before(work: Path) -> None:
    # Streamed input can't be checked up front: items before the bad line are finished.
    proc = powerpool("run", "work.py:square", "--backend", "threads", cwd=work, stdin="1\n2\n{x\n")
    assert proc.returncode == 2
    assert "input line 3 is not valid JSON" in proc.stderr
    assert [json.loads(line)["result"] for line in proc.stdout.splitlines()] == [1, 4]


# -- run: checkpoint --------------------------------------------------------------------


def journal_rows(path: Path) -> int:
    if not path.exists():
        # Not created yet. Not left to connect() to find out: on Python 3.13.0 a
        # failed connect leaks a ResourceWarning, an error under this suite.
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            (count,) = conn.execute("SELECT count(*) FROM results").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return 0  # not created yet
    return int(count)


def run_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=90, check=False)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the run and every worker it started (same session), then reap it."""
    pgid = os.getpgid(proc.pid)
    os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        if not alive:
            return
        time.sleep(0.05)
    pytest.fail(f"processes of the killed run still alive: {alive}")


@pytest.mark.parametrize("unordered", [False, True], ids=["ordered", "unordered"])
def test_sigkill_then_resume_equals_a_clean_run(work: Path, unordered: bool) -> None:
    write_lines(work / "in.jsonl", list(range(SLOW_N)))
    command = [
        sys.executable, "-m", "powerpool", "run", "work.py:slow", "in.jsonl",
        "-o", "out.jsonl", "--checkpoint", "ck.db", "--backend", "processes", "--workers", "2",
        *(["--unordered"] if unordered else []),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=work, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while journal_rows(work / "ck.db") < 20:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the journal never filled"
            time.sleep(0.02)
    finally:
        kill_group(proc)
    killed_at = journal_rows(work / "ck.db")
    assert 20 <= killed_at < SLOW_N
    assert not (work / "out.jsonl").exists()  # never half written

    again = run_command(command, work)
    assert again.returncode == 0, again.stderr
    assert (
        f"({killed_at} from the checkpoint)" in again.stderr
        or "from the checkpoint" in again.stderr
    )
    lines = results(work / "out.jsonl")
    expected = [{"index": i, "result": {"x": i, "pid_free": i * 3}} for i in range(SLOW_N)]
    if unordered:
        lines.sort(key=lambda line: line["index"])
        assert lines == expected
    else:
        clean = powerpool("run", "work.py:slow", "in.jsonl", "--backend", "threads", cwd=work)
        assert (work / "out.jsonl").read_text() == clean.stdout
        assert lines == expected
    assert journal_rows(work / "ck.db") == SLOW_N

    # A third run has nothing left to do and still writes the whole output.
    third = run_command(command, work)
    assert third.returncode == 0, third.stderr
    assert f"{SLOW_N} done ({SLOW_N} from the checkpoint)" in third.stderr
    assert sorted(r["index"] for r in results(work / "out.jsonl")) == list(range(SLOW_N))


def test_failed_items_are_retried_by_the_next_run(work: Path) -> None:
    args = ["run", "work.py:picky", "nums.jsonl", "--checkpoint", "ck.db", "--errors", "e.jsonl"]
    first = powerpool(*args, "-o", "out.jsonl", "--backend", "serial", cwd=work)
    assert first.returncode == 1
    assert journal_rows(work / "ck.db") == 16
    # The function is fixed (same name, same file): the failed items now succeed.
    (work / "work.py").write_text(WORK.replace('raise ValueError(f"{x} ends in 3 or 8")', "pass"))
    second = powerpool(*args, "-o", "out.jsonl", "--backend", "serial", cwd=work)
    assert second.returncode == 0, second.stderr
    assert "20 done (16 from the checkpoint)" in second.stderr
    assert [r["index"] for r in results(work / "out.jsonl")] == list(range(20))
    assert (work / "e.jsonl").read_text() == ""


def test_checkpoint_with_stdin_input(work: Path) -> None:
    stdin = "".join(f"{i}\n" for i in range(10))
    args = ["run", "work.py:square", "--checkpoint", "ck.db", "--backend", "serial"]
    first = powerpool(*args, cwd=work, stdin=stdin)
    assert first.returncode == 0, first.stderr
    second = powerpool(*args, cwd=work, stdin=stdin)
    assert second.returncode == 0, second.stderr
    assert "10 done (10 from the checkpoint)" in second.stderr
    assert second.stdout == first.stdout
    other = powerpool(*args, cwd=work, stdin="1\n2\n")
    assert other.returncode == 2
    assert "was made for" in other.stderr


def test_checkpoint_for_another_run_is_refused(work: Path) -> None:
    ok = powerpool("run", "work.py:square", "nums.jsonl", "--checkpoint", "ck.db", cwd=work)
    assert ok.returncode == 0, ok.stderr
    write_lines(work / "other.jsonl", [1, 2, 3])
    for args in (["work.py:square", "other.jsonl"], ["work.py:add", "nums.jsonl"]):
        proc = powerpool("run", *args, "--checkpoint", "ck.db", cwd=work)
        assert proc.returncode == 2
        assert "ck.db was made for file:" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert journal_rows(work / "ck.db") == 20


def test_ctrl_c_exits_130_and_keeps_the_journal(work: Path) -> None:
    write_lines(work / "in.jsonl", list(range(SLOW_N)))
    command = [
        sys.executable, "-m", "powerpool", "run", "work.py:slow", "in.jsonl", "-o", "out.jsonl",
        "--checkpoint", "ck.db", "--backend", "processes", "--workers", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=work, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while journal_rows(work / "ck.db") < 10:
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 130, stderr
    assert "interrupted;" in stderr
    assert "Traceback" not in stderr
    kept = journal_rows(work / "ck.db")
    assert kept >= 10
    again = run_command(command, work)
    assert again.returncode == 0, again.stderr
    assert sorted(r["index"] for r in results(work / "out.jsonl")) == list(range(SLOW_N))


def test_progress_bar_goes_to_stderr(work: Path) -> None:
    proc = powerpool("run", "work.py:square", "nums.jsonl", "--progress", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "/20 [" in proc.stderr  # tqdm: "n/20 [elapsed<eta, rate]"
    assert len(proc.stdout.splitlines()) == 20


def test_run_on_a_dask_cluster(work: Path, dask_cluster: Any) -> None:
    proc = powerpool("run", "work.py:square", "nums.jsonl", "--address", dask_cluster.address,
                     cwd=work)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["result"] for line in proc.stdout.splitlines()] == [
        i * i for i in range(20)
    ]
    assert "dask" in proc.stderr


# -- bench and profile ------------------------------------------------------------------


def test_bench_writes_png_and_json(work: Path) -> None:
    write_lines(work / "in.jsonl", list(range(16)))
    proc = powerpool(
        "bench", "work.py:slow", "in.jsonl", "--workers", "1,2", "--backends", "threads",
        "--plot", "speedup.png", "--json", "bench.json", cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (work / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((work / "bench.json").read_text())
    assert [(r["backend"], r["workers"]) for r in data["rows"]] == [
        ("serial", 1), ("threads", 1), ("threads", 2),
    ]  # fmt: skip
    assert data["all_agree"] is True
    assert 0.0 <= data["fits"][0]["amdahl"]["parallel_fraction"] <= 1.0
    assert "Amdahl serial fraction" in proc.stdout
    assert "best:" in proc.stdout


def test_bench_with_processes_and_sample(work: Path) -> None:
    proc = powerpool(
        "bench", "work.py:square", "nums.jsonl", "--sample", "5", "--workers", "2",
        "--backends", "serial,processes", cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "on 5 items" in proc.stdout
    assert "processes" in proc.stdout


def test_profile_prints_profile_and_plan(work: Path) -> None:
    proc = powerpool("profile", "work.py:slow", "nums.jsonl", "--sample", "3", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "slow" in proc.stdout
    assert "plan for all 20 items" in proc.stdout


def test_profile_reports_a_crashing_function(work: Path) -> None:
    proc = powerpool("profile", "work.py:segfault", "nums.jsonl", cwd=work)
    assert proc.returncode == 1, proc.stderr
    assert "work.py:segfault crashed the process profiling it" in proc.stderr
    assert "SIGSEGV" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["bench", "profile"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["work.py:nosuch", "nums.jsonl"], "has no attribute 'nosuch'"),
        (["work.py:square", "missing.jsonl"], "cannot read missing.jsonl"),
        (["work.py:square", "bad.jsonl"], "input line 2 is not valid JSON"),
        (["work.py:square", "empty.jsonl"], "the input has no records"),
    ],
)
def test_bench_and_profile_bad_input(
    work: Path, command: str, args: list[str], message: str
) -> None:
    (work / "bad.jsonl").write_text("1\n{\n")
    (work / "empty.jsonl").write_text("")
    proc = powerpool(command, *args, cwd=work)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# -- in-process units -------------------------------------------------------------------


def test_read_records_names_lines_and_skips_blanks() -> None:
    records = list(read_records([b"1\n", b"\n", b'{"args": [2]}\n', b'{"a": 1}\n'], lines=False))
    assert [(r.index, r.line, r.call) for r in records] == [
        (0, 1, ([1], {})), (1, 3, ([2], {})), (2, 4, ([{"a": 1}], {})),
    ]  # fmt: skip
    with pytest.raises(InputError, match="input line 2 is not valid UTF-8"):
        list(read_records([b"1\n", b"\xff\n"], lines=False))
    assert [r.value for r in read_records([b"a\r\n", b"\n", b"b"], lines=True)] == ["a", "", "b"]


def test_load_function_dotted_attribute() -> None:
    loaded = load_function("os.path:join")
    assert loaded.fn is os.path.join
    assert loaded.normalized == "module:os.path:join"
    assert load_function("json:JSONDecoder.decode").normalized == "module:json:JSONDecoder.decode"


def test_file_function_reaches_a_worker_without_the_file(tmp_path: Path) -> None:
    # A Dask worker on another machine can't import tmp_path/remote.py: it gets a copy by value.
    (tmp_path / "remote.py").write_text("K = 10\n\ndef f(x):\n    return x * K\n")
    blob = pickle.dumps(call_record_for(load_function(str(tmp_path / "remote.py") + ":f")))
    (tmp_path / "remote.py").unlink()
    proc = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; f = pickle.loads(sys.stdin.buffer.read()); "
         "print(f(([4], {})))"],
        input=blob, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == b"40"

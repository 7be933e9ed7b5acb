"""The ``powerpool`` command line: ``run``, ``bench``, ``profile`` and ``demo``.

Only option parsing and exit codes live here (the options the commands share
are in :mod:`.params`); each command's work is in its own module
(:mod:`.run`, :mod:`.bench`, :mod:`.profile`, and ``powerpool._demo``).

Exit codes, for every command::

    0    success
    1    some items failed (run), results disagree (bench, demo)
    2    bad usage or input: a malformed line, an unknown MODULE:FUNC,
         an unreadable file, a checkpoint made for another run
    130  interrupted (Ctrl-C); a checkpoint keeps what was finished

Problems the user can fix are printed as one line, ``powerpool: error: ...``,
never as a Python traceback.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Literal

import click

from .._errors import BackendUnavailableError, CheckpointMismatchError
from .inputs import InputError
from .params import (
    _BACKENDS,
    _BYTES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    _check_distinct_files,
    _check_timeout_backend,
    _cluster,
    _cluster_options,
    _Fail,
    _lines_option,
    _load,
    _note,
    _positive_list,
    _read_calls,
    _report_option,
    _scheduler_address,
    _write_json,
)

if TYPE_CHECKING:
    from .._recorder import RunReport

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="powerpool", prog_name="powerpool")
def cli() -> None:
    """Use all of your computer from Python, without guessing.

    MODULE:FUNC names a function: an importable module (pkg.mod:func, looked up
    from the current directory too) or a file (path/to/file.py:func).
    """


# -- run ------------------------------------------------------------------------------


@cli.command()
@click.argument("function", metavar="MODULE:FUNC")
@click.argument("input_path", metavar="[INPUT]", required=False, default="-")
@click.option("-o", "--output", "output_path", metavar="FILE", help="Results (default: stdout).")
@click.option("--errors", "errors_path", metavar="FILE", help="Failed items as JSON lines.")
@_lines_option
@click.option("--unordered", is_flag=True, help="Write results as they finish, not in input order.")
@click.option(
    "--checkpoint",
    "checkpoint_path",
    metavar="FILE",
    help="SQLite journal: run the same command again to resume after a crash or Ctrl-C.",
)
@click.option("--backend", type=click.Choice(_BACKENDS), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=1), help="Workers (default: the backend's).")
@click.option("--chunksize", type=click.IntRange(min=1), help="Items per chunk (default: adapts).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds per item.")
@click.option("--retries", type=click.IntRange(min=0), default=0, help="Re-runs of a failed item.")
@_cluster_options
@click.option(
    "--max-worker-memory",
    type=_BYTES,
    metavar="SIZE",
    help="Replace a worker process once its RSS would pass SIZE (e.g. 2GB).",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    help="Replace a worker process after N items.",
)
@click.option(
    "--max-inflight-bytes",
    type=_BYTES,
    metavar="SIZE",
    help="Results kept in flight or waiting, in bytes (default 64MB).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a tty).")
@click.option("-q", "--quiet", is_flag=True, help="No summary line at the end.")
@_report_option
def run(
    *,
    function: str,
    input_path: str,
    output_path: str | None,
    errors_path: str | None,
    lines: bool,
    unordered: bool,
    checkpoint_path: str | None,
    backend: str,
    workers: int | None,
    chunksize: int | None,
    timeout: float | None,
    retries: int,
    address: str | None,
    scheduler_file: str | None,
    max_worker_memory: int | None,
    max_tasks_per_child: int | None,
    max_inflight_bytes: int | None,
    progress: bool | None,
    quiet: bool,
    report_path: str | None,
) -> int:
    """Apply MODULE:FUNC to every record of INPUT (JSON Lines; stdin if - or omitted).

    A record is the function's argument, or {"args": [...], "kwargs": {...}}.
    Each result is written as one line, {"index": i, "result": ...}; failed
    items go to --errors FILE (exit code 1). With --checkpoint, a killed or
    interrupted run resumes where it stopped when the same command is run again.
    """
    from .run import Interrupted, RunSettings, execute_run, format_summary

    options = _cluster(address, scheduler_file)
    if options and backend == "auto":
        backend = "dask"
    # Pool options, handed over with the backend's.
    for name, value in (
        ("max_worker_memory", max_worker_memory),
        ("max_tasks_per_child", max_tasks_per_child),
        ("max_inflight_bytes", max_inflight_bytes),
    ):
        if value is not None:
            options[name] = value
    _check_timeout_backend(backend, timeout)
    _check_distinct_files(
        input=input_path, output=output_path, errors=errors_path, checkpoint=checkpoint_path
    )
    settings = RunSettings(
        function=_load(function),
        input_path=input_path,
        output_path=output_path,
        errors_path=errors_path,
        lines=lines,
        unordered=unordered,
        checkpoint_path=checkpoint_path,
        backend=backend,
        workers=workers,
        chunksize=chunksize,
        timeout_s=timeout,
        retries=retries,
        backend_options=options,
        progress=progress,
        report_path=report_path,
    )
    try:
        summary = execute_run(settings)
    except BrokenPipeError:
        raise  # the reader of stdout went away: main() exits quietly
    except Interrupted as exc:
        if exc.journaled is None:
            _note("interrupted")
        else:
            _note(f"interrupted; {exc.journaled} results kept in {checkpoint_path}")
        return EXIT_INTERRUPTED
    except (InputError, CheckpointMismatchError, BackendUnavailableError, OSError) as exc:
        if (
            checkpoint_path is not None
            and os.path.exists(checkpoint_path)
            and not isinstance(exc, CheckpointMismatchError)
        ):
            raise _Fail(f"{exc} (the checkpoint {checkpoint_path} is kept)") from None
        raise _Fail(str(exc)) from None
    if not quiet:
        _note(format_summary(summary, settings).removeprefix("powerpool: "))
    if report_path is not None:
        _note(f"report written to {report_path}")
    return EXIT_FAILED if summary.failed else 0


# -- bench ------------------------------------------------------------------------------


@cli.command()
@click.argument("function", metavar="MODULE:FUNC")
@click.argument("input_path", metavar="INPUT")
@_lines_option
@click.option("--sample", type=click.IntRange(min=1), help="Use only the first N records.")
@click.option("--workers", "workers_text", metavar="N,N,...", help="Worker counts to try.")
@click.option(
    "--backends",
    "backends_text",
    default="serial,threads,processes",
    show_default=True,
    help="Backends to compare (serial is always run: it is the baseline).",
)
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs per point; the fastest counts.")  # fmt: skip
@click.option("--warm", is_flag=True, help="Leave pool start-up out of the times.")
@click.option("--chunksize", type=click.IntRange(min=1), help="Items per chunk (default: adapts).")
@click.option("--plot", "plot_path", metavar="FILE", help="Write a PNG of speedup vs workers.")
@click.option("--json", "json_path", metavar="FILE", help="Write every number as JSON.")
@_report_option
@_cluster_options
def bench(
    *,
    function: str,
    input_path: str,
    lines: bool,
    sample: int | None,
    workers_text: str | None,
    backends_text: str,
    repeat: int,
    warm: bool,
    chunksize: int | None,
    plot_path: str | None,
    json_path: str | None,
    report_path: str | None,
    address: str | None,
    scheduler_file: str | None,
) -> int:
    """Time MODULE:FUNC on INPUT across backends and worker counts.

    With --address or --scheduler-file, dask on that cluster is one of the
    backends (it uses all of the cluster's threads, whatever the worker count).

    Prints time, speedup and efficiency for each, checks every result against
    the serial run, fits Amdahl's law (and the USL) and names the best setting.
    """
    from .._system import usable_cores
    from .bench import (
        TABLE_HEADER,
        default_workers_list,
        format_bench,
        format_row,
        require_matplotlib,
        run_bench,
        write_plot,
    )
    from .inputs import AsyncCallRecord, call_record_for

    backends = [b.strip() for b in backends_text.split(",") if b.strip()]
    unknown = [b for b in backends if b not in _BACKENDS or b == "auto"]
    if unknown or not backends:
        raise _Fail(f"--backends: unknown {', '.join(unknown) or 'empty list'}; "
                    f"choose from {', '.join(b for b in _BACKENDS if b != 'auto')}")  # fmt: skip
    cluster = _cluster(address, scheduler_file)
    if cluster and "dask" not in backends:
        backends.append("dask")
    if plot_path is not None:
        try:
            require_matplotlib()
        except InputError as exc:
            raise _Fail(str(exc)) from None
    loaded = _load(function)
    cores = usable_cores()
    workers_list = _positive_list(workers_text) if workers_text else default_workers_list(cores)
    calls, _ = _read_calls(input_path, lines=lines, sample=sample)
    wrapped = call_record_for(loaded)
    is_async = isinstance(wrapped, AsyncCallRecord)
    if is_async:
        backends = ["asyncio"]
    click.echo(
        f"{function} on {len(calls)} items, {cores} usable cores; times "
        f"{'without' if warm else 'with'} pool start-up, best of {repeat}"
    )
    click.echo(TABLE_HEADER)
    runs: dict[tuple[str, int], RunReport] = {}
    try:
        report = run_bench(
            wrapped,
            calls,
            function=function,
            backends=backends,
            workers_list=workers_list,
            repeat=repeat,
            warm=warm,
            is_async=is_async,
            chunksize=chunksize,
            on_row=lambda row: click.echo(format_row(row)),
            on_report=None if report_path is None else runs.__setitem__,
            **cluster,
        )
    except (InputError, BackendUnavailableError) as exc:
        raise _Fail(str(exc)) from None
    click.echo("")
    click.echo(format_bench(report, with_rows=False))
    if plot_path is not None:
        try:
            write_plot(report, plot_path)
        except OSError as exc:
            raise _Fail(f"cannot write {plot_path}: {exc.strerror or exc}") from None
        _note(f"plot written to {plot_path}")
    if json_path is not None:
        _write_json(json_path, report.to_json())
        _note(f"numbers written to {json_path}")
    if report_path is not None:
        best = report.best
        run_report = runs.get((best.backend, best.workers))
        if run_report is not None:
            try:
                run_report.write(report_path)
            except OSError as exc:
                raise _Fail(f"cannot write {report_path}: {exc.strerror or exc}") from None
            _note(f"report of the fastest run ({best.backend}, {best.workers}) "
                  f"written to {report_path}")  # fmt: skip
    return 0 if report.all_agree else EXIT_FAILED


# -- profile ----------------------------------------------------------------------------


@cli.command()
@click.argument("function", metavar="MODULE:FUNC")
@click.argument("input_path", metavar="INPUT")
@_lines_option
@click.option("--sample", type=click.IntRange(min=1), default=20, show_default=True,
              help="Profile at most this many records (the first ones).")  # fmt: skip
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, help="Stop profiling after this long.")  # fmt: skip
@click.option("--hotspots/--no-hotspots", default=True, show_default=True,
              help="Also run cProfile and list the functions that take the time.")  # fmt: skip
@click.option("--by-line", "by_line", type=click.Choice(["function", "file"]), is_flag=False,
              flag_value="function", default=None,
              help="Time each line of FUNC (=file: also of the functions in its file); "
              "needs line_profiler.")  # fmt: skip
@click.option("--memory", is_flag=True,
              help="Each item's memory peak and the lines that allocated it.")  # fmt: skip
@_cluster_options
def profile(
    *,
    function: str,
    input_path: str,
    lines: bool,
    sample: int,
    max_seconds: float,
    hotspots: bool,
    by_line: str | None,
    memory: bool,
    address: str | None,
    scheduler_file: str | None,
) -> int:
    """Measure MODULE:FUNC on a sample of INPUT and say how to run it.

    With --address or --scheduler-file, the plan may scale out to that cluster.

    Prints the profile (per-item time, CPU/wall ratio, GIL holding, memory,
    serialization cost), the hot spots, and the plan auto would choose for the
    whole input. --by-line adds the slowest lines, --memory each item's
    memory peak and where it was allocated.
    """
    from .._errors import WorkerCrashedError
    from .profile import profile_spec_isolated

    _load(function)  # a mistake in MODULE:FUNC is reported here, in one line
    calls, count = _read_calls(input_path, lines=lines, sample=sample)
    if not calls:
        raise _Fail("the input has no records to profile")
    try:
        report = profile_spec_isolated(
            function,
            calls,
            n_items=count,
            max_items=sample,
            max_seconds=max_seconds,
            hotspots=hotspots,
            lines=by_line or False,
            memory=memory,
            address=_scheduler_address(_cluster(address, scheduler_file)),
        )
    except (ImportError, TypeError) as exc:  # line_profiler missing; a built-in for --by-line
        raise _Fail(str(exc)) from None
    except WorkerCrashedError as exc:
        # Profiled in a worker process, so that a crash is reported, not fatal.
        _note(f"error: {function} crashed the process profiling it: {exc}")
        return EXIT_FAILED
    click.echo(report)
    return 0


# -- demo -------------------------------------------------------------------------------


@cli.command()
@click.option("--work", type=click.Choice(["cpu", "io", "all"]), default="cpu", show_default=True,
              help="cpu: primes (computing); io: fetches from a local slow server "
              "(waiting); all: both.")  # fmt: skip
@click.option("--size", type=click.Choice(["small", "full"]), default="small", show_default=True,
              help="small: 24 numbers, 100 fetches (seconds each); full: 48, 400.")  # fmt: skip
@click.option("--json", "json_path", metavar="FILE", help="Write the measurements as JSON.")
def demo(*, work: str, size: str, json_path: str | None) -> int:
    """Run the classic exercise sequentially, with threads, processes and auto, timed.

    cpu: check large numbers for primality; the GIL keeps pure-Python threads
    on one core, processes are not bound by it. io: fetch URLs from a local
    server that is slow to answer (also with asyncio); waiting releases the
    GIL, so threads and asyncio overlap it, and processes only add start-up.
    Prints the time of each, the speedup over sequential, and why.
    """
    from .._demo import format_report, run_demo

    chosen: Literal["small", "full"] = "full" if size == "full" else "small"
    agree = True
    dumps: dict[str, Any] = {}
    if work in ("cpu", "all"):
        report = run_demo(chosen)
        click.echo(format_report(report))
        agree = agree and report.all_agree
        dumps["cpu"] = report.to_json()
    if work in ("io", "all"):
        from .._demo_io import format_io_report, run_io_demo

        if work == "all":
            click.echo("")
        io_report = run_io_demo(chosen)
        click.echo(format_io_report(io_report))
        agree = agree and io_report.all_agree
        dumps["io"] = io_report.to_json()
    if json_path is not None:
        # One demo: its record as before; both: one record per kind of work.
        _write_json(json_path, dumps if work == "all" else dumps[work])
    return 0 if agree else EXIT_FAILED


# -- entry point ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command, exit with its code."""
    try:
        code = cli.main(args=argv, prog_name="powerpool", standalone_mode=False)
    except click.UsageError as exc:
        # One line, as promised above: click's own block is four.
        command = exc.ctx.command_path if exc.ctx is not None else "powerpool"
        message = exc.format_message()
        message = message[:1].lower() + message[1:].rstrip(".")
        click.echo(f"powerpool: error: {message} (see {command} --help)", err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:  # Ctrl-C outside a run: nothing to keep
        _note("interrupted")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, like `cat` does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_FAILED
    sys.exit(code if isinstance(code, int) else 0)

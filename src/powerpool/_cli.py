"""The ``powerpool`` command line: ``run``, ``bench``, ``profile`` and ``demo``.

Only option parsing and exit codes live here; each command's work is in its
own module (``_runcmd``, ``_benchcmd``, ``_demo``, and the profiler).

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

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import click

from ._errors import BackendUnavailableError, CheckpointMismatchError
from ._options import BACKEND_NAMES
from ._records import Call, InputError, LoadedFunction, load_function, open_input, read_records

if TYPE_CHECKING:
    from ._recorder import RunReport

__all__ = ["cli", "main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_BACKENDS = list(BACKEND_NAMES)


class _Fail(click.ClickException):
    """A one-line error with exit code 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        click.echo(f"powerpool: error: {self.format_message()}", err=True)


def _note(message: str) -> None:
    click.echo(f"powerpool: {message}", err=True)


def _load(spec: str) -> LoadedFunction:
    try:
        return load_function(spec)
    except InputError as exc:
        raise _Fail(str(exc)) from None


def _read_calls(path: str, *, lines: bool, sample: int | None) -> tuple[list[Call], int]:
    """The first ``sample`` records of INPUT (all if None) as calls, and how many there are."""
    try:
        stream = open_input(path, seekable=False)
    except InputError as exc:
        raise _Fail(str(exc)) from None
    try:
        calls: list[Call] = []
        count = 0
        for record in read_records(stream, lines=lines):
            count += 1
            if sample is None or record.index < sample:
                calls.append(record.call)
        return calls, count
    except InputError as exc:
        raise _Fail(str(exc)) from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _positive_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise _Fail(f"--workers expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise _Fail(f"--workers expects positive integers, got {text!r}")
    return sorted(set(values))


def _write_json(path: str, data: dict[str, Any]) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except OSError as exc:
        raise _Fail(f"cannot write {path}: {exc.strerror or exc}") from None


def _check_report_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from ._recorder import report_format

    try:
        report_format(value)
    except ValueError:
        raise click.BadParameter("the file name must end in .html or .json") from None
    return value


_report_option = click.option(
    "--report",
    "report_path",
    metavar="FILE",
    callback=_check_report_path,
    help="Write what happened: FILE.html (a timeline page) or FILE.json (a Perfetto trace).",
)


class _ByteSize(click.ParamType):  # type: ignore[type-arg]
    """A size in bytes: 1000000, 200MB, 1.5GiB (KB/MB/GB are powers of 1000, KiB... of 1024)."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1000,
        "m": 1000**2,
        "mb": 1000**2,
        "g": 1000**3,
        "gb": 1000**3,
        "kib": 1024,
        "mib": 1024**2,
        "gib": 1024**3,
    }

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace("_", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :].strip()
        try:
            size = int(float(number) * self._UNITS[unit])
        except (ValueError, KeyError):
            self.fail(f"expected a size such as 500MB or 2GB, got {value!r}", param, ctx)
        if size < 1:
            self.fail(f"expected a positive size, got {value!r}", param, ctx)
        return size


_BYTES = _ByteSize()

_lines_option = click.option(
    "--lines",
    is_flag=True,
    help="Plain text input: each line is one string argument (default: JSON Lines).",
)


def _cluster_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--address and --scheduler-file: a dask cluster to run on (one of them)."""
    command = click.option(
        "--scheduler-file",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="The file `dask scheduler --scheduler-file` wrote (implies --backend dask).",
    )(command)
    return click.option("--address", help="Dask scheduler address (implies --backend dask).")(
        command
    )


def _cluster(address: str | None, scheduler_file: str | None) -> dict[str, Any]:
    """The dask backend options for --address / --scheduler-file ({} for neither)."""
    if address is not None and scheduler_file is not None:
        raise _Fail("give --address or --scheduler-file, not both")
    if address is not None:
        return {"address": address}
    if scheduler_file is not None:
        if not os.path.isfile(scheduler_file):
            raise _Fail(f"no scheduler file at {scheduler_file}")
        return {"scheduler_file": scheduler_file}
    return {}


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
    from ._runcmd import Interrupted, RunSettings, execute_run, format_summary

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


def _check_distinct_files(**paths: str | None) -> None:
    """Refuse to run when two of run's files are one: writing the results (or
    errors, or the journal) over the input would destroy it before it is read."""
    named = [(role, path) for role, path in paths.items() if path is not None and path != "-"]
    for i, (role, path) in enumerate(named):
        for other_role, other in named[:i]:
            same = os.path.abspath(path) == os.path.abspath(other)
            if not same and os.path.exists(path) and os.path.exists(other):
                same = os.path.samefile(path, other)
            if same:
                option = "INPUT" if other_role == "input" else f"--{other_role}"
                raise _Fail(
                    f"--{role} {path} is the same file as {option}; "
                    f"writing it would destroy the other: choose another file"
                )


def _check_timeout_backend(backend: str, timeout: float | None) -> None:
    if timeout is None or backend == "auto":
        return
    from ._backends import load

    try:
        supported = load(backend).supports_timeout
    except (ImportError, ValueError) as exc:
        raise _Fail(str(exc)) from None
    if not supported:
        raise _Fail(f"--timeout needs a backend that can stop an item; {backend!r} can't")


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
    from ._benchcmd import (
        TABLE_HEADER,
        default_workers_list,
        format_bench,
        format_row,
        require_matplotlib,
        run_bench,
        write_plot,
    )
    from ._records import AsyncCallRecord, call_record_for
    from ._system import usable_cores

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
    from ._errors import WorkerCrashedError
    from ._profcmd import profile_spec_isolated

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


def _scheduler_address(cluster: dict[str, Any]) -> str | None:
    """The scheduler's address, read from its scheduler file if that is what was given."""
    if "scheduler_file" not in cluster:
        return cluster.get("address")
    path = cluster["scheduler_file"]
    try:
        with open(path, encoding="utf-8") as f:
            address = json.load(f)["address"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Fail(f"cannot read the scheduler address from {path}: {exc}") from None
    return str(address)


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
    from ._demo import format_report, run_demo

    chosen: Literal["small", "full"] = "full" if size == "full" else "small"
    agree = True
    dumps: dict[str, Any] = {}
    if work in ("cpu", "all"):
        report = run_demo(chosen)
        click.echo(format_report(report))
        agree = agree and report.all_agree
        dumps["cpu"] = report.to_json()
    if work in ("io", "all"):
        from ._demo_io import format_io_report, run_io_demo

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

"""What the commands share: exit codes, option types, option groups, input checks.

Each check raises :class:`_Fail`, which :func:`~powerpool._cli.app.main`
prints as one line, ``powerpool: error: ...``, with exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import click

from .._options import BACKEND_NAMES
from .inputs import Call, InputError, LoadedFunction, load_function, open_input, read_records

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
    from .._recorder import report_format

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
    from .._backends import load

    try:
        supported = load(backend).supports_timeout
    except (ImportError, ValueError) as exc:
        raise _Fail(str(exc)) from None
    if not supported:
        raise _Fail(f"--timeout needs a backend that can stop an item; {backend!r} can't")


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

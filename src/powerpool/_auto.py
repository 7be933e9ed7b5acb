"""``backend="auto"``: measure the first items, plan, and keep their results.

The first few calls of the real work run in the caller's thread under the
profiler; their outcomes are kept and reported as results (a function is
never called twice for the same item: side effects matter). The plan then
picks the backend for the rest. Work too small to pay any pool's overhead
takes the fast path: the rest runs in the caller's thread through the
builtin ``map``, at list-comprehension speed.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._run import RunOptions
from ._system import usable_cores
from ._task import Item, Outcome

if TYPE_CHECKING:
    from ._plan import Plan

__all__ = ["Choice", "choose"]

_NO_TIMEOUT = ("serial", "dask")

SAMPLE_ITEMS = 8
"""Most items the profiler runs before deciding: enough to average out noise
on small items; slow items stop the sample after the first one."""

SAMPLE_SECONDS = 0.2
"""Most time the sample may take: the profile runs in one thread, so this is
time the other cores sit idle."""


@dataclass(frozen=True)
class Choice:
    """What auto decided for one run."""

    plan: Plan
    """The backend, workers and chunk size, with reasons."""
    prefilled: list[tuple[Item, Outcome]]
    """The sampled calls and their outcomes, to be reported as results."""
    per_item_s: float
    """Measured wall seconds per item, to seed the chunk sizer."""
    fast: Iterator[Any] | None
    """For serial plans with default options: all results, computed lazily in
    the caller's thread (the pool core is skipped altogether)."""


def choose(
    fn: Callable[..., Any],
    source: Iterator[Any],
    star: bool,
    total: int | None,
    options: RunOptions,
    *,
    workers: int | None,
    address: str | None,
) -> Choice:
    """Profile the first items of ``source`` and plan the rest.

    ``source`` yields argument tuples when ``star``, else single arguments.
    """
    from ._plan import plan_from_profile
    from ._profile import profile_calls

    taken: list[tuple[Any, ...]] = []

    def calls() -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        for entry in source:
            args = entry if star else (entry,)
            taken.append(args)
            yield args, {}

    profile, outcomes = profile_calls(
        fn, calls(), max_items=SAMPLE_ITEMS, max_seconds=SAMPLE_SECONDS
    )
    if len(outcomes) != len(taken):  # an item taken must never be lost or re-run
        raise AssertionError("profiler consumed items it did not run")
    plan = plan_from_profile(profile, total, address=address)
    if options.timeout_s is not None and plan.backend in _NO_TIMEOUT:
        # Only a backend that can stop a late item honours timeout=.
        plan = dataclasses.replace(
            plan,
            backend="threads",
            workers=usable_cores(),
            reasons=(
                *plan.reasons,
                f"timeout= asks for a backend that can stop a late item, "
                f"which {plan.backend} cannot: threads instead",
            ),
        )
    if workers is not None and plan.backend != "serial":
        plan = dataclasses.replace(plan, workers=workers)
    prefilled: list[tuple[Item, Outcome]] = [
        ((i, args, {}), outcome) for i, (args, outcome) in enumerate(zip(taken, outcomes))
    ]
    fast = None
    if plan.backend == "serial" and options == dataclasses.replace(
        RunOptions(), progress=options.progress
    ):
        rest = itertools.starmap(fn, source) if star else map(fn, source)
        fast = itertools.chain(_values(outcomes), rest)
    return Choice(plan=plan, prefilled=prefilled, per_item_s=profile.wall_per_item_s, fast=fast)


def choose_with_initializer(total: int | None, workers: int | None) -> Plan:
    """The plan when the pool has an initializer: processes, without a sample.

    An initializer sets up per-worker state (a model, a connection) that the
    items need, so they cannot run in the caller's thread to be measured;
    per-worker state is what worker processes are for. The chunk sizer still
    measures the items as they run.
    """
    from ._plan import Plan

    count = workers or usable_cores()
    return Plan(
        backend="processes",
        workers=count,
        chunksize=1,
        expected_speedup=float(count),
        reasons=(
            "the pool has an initializer: items need per-worker state, so they are not "
            "sampled in your thread; processes, one per core, each initialized once",
        ),
        profile=None,
        n_items=total,
        cores=usable_cores(),
    )


def _values(outcomes: list[Outcome]) -> Iterator[Any]:
    for ok, value in outcomes:
        if not ok:
            raise value
        yield value

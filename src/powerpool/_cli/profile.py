"""``powerpool profile``: measure a sample of the real work, then show auto's plan for all of it.

The measuring and planning are the library's (``_profile``, ``_plan``); this
module only feeds them the command line's records and lays out the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .inputs import Call

if TYPE_CHECKING:
    from .._plan import Plan

__all__ = ["describe_auto", "profile_and_plan", "profile_spec_isolated"]


def describe_auto(plan: Plan) -> str:
    """What auto measured, in a few words: ``cpu-gil work, 55 ms per item, GIL held 98%``."""
    from .._profile import format_seconds

    prof = plan.profile
    if prof is None:
        return "nothing measured"
    words = [f"{prof.workload.value} work", f"{format_seconds(prof.wall_per_item_s)} per item"]
    if prof.gil_measured:
        words.append(f"GIL held {prof.gil_held_fraction:.0%}")
    return ", ".join(words)


def profile_and_plan(
    fn: Callable[..., Any],
    calls: Sequence[Call],
    *,
    n_items: int,
    max_items: int,
    max_seconds: float,
    hotspots: bool,
    lines: bool | str = False,
    memory: bool = False,
    address: str | None = None,
) -> str:
    """Profile ``fn`` on up to ``max_items`` of ``calls``; plan a run of ``n_items``; as text.

    ``lines`` and ``memory`` are :func:`powerpool.profile`'s (line timings,
    memory per item); ImportError names the install command when
    line_profiler is missing.
    """
    from .._itemprobe import item_probes
    from .._plan import plan_from_profile
    from .._profile import profile_calls

    # The user's function itself, not the CLI's JSON-encoding wrapper, so the
    # hot spots, the pickled sizes and the function's name are the user's.
    prof, _ = profile_calls(
        fn,
        ((tuple(args), kwargs) for args, kwargs in calls),
        max_items=max_items,
        max_seconds=max_seconds,
        hotspots=hotspots,
        stop_early=False,
        thorough=True,
        probes=item_probes(fn, lines=lines, memory=memory),
    )
    plan = plan_from_profile(prof, n_items, address=address)
    return f"{prof}\n\nplan for all {n_items} items:\n{plan}"


def profile_spec_isolated(spec: str, calls: Sequence[Call], **options: Any) -> str:
    """:func:`profile_and_plan` (same ``options``) for MODULE:FUNC ``spec``, in a worker process.

    A function that crashes its process (a segfault in native code,
    ``os._exit``) then takes only that worker down, and the caller gets a
    :class:`WorkerCrashedError` naming the signal, which the command line can
    report, instead of dying itself. Other errors keep their type. The worker
    has the machine's cores as its share, so the plan is the one the caller's
    process would make.
    """
    from .._pool import Pool

    with Pool("processes", workers=1, progress=False) as pool:
        text: str = pool.submit(_profile_spec, spec, list(calls), **options).result()
    return text


def _profile_spec(spec: str, calls: list[Call], **options: Any) -> str:
    from .inputs import load_function

    return profile_and_plan(load_function(spec).fn, calls, **options)

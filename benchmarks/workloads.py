"""The workloads: functions, their inputs, and how to compare results.

Every function here is a module-level function so that process pools (the
stdlib's, joblib's, MPIRE's, dask's, powerpool's) can send it to workers by
reference. Inputs are plain ints, strings or numpy arrays, never tuples:
MPIRE unpacks a tuple item into positional arguments, which would make the
same call mean different things to different contenders. Inputs are also all
distinct, because dask's ``Client.map`` (``pure=True`` by default) computes
equal inputs once, which would let it skip work the others do.

The work is fixed in iterations, not calibrated per run, so that numbers
taken on different machines describe the same job; the suite records the
measured serial cost per item next to each result.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import httpserver

__all__ = [
    "WORKLOADS",
    "Workload",
    "add_one",
    "afetch",
    "array_sum",
    "asleep_20ms",
    "fetch",
    "is_prime",
    "load_model",
    "predict",
    "predict_lazy",
    "reset_model",
    "sleep_20ms",
    "spin",
    "svd300_sum",
    "svd_sum",
]

ITERS_PER_MS = 7_200
"""Iterations of :func:`spin` that take about 1 ms on the reference machine
(2-core AMD EPYC VM, CPython 3.11); 5 ms items are ``5 * ITERS_PER_MS``."""

SLEEP_S = 0.020
"""Latency of one simulated I/O item (sleep or HTTP answer)."""

INIT_S = 0.5
"""Cost of the simulated per-worker model load (sleep-based, like reading weights)."""

SVD_N = 400
"""Side of the square matrix in the numpy workload: large enough that OpenBLAS
uses its threads, small enough that 64 of them take ~1.5 s."""

BIG_ARG_FLOATS = 125_000
"""float64 values per argument in the big-argument workload (1 MB each)."""

SHARED_FLOATS = 2_000_000
"""float64 values of the one array every item of the shared-array workload gets (16 MB)."""

RESULT_BYTES = 1_000_000
"""Size of each result in the big-results workload (1 MB)."""

LEAK_BYTES = 10_000_000
"""Memory each item of the leaking workload keeps for good (10 MB, touched)."""


# ---------------------------------------------------------------- functions


def spin(iterations: int) -> int:
    """Pure-Python CPU work: holds the GIL the whole time, allocates nothing."""
    acc = 0
    for i in range(iterations):
        acc = (acc + i * i) % 1_000_003
    return acc


def is_prime(n: int) -> bool:
    """Trial division, as in the ``concurrent.futures`` documentation's example."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    # An explicit loop, as in the docs' example: all() over a generator would
    # cost ~1.5x more per step and measure generator overhead instead.
    for i in range(3, math.isqrt(n) + 1, 2):  # noqa: SIM110
        if n % i == 0:
            return False
    return True


def add_one(x: int) -> int:
    """The trivial function: measures pure per-item overhead."""
    return x + 1


def sleep_20ms(x: int) -> int:
    """Blocking I/O stand-in: releases the GIL while it waits."""
    time.sleep(SLEEP_S)
    return x


async def asleep_20ms(x: int) -> int:
    """Coroutine variant of :func:`sleep_20ms`."""
    await asyncio.sleep(SLEEP_S)
    return x


def fetch(url: str) -> str:
    """GET ``url`` with urllib (a new connection per request) and return the body."""
    with urllib.request.urlopen(url, timeout=60) as response:
        body: bytes = response.read()
    return body.decode()


async def afetch(url: str) -> str:
    """Coroutine variant of :func:`fetch`: a bare HTTP/1.0 GET over asyncio streams.

    Written against the stdlib only (no aiohttp in the dependency set); it
    returns exactly what :func:`fetch` returns for the local server.
    """
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /{path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise OSError(f"unexpected HTTP status line {status!r} for {url}")
    return body.decode()


def svd_sum(seed: int) -> float:
    """Singular values of a seeded SVD_N x SVD_N matrix (LAPACK/BLAS, releases the GIL)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((SVD_N, SVD_N))
    return float(np.linalg.svd(a, compute_uv=False).sum())


def svd300_sum(seed: int) -> float:
    """Singular values of a seeded 300 x 300 matrix: issue 10's numpy workload (200 of them)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((300, 300))
    return float(np.linalg.svd(a, compute_uv=False).sum())


def array_sum(a: np.ndarray[Any, Any]) -> float:
    """Cheap work on a 1 MB argument: measures the cost of moving the argument."""
    return float(a.sum())


def megabyte(x: int) -> bytes:
    """A 1 MB result: measures the cost of moving results back (and holding them)."""
    return bytes([x % 256]) * RESULT_BYTES


_LEAKED: list[bytearray] = []


def leak(x: int) -> int:
    """~2 ms of work that keeps 10 MB per call, like a cache that is never cleared."""
    _LEAKED.append(bytearray(b"\x01") * LEAK_BYTES)  # filled, so it counts in RSS
    return spin(20_000) + x


def forget_leaks() -> None:
    """What the leaking workload kept in this process (serial and thread contenders)."""
    _LEAKED.clear()


# A per-process "model": what the initializer workload loads once per worker.
_MODEL: list[int] | None = None


def load_model() -> None:
    """The expensive per-worker initialization (~0.5 s), used as an ``initializer``."""
    global _MODEL
    time.sleep(INIT_S)
    _MODEL = [(i * 7919) % 101 for i in range(64)]


def reset_model() -> None:
    """Forget the model in this process, so every timed run pays the load again."""
    global _MODEL
    _MODEL = None


def predict(x: int) -> int:
    """~1 ms of work that needs the loaded model; fails loudly if it was not loaded."""
    model = _MODEL
    if model is None:
        raise RuntimeError("model not loaded: the initializer did not run in this worker")
    return spin(ITERS_PER_MS + x) + model[x % len(model)]


def predict_lazy(x: int) -> int:
    """:func:`predict` with a lazy module-level cache: the joblib/dask users' idiom."""
    if _MODEL is None:
        load_model()
    return predict(x)


# ---------------------------------------------------------------- inputs


def _is_probable_prime(n: int) -> bool:
    # Deterministic Miller-Rabin for n < 3.3e24: finds the test primes in
    # microseconds, so making the inputs costs nothing next to checking them.
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _primes_from(start: int, count: int) -> list[int]:
    found: list[int] = []
    n = start | 1
    while len(found) < count:
        if _is_probable_prime(n):
            found.append(n)
        n += 2
    return found


def _prime_items(n: int, _base: str) -> list[int]:
    # Three primes near 1e12 (each a full trial division to ~1e6), then one
    # product of two primes near 1e6 (as expensive, answer False), repeated.
    primes = _primes_from(10**12, n)
    factors = _primes_from(10**6, 2 * n)
    items: list[int] = []
    for i in range(n):
        items.append(primes[i] if i % 4 != 3 else factors[2 * i] * factors[2 * i + 1])
    return items


def _range_items(n: int, _base: str) -> list[int]:
    return list(range(n))


def _cpu_items(n: int, _base: str) -> list[int]:
    return [5 * ITERS_PER_MS + i for i in range(n)]


def _heavy_tail_items(n: int, _base: str) -> list[int]:
    # Lognormal item costs, median 2 ms, sigma 1.3 (mean ~4.6 ms, a few items
    # 20-50x the median), capped at 100 x median; seeded, so every run and
    # every contender gets the same list.
    rng = random.Random(20240611)
    median_iters = 2 * ITERS_PER_MS
    cap = 100 * median_iters
    return [min(cap, int(median_iters * rng.lognormvariate(0.0, 1.3))) + i for i in range(n)]


def _url_items(n: int, base: str) -> list[str]:
    return [f"{base}/item/{i}" for i in range(n)]


def _shared_array_items(n: int, _base: str) -> list[np.ndarray[Any, Any]]:
    shared = np.random.default_rng(11).standard_normal(SHARED_FLOATS)
    return [shared] * n  # one object, n times: what "the same big array per item" means


def _big_arg_items(n: int, _base: str) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal(BIG_ARG_FLOATS) for _ in range(n)]


# ---------------------------------------------------------------- comparison


def _equal(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return list(a) == list(b)


def _close(a: Sequence[Any], b: Sequence[Any]) -> bool:
    # BLAS thread counts change the summation order, so floats may differ in
    # the last bits between contenders; anything beyond that is a real error.
    return len(a) == len(b) and all(
        isinstance(x, float) and math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b, strict=True)
    )


@contextmanager
def _no_setup() -> Iterator[str]:
    yield ""


@contextmanager
def _http_setup() -> Iterator[str]:
    with httpserver.serve(SLEEP_S) as url:
        yield url


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Workload:
    """One benchmark job: a function, how to make its inputs, and how to check results."""

    name: str
    """Short id used on the command line and in the results (``--only``)."""
    title: str
    """Column header in the tables."""
    description: str
    """One sentence for the report."""
    kind: str
    """``cpu``, ``trivial``, ``io``, ``numpy``, ``data`` or ``init``."""
    fn: Callable[[Any], Any]
    """The function every contender maps over the items."""
    make_items: Callable[[int, str], list[Any]]
    """``(n, base) -> items``; ``base`` is what ``setup`` yielded (the server URL)."""
    n_default: int
    """Number of items in a default run."""
    n_quick: int
    """Number of items in a ``--quick`` run."""
    afn: Callable[[Any], Any] | None = None
    """Coroutine-function variant, for the asyncio contenders; None = not applicable."""
    initializer: Callable[[], None] | None = None
    """Per-worker initializer, for pools that take one."""
    lazy_fn: Callable[[Any], Any] | None = None
    """``fn`` with a lazy module-level cache instead of an initializer (joblib, dask)."""
    reset: Callable[[], None] | None = None
    """Clears what the initializer left in the parent, before and after each run."""
    setup: Callable[[], AbstractContextManager[str]] = _no_setup
    """Context around the whole workload (starts the HTTP server); yields ``base``."""
    same: Callable[[Sequence[Any], Sequence[Any]], bool] = _equal
    """Whether a contender's results equal the serial loop's."""
    sweep: bool = False
    """Part of the worker-count sweep (CPU-bound workloads)."""

    def size(self, quick: bool) -> int:
        """Items in a run of the given mode."""
        return self.n_quick if quick else self.n_default


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            name="primes",
            title="primes",
            description="Trial-division primality of 13-digit numbers (3 primes : 1 "
            "semiprime), ~45 ms of pure Python each: the classic exercise.",
            kind="cpu",
            fn=is_prime,
            make_items=_prime_items,
            n_default=32,
            n_quick=8,
            sweep=True,
        ),
        Workload(
            name="trivial",
            title="trivial x+1",
            description="x + 1 over a range: nothing but per-item overhead.",
            kind="trivial",
            fn=add_one,
            make_items=_range_items,
            n_default=200_000,
            n_quick=10_000,
        ),
        Workload(
            name="cpu5ms",
            title="CPU 5 ms",
            description="Pure-Python loop of ~5 ms per item (holds the GIL).",
            kind="cpu",
            fn=spin,
            make_items=_cpu_items,
            n_default=400,
            n_quick=40,
            sweep=True,
        ),
        Workload(
            name="heavytail",
            title="heavy-tailed CPU",
            description="Pure-Python items with lognormal cost (median 2 ms, sigma 1.3, "
            "seeded): stresses load balancing and chunking.",
            kind="cpu",
            fn=spin,
            make_items=_heavy_tail_items,
            n_default=300,
            n_quick=40,
        ),
        Workload(
            name="sleep",
            title="sleep 20 ms",
            description="time.sleep(0.02) per item (asyncio.sleep in the coroutine variant).",
            kind="io",
            fn=sleep_20ms,
            make_items=_range_items,
            n_default=400,
            n_quick=40,
            afn=asleep_20ms,
        ),
        Workload(
            name="http",
            title="HTTP 20 ms",
            description="urllib GET to a local threaded server (its own process) that "
            "answers after 20 ms (raw asyncio streams in the coroutine variant).",
            kind="io",
            fn=fetch,
            make_items=_url_items,
            n_default=400,
            n_quick=40,
            afn=afetch,
            setup=_http_setup,
        ),
        Workload(
            name="numpy",
            title="numpy SVD",
            description=f"np.linalg.svd of a seeded {SVD_N}x{SVD_N} matrix: BLAS threads "
            "inside each worker (oversubscription shows here).",
            kind="numpy",
            fn=svd_sum,
            make_items=_range_items,
            n_default=64,
            n_quick=8,
            same=_close,
        ),
        Workload(
            name="bigarg",
            title="1 MB args",
            description="Sum of a 1 MB float64 array per item: the cost of moving arguments.",
            kind="data",
            fn=array_sum,
            make_items=_big_arg_items,
            n_default=200,
            n_quick=20,
            same=_close,
        ),
        Workload(
            name="shared16mb",
            title="16 MB x 40",
            description="Sum of the same 16 MB float64 array passed to every item: "
            "how often a shared argument is copied.",
            kind="data",
            fn=array_sum,
            make_items=_shared_array_items,
            n_default=40,
            n_quick=8,
            same=_close,
        ),
        Workload(
            name="bigresult",
            title="1 MB results",
            description="Each item returns 1 MB of bytes: the cost of moving results back.",
            kind="data",
            fn=megabyte,
            make_items=_range_items,
            n_default=200,
            n_quick=20,
        ),
        Workload(
            name="leak",
            title="leaking fn",
            description="~2 ms items that each keep 10 MB for good (a cache never "
            "cleared): workers grow until recycled.",
            kind="data",
            fn=leak,
            make_items=_range_items,
            n_default=60,
            n_quick=10,
            reset=forget_leaks,
        ),
        Workload(
            name="init",
            title="0.5 s init",
            description="~1 ms items that need a 'model' loaded once per worker "
            "(0.5 s sleep): initializer where the pool has one, lazy cache otherwise.",
            kind="init",
            fn=predict,
            make_items=_range_items,
            n_default=200,
            n_quick=40,
            initializer=load_model,
            lazy_fn=predict_lazy,
            reset=reset_model,
        ),
    ]
}
"""All workloads, in report order."""

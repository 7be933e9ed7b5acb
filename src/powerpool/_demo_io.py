"""``powerpool demo --work io``: the other half of the classic exercise.

Fetch a list of URLs from a slow "remote" service five ways: sequentially,
with threads, with asyncio, with processes and with ``auto``; then say why
each took as long as it did. The lesson is the mirror image of the primes:
a request spends its time *waiting* for the server, and waiting releases the
GIL, so threads overlap the waits on one core, an event loop overlaps
thousands of them on one thread, and processes add only their start-up.

The service is a local HTTP server (:func:`serve`), started in its own process
on 127.0.0.1 (port 0: the OS picks a free one; no internet is needed) and
stopped by its pid at the end. It holds every answer back ``DELAY_S`` and
answers ``/square/N`` with N*N, so every fetched answer is checked. It is an
asyncio server: one thread serves every connection at once, so the server
itself never limits how many requests overlap (and in its own process it
takes no GIL from the clients being timed).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ._demo import DemoRow, Size, format_demo, python_version, why_auto

if TYPE_CHECKING:
    from ._plan import Plan

__all__ = [
    "DELAY_S",
    "IoDemoReport",
    "afetch",
    "fetch",
    "format_io_report",
    "run_io_demo",
    "serve",
]

DELAY_S = 0.02
"""How long the server holds each answer back: a typical fast API's latency.
Longer makes the lesson starker and the sequential row slower (n x delay)."""
REQUESTS = {"small": 100, "full": 400}
"""Requests per size: ``small`` runs sequentially in ~2 s, the rest in well under one."""
THREADS = 32
"""Threads (and, for the comparison, processes): ``ThreadPoolExecutor``'s
default cap. Enough to overlap 32 waits; the asyncio row shows the far end
(every request in flight at once)."""
FETCH_TIMEOUT_S = 30.0
"""A request's socket timeout: generous (a loaded machine), but a dead server
fails the demo instead of hanging it."""
SERVER_START_S = 30.0
"""How long to wait for the server process to print its address."""
_BACKLOG = 1024
"""Pending connections the server's socket queues: the default (100) drops
SYNs when every asyncio request connects at once, and a dropped SYN is
retried a whole second later, which would time the kernel, not the backend."""


# --------------------------------------------------------------------------- the clients


def fetch(url: str) -> int:
    """GET ``url`` (``.../square/N``) with the standard library; the answer, N*N."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=FETCH_TIMEOUT_S)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"GET {url}: HTTP {response.status} {body[:80]!r}")
    return int(body)


async def afetch(url: str) -> int:
    """The same request with asyncio streams: the wait is an ``await``, not a blocked thread."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, parts.port), FETCH_TIMEOUT_S
    )
    try:
        writer.write(f"GET {parts.path} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), FETCH_TIMEOUT_S)  # HTTP/1.0: until close
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b"?"
    if status != b"200":
        raise OSError(f"GET {url}: HTTP {status.decode(errors='replace')} {body[:80]!r}")
    return int(body)


# --------------------------------------------------------------------------- the server


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        request = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # headers: not needed
        await asyncio.sleep(delay)
        parts = request.split()
        path = parts[1].decode() if len(parts) > 1 else ""
        name, _, arg = path.strip("/").partition("/")
        if name == "square" and arg.isdigit():
            status, body = "200 OK", str(int(arg) ** 2).encode()
        else:
            status, body = "404 Not Found", b"try /square/N"
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the client went away: nothing to answer
    finally:
        writer.close()


async def _serve_until_stdin_closes(delay: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _answer(r, w, delay), "127.0.0.1", 0, backlog=_BACKLOG
    )
    host, port = server.sockets[0].getsockname()[:2]
    print(f"http://{host}:{port}", flush=True)
    async with server:
        # Serve until the parent closes our stdin (or dies): no orphan server.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


@contextlib.contextmanager
def serve(delay_s: float = DELAY_S) -> Iterator[str]:
    """Run the slow server in a child process for the ``with`` block; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "powerpool._demo_io", "--serve", str(delay_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield _read_url(proc)
    finally:
        # Stopped by its pid; the closed stdin stops it too if we die first.
        proc.terminate()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _read_url(proc: subprocess.Popen[str]) -> str:
    line: list[str] = []
    reader = threading.Thread(
        target=lambda: line.append(proc.stdout.readline() if proc.stdout else ""),
        name="powerpool-demo-server-url",
        daemon=True,
    )
    reader.start()
    reader.join(SERVER_START_S)
    url = line[0].strip() if line else ""
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"the demo's HTTP server did not start (it printed {url!r})")
    return url


# --------------------------------------------------------------------------- the demo


@dataclass(frozen=True)
class IoDemoReport:
    """The I/O demo, ready to print or to dump as JSON."""

    size: str
    """``small`` or ``full``."""
    n_requests: int
    """How many URLs were fetched (per row)."""
    delay_s: float
    """Seconds the server held back each answer."""
    cpu_count: int
    """Cores this process may use."""
    python: str
    """Python implementation and version, with the GIL's state."""
    rows: tuple[DemoRow, ...]
    """Sequential, threads, asyncio, processes, auto: in that order."""

    @property
    def all_agree(self) -> bool:
        """Every row fetched every right answer."""
        return all(row.agree for row in self.rows)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``--json``."""
        return {**asdict(self), "all_agree": self.all_agree}


def run_io_demo(size: Size = "small", *, delay_s: float = DELAY_S) -> IoDemoReport:
    """Fetch ``REQUESTS[size]`` URLs from a local slow server five ways; what was measured."""
    import powerpool as pp

    from ._options import backend_name
    from ._system import usable_cores

    n = REQUESTS[size]
    cores = usable_cores()
    truth = [i * i for i in range(n)]

    cpu: dict[str, float] = {}  # this process's CPU seconds / wall seconds, per backend

    def timed(
        backend: str, workers: int | None, fn: Any, urls: list[str]
    ) -> tuple[float, list[int], Plan | None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        with pp.Pool(backend_name(backend), workers=workers, progress=False) as pool:
            results = pool.map(fn, urls)
            plan = pool.last_plan
        wall = time.perf_counter() - start
        cpu[backend] = (time.process_time() - cpu_start) / wall
        return wall, results, plan

    rows: list[DemoRow] = []
    with serve(delay_s) as base:
        urls = [f"{base}/square/{i}" for i in range(n)]
        fetch(urls[0])  # the server is up and answering before anything is timed
        base_s, results, _ = timed("serial", None, fetch, urls)
        rows.append(
            DemoRow("sequential", "serial", 1, base_s, 1.0, results == truth,
                    _why_sequential(n, base_s, delay_s, cpu["serial"]))
        )  # fmt: skip
        threads_s, results, _ = timed("threads", THREADS, fetch, urls)
        rows.append(
            DemoRow("threads", "threads", THREADS, threads_s, base_s / threads_s,
                    results == truth, _why_threads(n, threads_s, delay_s, cpu["threads"]))
        )  # fmt: skip
        async_s, results, _ = timed("asyncio", n, afetch, urls)
        rows.append(
            DemoRow("asyncio", "asyncio", n, async_s, base_s / async_s, results == truth,
                    _why_asyncio(n, delay_s, cpu["asyncio"]))
        )  # fmt: skip
        procs_s, results, _ = timed("processes", THREADS, fetch, urls)
        rows.append(
            DemoRow("processes", "processes", THREADS, procs_s, base_s / procs_s,
                    results == truth, _why_processes(procs_s, threads_s, cores))
        )  # fmt: skip
        auto_s, results, plan = timed("auto", None, fetch, urls)
        rows.append(
            DemoRow("auto", plan.backend if plan else "?", plan.workers if plan else 0, auto_s,
                    base_s / auto_s, results == truth, why_auto(plan, "the first request"))
        )  # fmt: skip
    return IoDemoReport(
        size=size,
        n_requests=n,
        delay_s=delay_s,
        cpu_count=cores,
        python=python_version(),
        rows=tuple(rows),
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def _why_sequential(n: int, wall_s: float, delay_s: float, cpu_share: float) -> str:
    return (
        f"the baseline: one request at a time, {n} x {_ms(delay_s)} of waiting = "
        f"{n * delay_s:.2f}s of the {wall_s:.2f}s; the CPU was busy {cpu_share:.0%} of it"
    )


def _why_threads(n: int, wall_s: float, delay_s: float, cpu_share: float) -> str:
    rounds = -(-n // THREADS)
    return (
        f"a thread waiting on a socket releases the GIL, so {THREADS} threads overlapped "
        f"their waits: {rounds} rounds of {_ms(delay_s)} = {_ms(rounds * delay_s)} at best, "
        f"{_ms(wall_s)} here, using {cpu_share:.0%} of one core"
    )


def _why_asyncio(n: int, delay_s: float, cpu_share: float) -> str:
    return (
        f"one thread, one event loop: all {n} requests waited at once (each await lets "
        f"another run; ~{_ms(delay_s)} at best) using {cpu_share:.0%} of one core and no "
        f"thread per wait, which is how one loop carries thousands"
    )


def _why_processes(wall_s: float, threads_s: float, cores: int) -> str:
    verdict = (
        f"{wall_s / threads_s:.1f}x the threads' time"
        if wall_s > threads_s
        else "no better than threads"
    )
    return (
        f"{verdict}: the same {THREADS} overlapping waits, plus starting {THREADS} "
        f"interpreters on {cores} core(s) and pickling every URL and answer; "
        f"waiting needs no extra cores, so processes pay start-up for nothing"
    )


def format_io_report(report: IoDemoReport) -> str:
    """The table ``powerpool demo --work io`` prints, then one line per row saying why."""
    headline = (
        f"Fetch {report.n_requests} URLs from a local server that takes "
        f"{_ms(report.delay_s)} to answer each (I/O-bound: the time is waiting)"
    )
    return format_demo(headline, report.cpu_count, report.python, report.rows)


def _main(argv: list[str]) -> int:
    """``python -m powerpool._demo_io --serve DELAY``: the server process."""
    if len(argv) != 2 or argv[0] != "--serve":
        print("usage: python -m powerpool._demo_io --serve DELAY_S", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_stdin_closes(float(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""A local HTTP server that answers every GET after a fixed delay.

It stands in for a slow remote API so the I/O-bound workloads measure waiting,
not the network: it binds to 127.0.0.1 on a free port and serves each request
on its own thread (so N concurrent clients wait ~delay, not N x delay).

The suite runs it in a child process (:func:`serve`): in the benchmark's own
process its 400 handler threads would compete for the GIL with the very
threads being measured. ``python -m benchmarks.httpserver`` runs it in the
foreground and prints its URL on the first line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["DELAY_S", "PROTECTED_PIDS", "SlowServer", "main", "serve"]

DELAY_S = 0.020
"""How long each answer is held back: the "latency" of the fake remote service."""

# The listen backlog: the stdlib default of 5 makes the kernel drop SYNs as soon
# as more clients than that connect at once, and a dropped SYN is retried after
# a full second, which would measure the kernel's retry timer instead of the
# pool. 1024 covers the 400 concurrent requests the asyncio contenders make.
_BACKLOG = 1024

_START_TIMEOUT_S = 30.0
"""How long :func:`serve` waits for the child to print its URL."""

PROTECTED_PIDS: set[int] = set()
"""Child processes that are the suite's own (the server), which the runner's
watchdog must not kill when it clears a hung pool's workers."""


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, which is what urllib.request does.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        delay_s: float = getattr(self.server, "delay_s", DELAY_S)
        time.sleep(delay_s)
        body = f"ok {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # One log line per request would flood the benchmark's output.
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = _BACKLOG
    delay_s = DELAY_S


class SlowServer:
    """A server running on a thread of this process; ``url`` has no trailing slash."""

    def __init__(self, delay_s: float = DELAY_S) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.delay_s = delay_s
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="benchmarks-httpserver",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving, close the socket and join the serving thread (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()


@contextmanager
def serve(delay_s: float = DELAY_S) -> Iterator[str]:
    """Run the server in a child process for the ``with`` block; yields its URL."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.httpserver", "--delay-s", str(delay_s)],
        cwd=root,
        stdin=subprocess.PIPE,  # the child exits when this pipe closes
        stdout=subprocess.PIPE,
        text=True,
    )
    PROTECTED_PIDS.add(proc.pid)
    try:
        assert proc.stdout is not None
        url = _read_url(proc)
        yield url
    finally:
        PROTECTED_PIDS.discard(proc.pid)
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _read_url(proc: subprocess.Popen[str]) -> str:
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.append(proc.stdout.readline() if proc.stdout else ""),
        daemon=True,
    )
    reader.start()
    reader.join(_START_TIMEOUT_S)
    line = result[0].strip() if result else ""
    if not line.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"benchmark HTTP server did not start (got {line!r})")
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until standard input closes (the parent's exit or ``serve()``'s end)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.httpserver")
    parser.add_argument("--delay-s", type=float, default=DELAY_S)
    args = parser.parse_args(argv)
    server = SlowServer(args.delay_s)
    print(server.url, flush=True)
    try:
        sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

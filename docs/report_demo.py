"""The run behind docs/report.png and docs/report-example.html.

Skewed pure-Python items (two of them ten times the rest), one item that
fails once and is retried, and two warnings logged inside worker processes:

    python docs/report_demo.py      # writes report.html here
"""

import logging
import os
import tempfile

import powerpool as pp

FLAKED = os.path.join(tempfile.gettempdir(), "powerpool-report-demo-flaked")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def count_primes(spec: tuple[int, int]) -> int:
    index, size = spec
    if index == 42 and not os.path.exists(FLAKED):
        open(FLAKED, "w").close()
        raise ConnectionError("flaky input 42")
    if size > 60_000:
        logging.getLogger("demo").warning("item %d is a big one (%d)", index, size)
    return sum(is_prime(n) for n in range(size))


if __name__ == "__main__":
    if os.path.exists(FLAKED):
        os.remove(FLAKED)
    sizes = [(i, 90_000 if i in (17, 77) else 6_000 + (i * 977) % 20_000) for i in range(120)]
    with pp.Pool(retries=1) as pool:
        pool.map(count_primes, sizes, report="report.html")
        print(pool.last_report)

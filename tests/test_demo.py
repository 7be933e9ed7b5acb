"""``powerpool demo``: the prime checker, its built-in numbers, and the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from powerpool._demo import expected, is_prime, numbers

pytestmark = pytest.mark.timeout(120)


def miller_rabin(n: int) -> bool:
    """Deterministic for n < 3.3e24 with these bases: an independent check of is_prime."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_is_prime_agrees_with_miller_rabin_on_small_numbers() -> None:
    assert [n for n in range(3000) if is_prime(n)] == [n for n in range(3000) if miller_rabin(n)]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 25, 49, 121, 169, 997 * 997, 999983 * 1000003])
def test_is_prime_edge_cases(n: int) -> None:
    assert is_prime(n) is miller_rabin(n)


@pytest.mark.parametrize("size", ["small", "full"])
def test_built_in_numbers_are_large_and_their_answers_right(size: str) -> None:
    data = numbers(size)  # type: ignore[arg-type]
    truth = expected(size)  # type: ignore[arg-type]
    assert len(data) == len(set(data)) == len(truth) == (24 if size == "small" else 48)
    assert truth == [miller_rabin(n) for n in data]
    assert 0 < sum(truth) < len(truth)  # a mix of primes and composites
    assert all(n > 9 * 10**11 for n in data)
    # Composites have only large factors, so each check costs about as much as a prime's.
    assert not any(n % p == 0 for n in data for p in range(2, 5000))


def test_demo_command_prints_every_row_and_agrees(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "powerpool", "demo", "--size", "small", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for mode in ("sequential", "threads", "processes", "auto"):
        assert f"\n{mode} " in proc.stdout
    assert "same, right answers" in proc.stdout
    assert "GIL" in proc.stdout
    data = json.loads(out.read_text())
    assert data["all_agree"] is True
    assert [row["mode"] for row in data["rows"]] == ["sequential", "threads", "processes", "auto"]
    assert data["n_numbers"] == 24
    assert all(row["wall_s"] > 0 for row in data["rows"])


def test_demo_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "powerpool", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0
    assert "--size" in proc.stdout

"""``powerpool bench``'s model fitting and reporting (pure functions, no pools)."""

from __future__ import annotations

import math
import sys

import pytest

from powerpool._cli.bench import (
    PLOT_INSTALL_HINT,
    BenchReport,
    BenchRow,
    default_workers_list,
    fit_amdahl,
    fit_usl,
    require_matplotlib,
)
from powerpool._cli.inputs import InputError


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_amdahl_recovers_the_parallel_fraction(p: float) -> None:
    points = [(n, 1.0 / ((1 - p) + p / n)) for n in (1, 2, 4, 8, 16)]
    fit = fit_amdahl(points)
    assert fit.parallel_fraction == pytest.approx(p, abs=1e-4)
    assert fit.rmse == pytest.approx(0.0, abs=1e-3)


def test_amdahl_clamps_slowdowns_to_no_parallelism() -> None:
    # Threads on pure-Python CPU work: slower with more workers.
    fit = fit_amdahl([(1, 0.98), (2, 0.9), (4, 0.85)])
    assert fit.parallel_fraction == pytest.approx(0.0, abs=1e-6)
    assert fit.max_speedup == pytest.approx(1.0)


def test_amdahl_limits() -> None:
    fit = fit_amdahl([(n, float(n)) for n in (1, 2, 4)])
    assert math.isinf(fit.max_speedup)
    assert fit.speedup(8) == pytest.approx(8.0, rel=1e-3)


def test_usl_recovers_contention_and_coherency() -> None:
    a, b = 0.05, 0.002
    points = [(n, n / (1 + a * (n - 1) + b * n * (n - 1))) for n in (1, 2, 4, 8, 16, 32)]
    fit = fit_usl(points)
    assert fit.contention == pytest.approx(a, rel=1e-6)
    assert fit.coherency == pytest.approx(b, rel=1e-6)
    assert fit.peak_workers == pytest.approx(math.sqrt((1 - a) / b))


def test_usl_keeps_coefficients_non_negative() -> None:
    superlinear = [(1, 1.0), (2, 2.1), (4, 4.5)]
    fit = fit_usl(superlinear)
    assert fit.contention >= 0
    assert fit.coherency >= 0
    assert fit_usl([(1, 1.0)]).peak_workers is None  # nothing to fit


def test_default_workers_list() -> None:
    assert default_workers_list(1) == [1]
    assert default_workers_list(2) == [1, 2]
    assert default_workers_list(12) == [1, 2, 4, 8, 12]
    assert default_workers_list(16) == [1, 2, 4, 8, 16]


def test_report_json_has_no_infinities() -> None:
    rows = (
        BenchRow("serial", 1, 1.0, 1.0, 1.0, True),
        BenchRow("processes", 2, 0.5, 2.0, 1.0, True),
    )
    from powerpool._cli.bench import _fit_backend

    report = BenchReport("m:f", 10, 2, False, 1.0, rows, (_fit_backend("processes", rows[1:]),))
    data = report.to_json()
    assert data["fits"][0]["amdahl"]["max_speedup"] is None
    assert data["best"] == {"backend": "processes", "workers": 2, "wall_s": 0.5}
    assert data["all_agree"] is True


def test_plot_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(InputError, match=r"pip install 'powerpool\[plot\]'"):
        require_matplotlib()
    assert "matplotlib" in PLOT_INSTALL_HINT

"""Results framed on the wire: one bad result fails its item, never its chunk.

The framing (``_backends/_wire.py``) is shared by every out-of-process
backend, so each test runs on the process engine and on a Dask cluster.
"""

from __future__ import annotations

import importlib.util
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import fault_helpers as fh
import powerpool as pp
from dask_cluster import DaskTestCluster, dask_helper_threads  # noqa: F401
from powerpool import SerializationError
from powerpool._backends._wire import FRAMED, OUTCOMES, VALUES, ShippedError, decode, encode

pytestmark = pytest.mark.timeout(120)

ITEMS = list(range(20))


@pytest.fixture(scope="session")
def cluster_if_installed(request: pytest.FixtureRequest) -> DaskTestCluster | None:
    """The session's dask cluster, started before any test's leak check counts
    processes (session fixtures are set up first); None without distributed."""
    if importlib.util.find_spec("distributed") is None:
        return None
    request.getfixturevalue("dask_helper_threads")
    cluster: DaskTestCluster = request.getfixturevalue("dask_cluster")
    return cluster


@pytest.fixture(params=["processes", "dask"])
def pool(
    request: pytest.FixtureRequest, cluster_if_installed: DaskTestCluster | None
) -> Iterator[pp.Pool]:
    if request.param == "dask":
        if cluster_if_installed is None:
            pytest.skip("distributed is not installed")
        made = pp.Pool("dask", address=cluster_if_installed.address, progress=False)
    else:
        made = pp.Pool("processes", workers=2, progress=False)
    with made:
        yield made


def _kind(blob: bytes) -> str:
    kind: str = pickle.loads(blob)[0]
    return kind


# -- the framing itself ---------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        list(range(100)),
        [1.5, "a", b"b", None, True, 2j],
        [(i, str(i)) for i in range(10)],
        [[i, None] for i in range(10)],
        [{"key": i, "other": "x"} for i in range(10)],
    ],
    ids=["ints", "scalars", "pairs", "lists", "dicts"],
)
def test_plain_data_travels_as_one_pickle(values: list[Any]) -> None:
    blob = encode(VALUES, values)
    assert _kind(blob) == VALUES
    assert decode(blob, len(values)) == (None, values)


def test_objects_that_load_travel_as_one_pickle() -> None:
    import fractions

    values = [fractions.Fraction(i, 3) for i in range(10)]
    blob = encode(VALUES, values)
    assert _kind(blob) == VALUES
    assert decode(blob, 10) == (None, values)


def test_classes_that_loaded_once_are_trusted_and_bad_ones_never() -> None:
    import decimal

    from powerpool._backends import _wire

    values = [decimal.Decimal(i) for i in range(5)]
    _wire._TRUSTED.discard(decimal.Decimal)
    assert _wire._checked(VALUES, values) == {decimal.Decimal}
    assert _kind(encode(VALUES, values)) == VALUES
    assert _wire._checked(VALUES, values) is None  # trusted from now on
    assert _wire._checked(VALUES, [(1, values[0])]) == {tuple}  # containers: always checked
    bad: list[Any] = [fh.TwoArgError(1, "x")]
    for _ in range(2):
        assert _kind(encode(VALUES, bad)) == FRAMED
    assert fh.TwoArgError not in _wire._TRUSTED


def test_a_result_that_will_not_load_again_is_framed_and_fails_alone() -> None:
    values: list[Any] = [1, fh.TwoArgError(2, "as a result"), (3, [4])]
    blob = encode(VALUES, values)
    assert _kind(blob) == FRAMED
    outcomes, got = decode(blob, 3)
    assert got is None
    assert outcomes is not None
    assert outcomes[0] == (True, 1)
    assert outcomes[2] == (True, (3, [4]))
    ok, error = outcomes[1]
    assert not ok
    assert isinstance(error, SerializationError)
    assert "could not be unpickled here" in str(error)
    assert "TypeError" in str(error)


def test_a_result_that_will_not_pickle_fails_alone() -> None:
    blob = encode(VALUES, [1, threading.Lock(), 3])
    outcomes, _ = decode(blob, 3)
    assert outcomes is not None
    assert outcomes[0] == (True, 1)
    assert outcomes[2] == (True, 3)
    assert isinstance(outcomes[1][1], SerializationError)
    assert "could not be pickled to send it back" in str(outcomes[1][1])


def test_outcomes_keep_their_errors_beside_an_unloadable_result() -> None:
    raised = ShippedError(ValueError("boom"))
    blob = encode(OUTCOMES, [(False, raised), (True, fh.TwoArgError(1, "x")), (True, 5)])
    assert _kind(blob) == FRAMED
    outcomes, _ = decode(blob, 3)
    assert outcomes is not None
    ok, error = outcomes[0]
    assert not ok
    assert isinstance(error, ValueError)
    assert str(error) == "boom"
    assert error.__cause__ is not None  # the worker's traceback
    assert not outcomes[1][0]
    assert isinstance(outcomes[1][1], SerializationError)
    assert outcomes[2] == (True, 5)


def test_a_message_that_does_not_load_fails_every_item_of_its_chunk() -> None:
    outcomes, _ = decode(b"not a pickle", 4)
    assert outcomes is not None
    assert len(outcomes) == 4
    assert all(not ok and isinstance(e, SerializationError) for ok, e in outcomes)


# -- through a pool, on every out-of-process backend --------------------------------


def test_result_that_fails_to_unpickle_fails_alone(pool: pp.Pool) -> None:
    results = pool.map(fh.return_two_arg_error, ITEMS, chunksize=8, errors="return")
    assert isinstance(results[fh.BAD], SerializationError), results
    assert [r for i, r in enumerate(results) if i != fh.BAD] == [
        x * x for x in ITEMS if x != fh.BAD
    ]


def test_unpicklable_result_fails_alone(pool: pp.Pool) -> None:
    results = pool.map(fh.return_lock, ITEMS, chunksize=8, errors="return")
    assert isinstance(results[fh.BAD], SerializationError), results
    assert "pickle" in str(results[fh.BAD])
    assert [r for i, r in enumerate(results) if i != fh.BAD] == [
        x * x for x in ITEMS if x != fh.BAD
    ]


def test_unloadable_result_beside_a_raising_item(pool: pp.Pool) -> None:
    results = pool.map(fh.return_two_arg_error_or_raise, ITEMS, chunksize=10, errors="return")
    assert isinstance(results[fh.BAD], SerializationError), results
    assert isinstance(results[fh.BAD + 1], fh.CustomError), results
    rest = [r for i, r in enumerate(results) if i not in (fh.BAD, fh.BAD + 1)]
    assert rest == [x * x for x in ITEMS if x not in (fh.BAD, fh.BAD + 1)]


def test_arrays_survive_the_framing(pool: pp.Pool) -> None:
    np = pytest.importorskip("numpy")
    results = pool.map(fh.array_or_two_arg_error, ITEMS, chunksize=10, errors="return")
    assert isinstance(results[fh.BAD], SerializationError)
    for i, result in enumerate(results):
        if i != fh.BAD:
            assert np.array_equal(result, np.arange(i))
            assert result.flags.writeable

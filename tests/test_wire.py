"""Results framed on the wire: one bad result fails its item, never its chunk.

The framing (``_backends/_wire.py``) is shared by every out-of-process
backend, so each test runs on the process engine and on a Dask cluster.
"""

from __future__ import annotations

import io
import pickle
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import fault_helpers as fh
import powerpool as pp
from dask_cluster import DaskTestCluster
from powerpool import SerializationError
from powerpool._backends._wire import (
    FRAMED,
    OUTCOMES,
    VALUES,
    SalvagingUnpickler,
    ShippedError,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(120)

ITEMS = list(range(20))


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
    kind: str = SalvagingUnpickler(io.BytesIO(blob)).load()[0]  # loads what loads
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


def test_a_result_that_will_not_load_again_fails_alone() -> None:
    values: list[Any] = [1, fh.TwoArgError(2, "as a result"), (3, [4])]
    blob = encode(VALUES, values)
    assert _kind(blob) == VALUES  # one pickle: the caller salvages what loads
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
    assert _kind(blob) == FRAMED
    outcomes, _ = decode(blob, 3)
    assert outcomes is not None
    assert outcomes[0] == (True, 1)
    assert outcomes[2] == (True, 3)
    assert isinstance(outcomes[1][1], SerializationError)
    assert "could not be pickled to send it back" in str(outcomes[1][1])


def test_outcomes_keep_their_errors_beside_an_unloadable_result() -> None:
    raised = ShippedError(ValueError("boom"))
    blob = encode(OUTCOMES, [(False, raised), (True, fh.TwoArgError(1, "x")), (True, 5)])
    assert _kind(blob) == OUTCOMES
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


_GONE_SOURCE = """
class Thing:
    def __init__(self, x):
        self.x = x

class Items(list):
    pass

class Table(dict):
    pass

class Bag(set):
    pass

class Slotted:
    __slots__ = ("x",)

    def __init__(self, x):
        self.x = x
"""


class _RefusesState:
    """Loads until its state is set."""

    def __init__(self) -> None:
        self.x = 1

    def __setstate__(self, state: Any) -> None:
        raise ValueError("no state wanted")


def test_every_way_a_value_fails_to_load_fails_only_the_items_holding_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fractions
    import types

    gone = types.ModuleType("powerpool_test_gone")
    exec(_GONE_SOURCE, gone.__dict__)
    monkeypatch.setitem(sys.modules, "powerpool_test_gone", gone)
    shared = [1, 2]
    values: list[Any] = [
        fractions.Fraction(1, 3),
        gone.Thing(1),  # the class is gone (GLOBAL)
        (shared, {"deep": [gone.Thing(2)]}),  # deep inside containers
        gone.Items([1, 2]),  # a list subclass (APPENDS onto the marker)
        gone.Table(a=1),  # a dict subclass (SETITEMS)
        gone.Bag({1}),  # a set subclass
        gone.Slotted(3),  # slots (BUILD's slot state)
        _RefusesState(),  # __setstate__ raises (BUILD)
        fh.TwoArgError(1, "x"),  # the constructor raises (REDUCE)
        shared,  # shares an object with a failed item: still fine
        {"ok": (1, "a")},
    ]
    blob = encode(VALUES, values)
    monkeypatch.delitem(sys.modules, "powerpool_test_gone")
    outcomes, _ = decode(blob, len(values))
    assert outcomes is not None
    failed = [i for i, (ok, _) in enumerate(outcomes) if not ok]
    assert failed == [1, 2, 3, 4, 5, 6, 7, 8]
    for i in failed[:6]:
        assert "powerpool_test_gone" in str(outcomes[i][1]), outcomes[i]
    assert "no state wanted" in str(outcomes[7][1])
    assert "TypeError" in str(outcomes[8][1])
    assert outcomes[0] == (True, fractions.Fraction(1, 3))
    assert outcomes[9] == (True, [1, 2])
    assert outcomes[10] == (True, {"ok": (1, "a")})


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


def test_a_class_only_the_worker_can_import_fails_only_its_item(pool: pp.Pool) -> None:
    assert fh.WORKER_ONLY_MODULE not in sys.modules
    results = pool.map(fh.return_worker_only_class, ITEMS, chunksize=8, errors="return")
    error = results[fh.BAD]
    assert isinstance(error, SerializationError), results
    assert "could not be unpickled here" in str(error)
    assert fh.WORKER_ONLY_MODULE in str(error)  # the original error: no such module here
    assert results[fh.BAD + 1] == ("neighbour", (fh.BAD + 1) ** 2)
    rest = [r for i, r in enumerate(results) if i not in (fh.BAD, fh.BAD + 1)]
    assert rest == [x * x for x in ITEMS if x not in (fh.BAD, fh.BAD + 1)]


def test_a_result_that_loads_in_workers_but_not_in_the_caller_fails_alone(
    pool: pp.Pool,
) -> None:
    results = pool.map(fh.return_loads_only_in_workers, ITEMS, chunksize=8, errors="return")
    assert isinstance(results[fh.BAD], SerializationError), results
    assert "loads only in a worker process" in str(results[fh.BAD])
    assert [r for i, r in enumerate(results) if i != fh.BAD] == [
        x * x for x in ITEMS if x != fh.BAD
    ]
    with pytest.raises(SerializationError, match="loads only in a worker"):
        pool.map(fh.return_loads_only_in_workers, ITEMS, chunksize=8)


def test_arrays_survive_the_framing(pool: pp.Pool) -> None:
    np = pytest.importorskip("numpy")
    results = pool.map(fh.array_or_two_arg_error, ITEMS, chunksize=10, errors="return")
    assert isinstance(results[fh.BAD], SerializationError)
    for i, result in enumerate(results):
        if i != fh.BAD:
            assert np.array_equal(result, np.arange(i))
            assert result.flags.writeable


@pytest.mark.parametrize(
    ("error", "attribute", "value"),
    [
        (SystemExit(4), "code", 4),
        (SystemExit("bye"), "code", "bye"),
        (StopIteration(7), "value", 7),
    ],
)
def test_errors_keep_what_their_init_derives_under_tblibs_pickler(
    error: BaseException, attribute: str, value: Any
) -> None:
    """distributed installs tblib's exception pickler, which rebuilds SystemExit and
    StopIteration without their __init__ (``code``/``value`` came back None)."""
    pickling_support = pytest.importorskip("tblib.pickling_support")
    blob = pickle.dumps(ShippedError(error, tb=""), pickle.HIGHEST_PROTOCOL)
    assert getattr(pickle.loads(blob), attribute) == value
    # Under tblib's reducer, whether or not this interpreter had installed it.
    reduced = pickling_support.pickle_exception(error)
    rebuilt = pickle.loads(pickle.dumps(ShippedError(reduced[0](*reduced[1]), tb="")))
    assert getattr(rebuilt, attribute) == value

"""The keys and errors the wrappers share (`planner.kinds.backend.freeze`, `own_error`): one of each,
used by the cache, coalescing and fusion alike (their own tests show each of them using it)."""

from __future__ import annotations

import datetime as dt
import decimal
import math
import uuid
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from planner.errors import FlowFileError, QueryError
from planner.kinds.backend import freeze, own_error

# --- freeze: equal keys exactly for parameters sent the same way ------------------------------


def same(a: Any, b: Any) -> bool:
    """Whether two bound parameters are sent (and come back) the same way, written without
    `freeze`: same types all the way down, and the wire's equality where Python's differs."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(same(ka, kb) and same(va, vb)
                                        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True))
    if isinstance(a, float):  # every NaN is sent as NaN; 0.0 and -0.0 are not one value
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, decimal.Decimal):  # its text keeps the scale (2.5, 2.50), the sign of 0 and NaN
        return str(a) == str(b)
    if isinstance(a, dt.datetime | dt.time):  # the wall clock and the offset it is in
        return bool(a.replace(tzinfo=None) == b.replace(tzinfo=None) and a.utcoffset() == b.utcoffset())
    return bool(a == b)


def _nan() -> float:
    return float("nan")  # a new object each time: no NaN equals another, not even itself


ZONES = st.sampled_from([None, dt.UTC, dt.timezone(dt.timedelta(hours=1)), dt.timezone(dt.timedelta(hours=1), "CET"),
                         dt.timezone(dt.timedelta(hours=-5))])
# Few distinct values of each type, so that equal and nearly equal pairs are common.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.0, -0.0, 1.0, 2.5, math.inf, -math.inf]) | st.builds(_nan),
    st.sampled_from(["1", "1.0", "2.5", "2.50", "0", "-0", "NaN", "sNaN", "-NaN", "Infinity"]).map(decimal.Decimal),
    st.sampled_from(["", "a", "1", "true"]),
    st.sampled_from([b"", b"a", b"1"]),
    st.sampled_from([uuid.UUID(int=0), uuid.UUID(int=1)]),
    st.builds(dt.datetime, st.just(2024), st.just(1), st.just(1), st.integers(0, 1), st.just(0), tzinfo=ZONES),
    st.builds(dt.time, st.integers(0, 1), tzinfo=ZONES),
    st.sampled_from([dt.date(2024, 1, 1), dt.date(2024, 1, 2), dt.timedelta(0), dt.timedelta(seconds=1)]),
)
params = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2),
), max_leaves=6)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(a=params, b=params)
@example(a=1, b=True)
@example(a=1, b=1.0)
@example(a=[0.0], b=[-0.0])
@example(a={"n": decimal.Decimal("2.5")}, b={"n": decimal.Decimal("2.50")})
@example(a=[_nan()], b=[_nan()])
@example(a={"a": 1, "b": 2}, b={"b": 2, "a": 1})  # a json parameter keeps its keys' order
@example(a=dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC),  # one instant, two offsets
         b=dt.datetime(2024, 1, 1, 13, tzinfo=dt.timezone(dt.timedelta(hours=1))))
@example(a=dt.time(10, tzinfo=dt.timezone(dt.timedelta(hours=1))),  # one offset, two names
         b=dt.time(10, tzinfo=dt.timezone(dt.timedelta(hours=1), "CET")))
def test_two_parameters_share_a_key_exactly_when_they_are_sent_the_same_way(a: Any, b: Any) -> None:
    shared = freeze(a) == freeze(b)
    assert shared == same(a, b)
    assert not shared or hash(freeze(a)) == hash(freeze(b))


# --- own_error: a copy per run that shares nothing that raising changes ------------------------


def test_an_errors_copy_keeps_its_message_attributes_and_cause() -> None:
    cause = ValueError("the driver's")
    error = QueryError("relation does not exist", sqlstate="42P01", transient=False, position=15)
    error.__cause__ = cause
    copied = own_error(error)
    assert copied is not error and type(copied) is QueryError
    assert (str(copied), copied.sqlstate, copied.position, copied.__cause__) == (str(error), "42P01", 15, cause)


def test_a_note_added_to_a_copy_is_not_added_to_the_original() -> None:
    error = QueryError("boom")
    error.add_note("first")
    copied = own_error(error)
    copied.add_note("second")
    assert error.__notes__ == ["first"] and copied.__notes__ == ["first", "second"]


def test_an_error_that_cannot_be_rebuilt_from_its_arguments_is_shared_as_it_is() -> None:
    error = FlowFileError("bad", file="f.yaml", line=3)  # its message is rendered from its keywords
    assert own_error(error) is error

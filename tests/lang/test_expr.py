"""The `when:` expression language: parsed by planner itself, never by Python."""

from __future__ import annotations

from typing import Any

import pytest

from planner.lang.expr import ExprSyntaxError, evaluate, parse, refs_of
from planner.lang.refs import Ref, Unresolved

VALUES: dict[str, Any] = {"inst": {"enabled": True, "n": 3, "tags": ["a", "b"]}, "dup": False, "name": "x", "none": None}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$inst.enabled", True),
        ("not $dup", True),
        ("$inst.n > 2 and $inst.n <= 3", True),
        ("$inst.n == 4 or $name == 'x'", True),
        ("$inst.n != 3", False),
        ("'a' in $inst.tags", True),
        ("'c' not in $inst.tags", True),
        ("$name in ['x', \"y\"]", True),
        ("not ($dup or $inst.n < 0)", True),
        ("$none == null", True),
        ("true and false", False),
        ("-1.5 < 0", True),
    ],
)
def test_expressions_evaluate(text: str, expected: Any) -> None:
    assert evaluate(parse(text), VALUES) == expected


def test_references_are_collected() -> None:
    assert refs_of(parse("$a.b and not $c or $d in [$e]")) == [Ref("a", ("b",)), Ref("c"), Ref("d"), Ref("e")]


@pytest.mark.parametrize(
    ("text", "column"),
    [
        pytest.param("$a and or $b", 7, id="double-operator"),
        pytest.param("($a", 3, id="unclosed-paren"),
        pytest.param("$a == ", 6, id="missing-operand"),
        pytest.param("__import__('os')", 0, id="python-call"),
        pytest.param("$a; drop", 2, id="semicolon"),
        pytest.param("$a.__class__ == 1 and x", 22, id="unknown-word"),
        pytest.param("lambda: 1", 0, id="lambda"),
    ],
)
def test_syntax_errors_point_at_the_column(text: str, column: int) -> None:
    with pytest.raises(ExprSyntaxError) as info:
        parse(text)
    assert info.value.offset == column


def test_and_short_circuits_past_a_null_reference() -> None:
    assert evaluate(parse("$dup and $none.x"), VALUES) is False


def test_walking_into_null_is_unresolved() -> None:
    with pytest.raises(Unresolved):
        evaluate(parse("$none.enabled"), VALUES)


def test_comparing_the_incomparable_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        evaluate(parse("$none < 1"), VALUES)


@pytest.mark.parametrize(
    ("text", "column"),
    [
        pytest.param("(" * 33 + "$a" + ")" * 33, 32, id="parentheses"),
        pytest.param("not " * 33 + "$a", 4 * 32, id="not"),
        pytest.param("$a in " + "[" * 33 + "]" * 33, 6 + 32, id="lists"),
    ],
)
def test_nesting_past_the_limit_points_at_the_first_level_too_deep(text: str, column: int) -> None:
    with pytest.raises(ExprSyntaxError, match="nested too deeply") as info:
        parse(text)
    assert info.value.offset == column


@pytest.mark.parametrize(("count", "expected"), [(31, True), (32, False)])
def test_a_run_of_not_negates_once_per_not(count: int, expected: bool) -> None:
    assert evaluate(parse("not " * count + "$dup"), VALUES) is expected

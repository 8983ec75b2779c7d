"""The reference language in SQL, `with:` and `output:`."""

from __future__ import annotations

import pytest

from planner.lang.refs import Ref, RefSyntaxError, Unresolved, compile_sql, parse_value, resolve


@pytest.mark.parametrize(
    ("sql", "text", "params"),
    [
        pytest.param("SELECT $a", "SELECT $1", ["$a"], id="input"),
        pytest.param("WHERE id = $conv.id AND x = $conv.id", "WHERE id = $1 AND x = $1", ["$conv.id"], id="same-ref-one-param"),
        pytest.param("SELECT $a::int, $b.c.d", "SELECT $1::int, $2", ["$a", "$b.c.d"], id="cast-and-deep-path"),
        pytest.param("SELECT '$a', 'it''s $b'", "SELECT '$a', 'it''s $b'", [], id="string-literals"),
        pytest.param("SELECT E'\\' $a', $b", "SELECT E'\\' $a', $1", ["$b"], id="escape-string"),
        pytest.param('SELECT "$a" FROM t', 'SELECT "$a" FROM t', [], id="quoted-identifier"),
        pytest.param("SELECT 1 -- $a\n, $b", "SELECT 1 -- $a\n, $1", ["$b"], id="line-comment"),
        pytest.param("SELECT /* $a /* $b */ $c */ $d", "SELECT /* $a /* $b */ $c */ $1", ["$d"], id="nested-comment"),
        pytest.param("SELECT $$ $a $$, $b", "SELECT $$ $a $$, $1", ["$b"], id="dollar-quote"),
        pytest.param("SELECT $fn$ $a $fn$, $b", "SELECT $fn$ $a $fn$, $1", ["$b"], id="tagged-dollar-quote"),
        pytest.param("SELECT a$b FROM t", "SELECT a$b FROM t", [], id="dollar-inside-identifier"),
        pytest.param("SELECT $rows.0.id", "SELECT $1", ["$rows.0.id"], id="list-index"),
    ],
)
def test_sql_references_become_bound_parameters(sql: str, text: str, params: list[str]) -> None:
    compiled = compile_sql(sql)
    assert compiled.text == text
    assert [str(p) for p in compiled.params] == params


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        pytest.param("SELECT $1", "positional parameter", id="positional"),
        pytest.param("SELECT 'abc", "unterminated string", id="unterminated-string"),
        pytest.param('SELECT "abc', "unterminated quoted identifier", id="unterminated-identifier"),
        pytest.param("SELECT $$ abc", "unterminated dollar-quoted", id="unterminated-dollar"),
        pytest.param("SELECT /* abc", "unterminated /*", id="unterminated-comment"),
        pytest.param("SELECT $ + 1", "must start a reference", id="bare-dollar"),
    ],
)
def test_bad_sql_is_refused_with_its_offset(sql: str, message: str) -> None:
    with pytest.raises(RefSyntaxError, match=message) as info:
        compile_sql(sql)
    assert 0 <= info.value.offset < len(sql)


def test_values_hold_references_only_as_whole_strings() -> None:
    template = parse_value({"a": "$x.y", "b": ["$z", 3], "c": "plain", "d": "$$5"})
    assert template.refs == (Ref("x", ("y",)), Ref("z"))
    assert template.value["c"] == "plain"
    assert template.value["d"] == "$5"


def test_a_malformed_value_reference_is_an_error_not_a_literal() -> None:
    with pytest.raises(RefSyntaxError, match="not a reference"):
        parse_value({"a": "$x-y"})


@pytest.mark.parametrize("text", ["$x\n", "$x.y\n"])
def test_a_reference_followed_by_a_newline_is_not_a_reference(text: str) -> None:
    with pytest.raises(RefSyntaxError, match="not a reference"):
        parse_value({"a": text})


def _nested(depth: int) -> list[object]:
    value: list[object] = ["$x"]
    for _ in range(depth):
        value = [value]
    return value


def test_a_value_nested_too_deeply_is_refused_not_a_recursion_error() -> None:
    with pytest.raises(RefSyntaxError, match="nested too deeply"):
        parse_value({"a": _nested(5000)})


def test_a_value_that_contains_itself_is_refused_not_a_recursion_error() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(RefSyntaxError, match="nested too deeply"):
        parse_value({"a": loop})


def test_a_value_nested_to_the_limit_is_parsed() -> None:
    from planner.lang.refs import MAX_TEMPLATE_DEPTH

    assert parse_value(_nested(MAX_TEMPLATE_DEPTH - 1)).refs == (Ref("x"),)


def test_resolving_into_null_is_unresolved() -> None:
    with pytest.raises(Unresolved):
        resolve(Ref("conv", ("id",)), {"conv": None})


def test_a_whole_null_value_resolves_to_null() -> None:
    assert resolve(Ref("conv"), {"conv": None}) is None


def test_a_missing_field_is_a_lookup_error_that_names_it() -> None:
    with pytest.raises(LookupError, match=r"\$conv has no field 'idd'"):
        resolve(Ref("conv", ("idd",)), {"conv": {"id": 1}})

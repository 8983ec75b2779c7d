"""The `when:` expression language: a tokenizer, a recursive-descent parser and an evaluator.

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := atom (("=="|"!="|"<"|"<="|">"|">="|"in"|"not in") atom)?
    atom    := REF | NUMBER | STRING | true | false | null | "[" [expr ("," expr)*] "]" | "(" expr ")"

No Python is ever evaluated: the tree has only the node types below. `and` stops at the
first false operand, so a reference it does not reach is never resolved:

    >>> when = parse('$n > 2 and $user.plan in ["pro", "team"]')
    >>> [str(ref) for ref in refs_of(when)]
    ['$n', '$user.plan']
    >>> evaluate(when, {"n": 3, "user": {"plan": "pro"}}), evaluate(when, {"n": 1, "user": None})
    (True, False)
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from planner.lang.models import MAX_NUMBER_CHARS
from planner.lang.refs import Ref, resolve

MAX_DEPTH = 32
"""How deeply parentheses, lists and `not` may nest: far beyond any real condition, and low
enough that parsing and evaluating stay far from Python's recursion limit."""

_TOKEN = re.compile(
    r"""
      (?P<ref>\$[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    | (?P<number>-?\d+(?:\.\d+)?)
    | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)
    | (?P<word>[A-Za-z_]+)
    """,
    re.VERBOSE,
)
_SPACE = re.compile(r"\s*")
_WORDS = {"and", "or", "not", "in", "true", "false", "null"}


class ExprSyntaxError(ValueError):
    """A `when:` expression that does not parse; `.offset` is the 0-based column of the problem."""

    def __init__(self, message: str, offset: int) -> None:
        self.offset = offset
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Lit:
    """A literal: a string, number, boolean or null."""

    value: Any


@dataclass(frozen=True, slots=True)
class ListOf:
    """A list literal `[a, b, ...]` (what `in` usually looks in)."""

    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """`not x`."""

    operand: Expr


@dataclass(frozen=True, slots=True)
class BoolOp:
    """`a and b and ...`, `a or b or ...` (short-circuit, left to right)."""

    op: str  # "and" | "or"
    operands: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Compare:
    """`left op right`: `==`, `!=`, `<`, `<=`, `>`, `>=`, `in` or `not in`."""

    op: str
    left: Expr
    right: Expr


Expr = Ref | Lit | ListOf | Not | BoolOp | Compare


def parse(text: str) -> Expr:
    """Parse a `when:` expression. Raises `ExprSyntaxError` pointing at the offending column."""
    parser = _Parser(_tokenize(text), len(text))
    tree = parser.expr()
    if parser.peek() is not None:
        kind, value, pos = parser.tokens[parser.i]
        raise ExprSyntaxError(f"unexpected {value!r}", pos)
    return tree


def refs_of(tree: Expr) -> list[Ref]:
    """Every reference in the tree, in reading order."""
    found: list[Ref] = []
    stack: list[Expr] = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, Ref):
            found.append(item)
        elif isinstance(item, Not):
            stack.append(item.operand)
        elif isinstance(item, Compare):
            stack += (item.right, item.left)
        elif isinstance(item, BoolOp):
            stack.extend(reversed(item.operands))
        elif isinstance(item, ListOf):
            stack.extend(reversed(item.items))
    return found


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    """Each token once, each character looked at a bounded number of times: linear in the text."""
    tokens: list[tuple[str, str, int]] = []
    pos = _skip_space(text, 0)
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ExprSyntaxError(f"unexpected character {text[pos]!r}", pos)
        kind = match.lastgroup or ""
        value = match.group()
        if kind == "word" and value not in _WORDS:
            raise ExprSyntaxError(f"unknown word {value!r} (references start with $)", pos)
        tokens.append((kind, value, pos))
        pos = _skip_space(text, match.end())
    return tokens


def _skip_space(text: str, pos: int) -> int:
    space = _SPACE.match(text, pos)
    return space.end() if space else pos


class _Parser:
    def __init__(self, tokens: list[tuple[str, str, int]], length: int) -> None:
        self.tokens, self.i, self.length = tokens, 0, length
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str, int]:
        if self.i >= len(self.tokens):
            raise ExprSyntaxError("unexpected end of expression" + (f", expected {expected!r}" if expected else ""), self.length)
        token = self.tokens[self.i]
        if expected is not None and token[1] != expected:
            raise ExprSyntaxError(f"expected {expected!r}, found {token[1]!r}", token[2])
        self.i += 1
        return token

    def nest(self, pos: int) -> None:
        """One level deeper (the caller comes back out), refusing more than MAX_DEPTH."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprSyntaxError(f"expression nested too deeply (more than {MAX_DEPTH} levels of (), [] and not)", pos)

    def expr(self) -> Expr:
        items = [self._and()]
        while self.peek() == "or":
            self.take()
            items.append(self._and())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def _and(self) -> Expr:
        items = [self._not()]
        while self.peek() == "and":
            self.take()
            items.append(self._not())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def _not(self) -> Expr:
        # A run of `not`s is read in a loop, not by recursion; each still counts as a level.
        count = 0
        while self.peek() == "not":
            self.nest(self.take()[2])
            count += 1
        tree = self._compare()
        for _ in range(count):
            tree = Not(tree)
        self.depth -= count
        return tree

    def _compare(self) -> Expr:
        left = self._atom()
        op = self.peek()
        if op == "not" and self.i + 1 < len(self.tokens) and self.tokens[self.i + 1][1] == "in":
            self.i += 2
            return Compare("not in", left, self._atom())
        if op in _COMPARE:
            self.take()
            return Compare(op, left, self._atom())
        return left

    def _atom(self) -> Expr:
        kind, value, pos = self.take()
        if kind == "ref":
            parts = value[1:].split(".")
            return Ref(parts[0], tuple(parts[1:]))
        if kind == "number":
            return Lit(_number(value, pos))
        if kind == "string":
            return Lit(re.sub(r"\\(.)", r"\1", value[1:-1]))
        if value in ("true", "false", "null"):
            return Lit({"true": True, "false": False, "null": None}[value])
        if value == "(":
            self.nest(pos)
            inner = self.expr()
            self.take(")")
            self.depth -= 1
            return inner
        if value == "[":
            self.nest(pos)
            items: list[Expr] = []
            while self.peek() != "]":
                items.append(self.expr())
                if self.peek() != "]":
                    self.take(",")
            self.take("]")
            self.depth -= 1
            return ListOf(tuple(items))
        raise ExprSyntaxError(f"unexpected {value!r}", pos)


def _number(text: str, pos: int) -> int | float:
    """A number literal, refused before conversion when huge (str -> int is quadratic) and
    when it does not fit a float."""
    if len(text) > MAX_NUMBER_CHARS:
        raise ExprSyntaxError(f"number is {len(text)} characters long (at most {MAX_NUMBER_CHARS})", pos)
    try:
        value = float(text) if "." in text else int(text)
    except ValueError as exc:  # a process may lower Python's int-str digit limit below ours
        raise ExprSyntaxError(f"number cannot be read: {exc}", pos) from None
    if isinstance(value, float) and math.isinf(value):
        raise ExprSyntaxError("number is too large", pos)
    return value


def _contains(container: Any, item: Any) -> bool:
    return item in container


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "in": lambda a, b: _contains(b, a),
    "not in": lambda a, b: not _contains(b, a),
}


def evaluate(tree: Expr, values: dict[str, Any]) -> Any:
    """Evaluate with Python's truthiness; `and`/`or` short-circuit.

    Raises `Unresolved` when a reference walks into null (the node is then skipped) and
    `TypeError` for comparisons that make no sense (`null < 1`), which fails the node.
    """
    if isinstance(tree, Ref):
        return resolve(tree, values)
    if isinstance(tree, Lit):
        return tree.value
    if isinstance(tree, Not):
        return not evaluate(tree.operand, values)
    if isinstance(tree, BoolOp):
        result: Any = None
        for item in tree.operands:
            result = evaluate(item, values)
            if bool(result) == (tree.op == "or"):
                return result
        return result
    if isinstance(tree, Compare):
        return _COMPARE[tree.op](evaluate(tree.left, values), evaluate(tree.right, values))
    return [evaluate(item, values) for item in tree.items]

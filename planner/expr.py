"""The `when:` expression language: a tokenizer, a recursive-descent parser and an evaluator.

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := atom (("=="|"!="|"<"|"<="|">"|">="|"in"|"not in") atom)?
    atom    := REF | NUMBER | STRING | true | false | null | "[" [expr ("," expr)*] "]" | "(" expr ")"

No Python is ever evaluated: the tree holds only the node types below.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from planner.refs import Ref, resolve

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<ref>\$[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    | (?P<number>-?\d+(?:\.\d+)?)
    | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)
    | (?P<word>[A-Za-z_]+)
    )""",
    re.VERBOSE,
)
_WORDS = {"and", "or", "not", "in", "true", "false", "null"}


class ExprSyntaxError(ValueError):
    """A `when:` expression that does not parse; `.offset` is the 0-based column of the problem."""

    def __init__(self, message: str, offset: int) -> None:
        self.offset = offset
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Lit:
    value: Any


@dataclass(frozen=True, slots=True)
class ListOf:
    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: str  # "and" | "or"
    operands: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Compare:
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
    if isinstance(tree, Ref):
        return [tree]
    if isinstance(tree, Not):
        return refs_of(tree.operand)
    if isinstance(tree, Compare):
        return refs_of(tree.left) + refs_of(tree.right)
    if isinstance(tree, (BoolOp, ListOf)):
        items = tree.operands if isinstance(tree, BoolOp) else tree.items
        return [r for item in items for r in refs_of(item)]
    return []


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            start = len(text) - len(text[pos:].lstrip())
            raise ExprSyntaxError(f"unexpected character {text[start]!r}", start)
        kind = match.lastgroup or ""
        value = match.group(kind)
        start = match.start(kind)
        if kind == "word" and value not in _WORDS:
            raise ExprSyntaxError(f"unknown word {value!r} (references start with $)", start)
        tokens.append((kind, value, start))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str, int]], length: int) -> None:
        self.tokens, self.i, self.length = tokens, 0, length

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

    def expr(self) -> Expr:
        return self._bool("or", self._and)

    def _and(self) -> Expr:
        return self._bool("and", self._not)

    def _bool(self, op: str, operand: Callable[[], Expr]) -> Expr:
        items = [operand()]
        while self.peek() == op:
            self.take()
            items.append(operand())
        return items[0] if len(items) == 1 else BoolOp(op, tuple(items))

    def _not(self) -> Expr:
        if self.peek() == "not":
            self.take()
            return Not(self._not())
        return self._compare()

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
            return Lit(float(value) if "." in value else int(value))
        if kind == "string":
            return Lit(re.sub(r"\\(.)", r"\1", value[1:-1]))
        if value in ("true", "false", "null"):
            return Lit({"true": True, "false": False, "null": None}[value])
        if value == "(":
            inner = self.expr()
            self.take(")")
            return inner
        if value == "[":
            items: list[Expr] = []
            while self.peek() != "]":
                items.append(self.expr())
                if self.peek() != "]":
                    self.take(",")
            self.take("]")
            return ListOf(tuple(items))
        raise ExprSyntaxError(f"unexpected {value!r}", pos)


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

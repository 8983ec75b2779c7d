"""The reference language: `$name` and `$node.a.b`, in SQL text and in `with:` / `output:` values.

In SQL, references are found by a small scanner that knows PostgreSQL's lexical rules well
enough to skip what is not code: string literals (`'..'`, `E'..'`), quoted identifiers,
comments (`--`, nested `/* */`) and dollar-quoted bodies (`$$..$$`, `$tag$..$tag$`). Each
distinct reference becomes one bound parameter `$k`; values are never pasted into the text.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEGMENT = re.compile(r"[A-Za-z0-9_]+")
# `\Z`, not `$`: `$` matches before a final newline, and "$a\n" is not the reference $a.
_WHOLE_REF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\Z")
MAX_TEMPLATE_DEPTH = 64
"""How deeply lists and mappings may nest in a `with:`/`output:` value (the loader already
bounds YAML; this bounds values built in Python): parsing, compiling and filling a template
recurse once per level."""


@dataclass(frozen=True, slots=True)
class Ref:
    """`$root.path...`: `root` is an input or a node; `path` walks into mappings (or list indexes)."""

    root: str
    path: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "$" + ".".join((self.root, *self.path))


class RefSyntaxError(ValueError):
    """A reference or SQL text the scanner cannot accept; `.offset` is 0-based into the text."""

    def __init__(self, message: str, offset: int) -> None:
        self.offset = offset
        super().__init__(message)


@dataclass(frozen=True)
class CompiledSql:
    """SQL text with `$1..$n` in place of references, and the reference each number binds.

    `pieces` and `slots` keep the text around the parameters, so the same statement can be
    written with other placeholders (`render`): coalescing reads them from an `unnest`.
    """

    text: str
    params: tuple[Ref, ...]
    pieces: tuple[str, ...] = ("",)
    slots: tuple[int, ...] = ()  # the 0-based parameter between pieces[i] and pieces[i + 1]

    def render(self, placeholders: list[str]) -> str:
        """The statement with parameter k written as `placeholders[k]`."""
        out = [self.pieces[0]]
        for slot, piece in zip(self.slots, self.pieces[1:], strict=True):
            out.append(placeholders[slot])
            out.append(piece)
        return "".join(out)


def compile_sql(sql: str) -> CompiledSql:
    """Replace named references by positional parameters; the same reference shares a number.

    >>> compile_sql("SELECT * FROM t WHERE a = $x.id AND b = '$not' AND c = $x.id").text
    "SELECT * FROM t WHERE a = $1 AND b = '$not' AND c = $1"
    """
    pieces: list[str] = []
    slots: list[int] = []
    numbers: dict[Ref, int] = {}
    last = 0
    for ref, start, end in scan_sql(sql):
        slots.append(numbers.setdefault(ref, len(numbers)))
        pieces.append(sql[last:start])
        last = end
    pieces.append(sql[last:])
    compiled = CompiledSql("", tuple(numbers), tuple(pieces), tuple(slots))
    return CompiledSql(compiled.render([f"${n + 1}" for n in range(len(numbers))]), compiled.params,
                       compiled.pieces, compiled.slots)


def name_params(message: str, statement: CompiledSql) -> str:
    """`query argument $2` means nothing to a flow author: say which reference it is."""

    def name(match: re.Match[str]) -> str:
        index = int(match.group(1)) - 1
        return str(statement.params[index]) if 0 <= index < len(statement.params) else match.group(0)

    return re.sub(r"\$(\d+)", name, message)


def scan_sql(sql: str) -> list[tuple[Ref, int, int]]:
    """Every reference in `sql` as `(ref, start, end)`. Raises `RefSyntaxError`."""
    found: list[tuple[Ref, int, int]] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not _is_ident_char(sql[i - 2]))
            i = _skip_quoted(sql, i, "'", backslash=escapes, what="string literal")
        elif c == '"':
            i = _skip_quoted(sql, i, '"', backslash=False, what="quoted identifier")
        elif sql.startswith("--", i):
            newline = sql.find("\n", i)
            i = n if newline < 0 else newline + 1
        elif sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
        elif c == "$":
            i = _dollar(sql, i, found)
        elif _is_ident_char(c):
            # Skip whole words so `a$b` (a legal identifier in PostgreSQL) is not a reference.
            while i < n and (_is_ident_char(sql[i]) or sql[i] == "$"):
                i += 1
        else:
            i += 1
    return found


def _is_ident_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _skip_quoted(sql: str, i: int, quote: str, *, backslash: bool, what: str) -> int:
    j = i + 1
    while j < len(sql):
        if backslash and sql[j] == "\\":
            j += 2
            continue
        if sql[j] == quote:
            if sql.startswith(quote * 2, j):
                j += 2
                continue
            return j + 1
        j += 1
    raise RefSyntaxError(f"unterminated {what}", i)


def _skip_block_comment(sql: str, i: int) -> int:
    depth, j = 0, i
    while j < len(sql):
        if sql.startswith("/*", j):
            depth, j = depth + 1, j + 2
        elif sql.startswith("*/", j):
            depth, j = depth - 1, j + 2
            if depth == 0:
                return j
        else:
            j += 1
    raise RefSyntaxError("unterminated /* comment", i)


def _dollar(sql: str, i: int, found: list[tuple[Ref, int, int]]) -> int:
    """At a `$`: a dollar-quoted body, a positional parameter (refused) or a reference."""
    if sql.startswith("$$", i):
        return _skip_dollar_body(sql, i, "$$")
    nxt = sql[i + 1] if i + 1 < len(sql) else ""
    if nxt.isdigit():
        raise RefSyntaxError(
            f"positional parameter ${nxt}... is not allowed in flow SQL: name what you mean, "
            "e.g. $user_phone or $conversation.id",
            i,
        )
    ident = _IDENT.match(sql, i + 1)
    if not ident:
        raise RefSyntaxError("`$` must start a reference such as $name or $node.field", i)
    if sql.startswith("$", ident.end()):
        return _skip_dollar_body(sql, i, sql[i : ident.end() + 1])
    path: list[str] = []
    j = ident.end()
    while j + 1 < len(sql) and sql[j] == "." and (seg := _SEGMENT.match(sql, j + 1)):
        path.append(seg.group())
        j = seg.end()
    found.append((Ref(ident.group(), tuple(path)), i, j))
    return j


def _skip_dollar_body(sql: str, i: int, tag: str) -> int:
    end = sql.find(tag, i + len(tag))
    if end < 0:
        raise RefSyntaxError(f"unterminated dollar-quoted string {tag}", i)
    return end + len(tag)


# --- `with:` and `output:` values -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A YAML value that may hold references: a `Ref`, a literal, or a list/dict of those."""

    value: Any
    refs: tuple[Ref, ...]


def parse_value(value: Any) -> Template:
    """A string that is exactly `$name` or `$node.a.b` is a reference; `$$...` is a literal `$...`.

    Any other string starting with `$` is an error, so a typo cannot pass as a literal. Lists
    and mappings nested more than MAX_TEMPLATE_DEPTH deep (or containing themselves) are too.
    """
    refs: list[Ref] = []
    return Template(_parse(value, refs, 0), tuple(dict.fromkeys(refs)))


def _parse(value: Any, refs: list[Ref], depth: int) -> Any:
    if isinstance(value, str):
        if value.startswith("$$"):
            return value[1:]
        if value.startswith("$"):
            match = _WHOLE_REF.fullmatch(value)
            if not match:
                raise RefSyntaxError(f"{value!r} is not a reference (write $name or $node.field; $$ for a literal $)", 0)
            ref = Ref(match.group(1), tuple(p for p in match.group(2).split(".") if p))
            refs.append(ref)
            return ref
        return value
    if isinstance(value, (list, dict)) and depth >= MAX_TEMPLATE_DEPTH:
        raise RefSyntaxError(f"value nested too deeply (more than {MAX_TEMPLATE_DEPTH} levels)", 0)
    if isinstance(value, list):
        return [_parse(v, refs, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _parse(v, refs, depth + 1) for k, v in value.items()}
    return value


class Unresolved(Exception):
    """A reference walked into a null value: the node that needs it is skipped."""


_MISSING = object()


def resolve(ref: Ref, values: dict[str, Any]) -> Any:
    """The value of `ref`.

    Raises `Unresolved` when a step meets null (or a list too short for an index) and
    `LookupError` when a non-null mapping lacks the field: a typo, not an absence.
    """
    value = values[ref.root]
    for i, key in enumerate(ref.path):
        if value is None:
            raise Unresolved(str(ref))
        if isinstance(value, dict):
            value = value.get(key, _MISSING)
        elif isinstance(value, (list, tuple)) and key.isdigit():
            index = int(key)
            if index >= len(value):
                raise Unresolved(str(ref))  # lists vary in length at run time: like a missing row
            value = value[index]
        else:
            value = getattr(value, "get", lambda _k, _d: _MISSING)(key, _MISSING)
        if value is _MISSING:
            holder = "$" + ".".join((ref.root, *ref.path[:i]))
            raise LookupError(f"{ref}: the value of {holder} has no field {key!r}")
    return value


Getter = Callable[[dict[str, Any]], Any]


def compile_getter(template: Any) -> Getter:
    """A function that fills a parsed template (see `parse_value`) with values: built once per
    node, a closure per reference, so a run does no type checks."""
    if isinstance(template, Ref):
        if not template.path:
            return operator.itemgetter(template.root)
        return lambda values: resolve(template, values)
    if isinstance(template, dict):
        if template and all(isinstance(v, Ref) and not v.path for v in template.values()):
            # Plain `$name` values only (the usual `with:`): one C-level gather, no per-key call.
            keys = tuple(template)
            roots = [v.root for v in template.values()]
            if len(roots) == 1:
                key, root = keys[0], roots[0]
                return lambda values: {key: values[root]}
            gather = operator.itemgetter(*roots)
            return lambda values: dict(zip(keys, gather(values), strict=True))
        items = [(k, compile_getter(v)) for k, v in template.items()]
        return lambda values: {k: get(values) for k, get in items}
    if isinstance(template, list):
        getters = [compile_getter(v) for v in template]
        return lambda values: [get(values) for get in getters]
    return lambda values: template

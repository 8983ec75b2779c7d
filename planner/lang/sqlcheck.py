"""SQL syntax checked offline by PostgreSQL's own parser (pglast), at the author's line and column.

One check for `planner validate` (`PLN111`) and for a hot edit of a running flow, which must
pass it before it replaces the version that runs (`planner.api.Planner`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from planner.errors import FlowFileError
from planner.lang.loader import LoadedFlow
from planner.lang.nodes import CompiledNode
from planner.lang.refs import CompiledSql, name_params, scan_sql
from planner.lang.sqlinfo import analyze

SYNTAX = "PLN111"


Written = Mapping[str, Sequence[tuple[tuple[str | int, ...], str]]]
"""Each node's statements as its author wrote them: where in the file, and the text
(`planner.kinds.written_statements`; the kinds, above this layer, know where they keep them)."""


def statements_of(nodes: Mapping[str, CompiledNode], written: Written) -> list[tuple[str, tuple[str | int, ...], str, CompiledSql]]:
    """Every statement of the flow: `(node, where in the file, source text, compiled)`."""
    out = []
    for name, node in nodes.items():
        for (where, text), statement in zip(written.get(name, ()), node.sql.statements, strict=False):
            out.append((name, where, text, statement))
    return out


def syntax_errors(loaded: LoadedFlow, nodes: Mapping[str, CompiledNode], written: Written) -> list[FlowFileError]:
    """Each statement that does not parse, as a `FlowFileError` (code `PLN111`) at its line and
    column in the file."""
    errors = []
    for name, where, text, statement in statements_of(nodes, written):
        info = analyze(statement.text)
        if info.error is None:
            continue
        compiled = len(statement.text) if info.error_offset is None else info.error_offset
        offset = _source_offset(text, statement, compiled)
        line, column = loaded.marks.inside(where, text, offset)
        inner_line = text.count("\n", 0, offset) + 1
        inner_column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        message = f"SQL does not parse: {name_params(info.error, statement)} (SQL line {inner_line}, column {inner_column})"
        errors.append(FlowFileError(message, file=loaded.marks.file, line=line, column=column, node=name, code=SYNTAX))
    return errors


def _source_offset(source: str, statement: CompiledSql, offset: int) -> int:
    """Character `offset` of the compiled text (`$1` for `$conversation.id`) as an offset of the
    text the author wrote; a position inside a parameter points at its reference."""
    compiled_at = source_at = 0
    for (_ref, start, end), slot in zip(scan_sql(source), statement.slots, strict=False):
        piece = start - source_at
        if offset < compiled_at + piece:
            break
        placeholder = len(f"${slot + 1}")
        if offset < compiled_at + piece + placeholder:
            return start
        compiled_at += piece + placeholder
        source_at = end
    return min(source_at + (offset - compiled_at), len(source))

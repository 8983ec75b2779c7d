"""The text of the catalog's probe: a statement as the query of a temporary view.

`planner.db.judge` asks the server what a statement uses by creating a temporary view over it
and reading the view's rewrite rule. A view takes no parameters, so each `$n` becomes a NULL
of its type, on pglast's tree (never by pasting text); a SQL function's body may also name its
arguments, which become typed NULLs the same way. Only plain queries can be views:

>>> probe_text("SELECT name FROM jobs WHERE id = $1", ["integer"])
'SELECT 1 FROM (SELECT name FROM jobs WHERE id = CAST(NULL AS integer)) AS s'
>>> body_probe_texts("SELECT k + 1", ["bigint"], ("k",), "f")
['SELECT 1 FROM (SELECT CAST(NULL AS bigint) + 1) AS s']
"""

from __future__ import annotations

import pglast
from pglast import ast
from pglast.stream import RawStream
from pglast.visitors import Visitor


class _Bind(Visitor):
    """Replace each `$n` (and each argument named in `names`) by `NULL::<its type>`, on the tree."""

    def __init__(self, types: list[str], names: tuple[str, ...] = (), function: str = "") -> None:
        super().__init__()
        # Each type as the server spells it (`format_type`: `integer[]`, `public."My Type"`),
        # parsed into a type name: a name of the catalog's, never a value of a run's.
        self.types = [_type_name(t) for t in types]
        # A SQL function's body may name its arguments (`k`, `f.k`) as well as number them.
        self.names = {name: i for i, name in enumerate(names) if name}
        self.function = function

    def visit(self, ancestors: object, node: ast.Node) -> ast.Node | None:
        if isinstance(node, ast.ParamRef):
            return ast.TypeCast(arg=ast.A_Const(isnull=True), typeName=self.types[int(node.number or 0) - 1])
        if isinstance(node, ast.ColumnRef) and self.names:
            fields = [getattr(f, "sval", None) for f in node.fields or ()]
            if len(fields) == 2 and fields[0] == self.function:
                fields = fields[1:]
            if len(fields) == 1 and fields[0] in self.names:
                return ast.TypeCast(arg=ast.A_Const(isnull=True), typeName=self.types[self.names[fields[0]]])
        return None


def _type_name(spelled: str) -> ast.TypeName:
    stmt = pglast.parse_sql(f"SELECT NULL::{spelled}")[0].stmt
    target = stmt.targetList[0].val  # type: ignore[union-attr]
    if not isinstance(target, ast.TypeCast) or not isinstance(target.typeName, ast.TypeName):
        raise ValueError(f"not a type name: {spelled!r}")
    return target.typeName


def _as_view_query(stmt: ast.Node) -> str:
    return f"SELECT 1 FROM ({RawStream()(stmt)}) AS s"


def probe_text(text: str, types: list[str]) -> str:
    """The view's query for statement `text` whose parameters have `types` (as `format_type`
    spells them): `SELECT 1 FROM (<text, each $n a typed NULL>) AS s`. Raises `ValueError` for
    anything but one plain query."""
    tree = pglast.parse_sql(text)
    if len(tree) != 1 or not isinstance(tree[0].stmt, ast.SelectStmt):
        raise ValueError("only one plain query can be resolved")
    _Bind(types)(tree)
    return _as_view_query(tree[0].stmt)


def body_probe_texts(source: str, types: list[str], names: tuple[str, ...], function: str) -> list[str]:
    """One view query per statement of SQL function `function`'s string body `source`, whose
    arguments have `types` and `names` (`$n`, `k` and `function.k` each a typed NULL). Raises
    `ValueError` when a statement is not a query."""
    texts: list[str] = []
    for raw in pglast.parse_sql(source):
        if not isinstance(raw.stmt, ast.SelectStmt):
            raise ValueError("a statement other than a query")
        texts.append(_as_view_query(_Bind(types, names, function)(raw.stmt)))
    return texts

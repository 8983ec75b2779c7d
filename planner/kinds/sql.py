"""`sql:` nodes: one statement, or a list sent in one transaction, through the backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from planner.errors import FlowFileError, NotFound
from planner.kinds import BindEnv, BoundNode, Where
from planner.kinds.backend import Query
from planner.lang.models import Settings, SqlNode
from planner.lang.nodes import SqlBody
from planner.lang.refs import CompiledSql, RefSyntaxError, compile_getter, compile_sql
from planner.lang.sqlinfo import SqlInfo, analyze, combine_writes
from planner.results import Served

if TYPE_CHECKING:
    from planner.config import CallTargets
    from planner.lang.nodes import CompiledNode
    from planner.lang.safeyaml import Marks


class SqlKind:
    name: Literal["sql"] = "sql"
    refs_at = "sql"
    shape: Literal["box", "round"] = "box"
    model = SqlNode

    def compile(self, name: str, node: SqlNode, marks: Marks, settings: Settings) -> SqlBody:
        statements: list[CompiledSql] = []
        for where, text in self.written(name, node):
            try:
                statements.append(compile_sql(text))
            except RefSyntaxError as exc:
                raise sql_error(marks, where, text, exc.offset, str(exc)) from None
        infos = [analyze(s.text) for s in statements]
        # A list is a transaction: never shared with other runs, whatever it holds.
        read_only = len(infos) == 1 and infos[0].read_only
        if node.cache is not None and not read_only:
            raise marks.error(f"cache: only one read-only statement can be cached; {_not_read_only(node, infos)}",
                              ("nodes", name, "cache"), code="PLN130")
        if node.coalesce and not read_only and (len(statements) > 1 or node.fetch == "none"
                                                or combine_writes(statements[0].text, 2) is None):
            raise marks.error(
                "coalesce: true needs one statement that returns rows (RETURNING, fetch: one/all/value) and "
                "that can be combined with others (no nested or recursive WITH): a statement list is a "
                "transaction of its own and is never shared", ("nodes", name, "coalesce"))
        return SqlBody(
            statements=tuple(statements),
            fetch=node.fetch,
            required=node.required,
            read_only=read_only,
            session=any(i.session for i in infos),
            functions=frozenset(f for i in infos for f in i.functions),
            # Reads are shared unless turned off (on the node, or for the whole flow by
            # `settings: {coalesce: false}`); a write only when its author says it may be.
            coalesce=settings.coalesce and node.fetch != "none"
            and (node.coalesce is True or (read_only and node.coalesce is None)),
            # Its author's word that it may be combined with other runs' as a write: what a
            # read the catalog does not prove pure still may do (`planner.lang.effects`).
            coalesce_writes=node.fetch != "none" and node.coalesce is True,
            cache_ttl=node.cache,
            fuse=settings.fuse and read_only and node.fetch != "none" and node.fuse is not False,  # a status is not a row
            replica_allowed=node.replica,
            compile=node.compile is not False,
        )

    def identity(self, node: SqlNode) -> dict[str, Any]:
        return {"sql": [node.sql] if isinstance(node.sql, str) else list(node.sql), "fetch": node.fetch}

    def written(self, name: str, node: SqlNode) -> list[tuple[Where, str]]:
        if isinstance(node.sql, str):
            return [(("nodes", name, "sql"), node.sql)]
        return [(("nodes", name, "sql", i), text) for i, text in enumerate(node.sql)]

    def bind(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> BoundNode:
        body = spec.sql
        params = compile_getter([list(st.params) for st in body.statements])
        backend = env.backend
        count = len(body.statements)

        def args(values: dict[str, Any]) -> Query:
            return Query(spec, params(values), Served(statements=count), run=values)  # one values dict per run: the run's token

        if not body.required:
            return BoundNode(spec, args, backend.run, own_timeout=True, served=_served)

        async def run_required(query: Query) -> Any:
            row = await backend.run(query)
            if row is None:  # fetch: one gives None for no row, and only for no row
                raise NotFound("no row, and the node says required: true (fetch: one)")
            return row

        return BoundNode(spec, args, run_required, own_timeout=True, served=_served)

    def needs_database(self, spec: CompiledNode) -> bool:
        return True

    def uses_database(self, spec: CompiledNode, targets: CallTargets) -> bool:
        return True

    def check(self, spec: CompiledNode, marks: Marks, env: BindEnv) -> list[FlowFileError]:
        return []


def _not_read_only(node: SqlNode, infos: list[SqlInfo]) -> str:
    if isinstance(node.sql, list):
        return "this node is a statement list (a transaction)"
    if infos[0].error is not None:
        return f"this statement does not parse: {infos[0].error}"
    return ("this statement is not proven read-only: it writes, locks rows, changes the session "
            "or calls a function with effects (nextval, random, set_config...)")


def _served(query: Query) -> Any:
    return query.served


def sql_error(marks: Marks, where: tuple[str | int, ...], text: str, offset: int, message: str) -> FlowFileError:
    """An error at `offset` inside an SQL text, reported where that character is in the file."""
    line, column = marks.inside(where, text, offset)
    inner_line = text.count("\n", 0, offset)
    inner_col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    shown = f"{message} (SQL line {inner_line + 1}, column {inner_col})"
    return FlowFileError(shown, file=marks.file, line=line, column=column, node=str(where[1]), code="PLN110")


SQL = SqlKind()

"""The node-kind registry (`planner.kinds`): what the models accept is what the registry knows,
an unknown kind is an error (never another kind's branch), and graph errors point where each
kind writes its references."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
from pydantic import Tag

from planner import CallOptions, FlowError, FlowGraphError, Planner, load_flow
from planner.graph import compile_flow
from planner.kinds import KINDS, kind_for_model, kind_of
from planner.kinds.backend import Offline
from planner.lang import models
from planner.lang.loader import load_text
from planner.lang.nodes import NO_SQL, CallBody, SqlBody
from planner.lang.refs import Ref
from planner.views.validate import check_static


def _model_tags() -> dict[str, type]:
    """The node kinds `planner.lang.models.Node` accepts: its discriminator's tag -> model."""
    union, *_ = typing.get_args(models.Node)
    tags: dict[str, type] = {}
    for member in typing.get_args(union):
        model, *meta = typing.get_args(member)
        tag = next(m for m in meta if isinstance(m, Tag))
        tags[tag.tag] = model
    return tags


def test_the_registry_holds_exactly_the_kinds_the_models_accept() -> None:
    tags = _model_tags()
    assert set(tags) == {"sql", "call"}  # the parse of `Node` itself is sound
    assert set(KINDS) == set(tags)
    for name, model in tags.items():
        assert KINDS[name].name == name
        assert KINDS[name].model is model


def test_the_discriminator_names_each_registered_kind() -> None:
    for name in KINDS:
        assert models._node_kind({name: "x"}) == name


def test_each_kind_is_found_from_its_model() -> None:
    flow = load_flow(text="nodes:\n  s: {sql: SELECT 1}\n  c: {call: 'tests.nodes:echo'}\n")
    assert {name: node.kind for name, node in flow.nodes.items()} == {"s": "sql", "c": "call"}
    assert kind_for_model(flow.loaded.spec.nodes["s"]) is KINDS["sql"]
    assert kind_for_model(flow.loaded.spec.nodes["c"]) is KINDS["call"]


def test_the_sql_kind_builds_an_sql_body_from_its_model() -> None:
    flow = load_flow(text="inputs: {i: int}\nnodes:\n  s: {sql: SELECT $i AS v, fetch: one, cache: 5s}\n")
    body = flow.nodes["s"].body
    assert isinstance(body, SqlBody)
    assert (body.fetch, body.read_only, body.cache_ttl, [str(r) for r in body.refs]) == ("one", True, 5.0, ["$i"])
    assert flow.nodes["s"].sql is body and flow.nodes["s"].kind == "sql"


def test_the_call_kind_builds_a_call_body_and_sends_no_sql() -> None:
    flow = load_flow(text="inputs: {i: int}\nnodes:\n  c: {call: 'tests.nodes:echo', with: {value: $i}}\n")
    node = flow.nodes["c"]
    assert node.body == CallBody(target="tests.nodes:echo", args={"value": node.body.refs[0]}, refs=node.body.refs)
    assert [str(r) for r in node.refs] == ["$i"]
    assert node.sql is NO_SQL and node.sql.statements == () and node.kind == "call"


@pytest.mark.parametrize(("body", "field"), [(SqlBody(), "fetch"), (CallBody(target="m:f"), "target")], ids=["sql", "call"])
def test_a_body_is_frozen_and_has_slots(body: object, field: str) -> None:
    assert not hasattr(body, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(body, field, "other")


def test_flow_settings_turn_off_sharing_in_the_sql_body() -> None:
    text = "settings: {coalesce: false, fuse: false}\nnodes:\n  s: {sql: SELECT 1 AS v}\n"
    sql = load_flow(text=text).nodes["s"].sql
    assert sql.read_only and not sql.coalesce and not sql.fuse


def test_only_a_call_whose_function_takes_db_uses_the_database() -> None:
    flow = load_flow(text="nodes:\n  s: {sql: SELECT 1}\n  c: {call: 'tests.nodes:echo'}\n"
                          "  d: {call: 'tests.nodes:with_db'}\n  x: {call: 'nowhere:f'}\n")
    targets = Planner(backend=Offline(), call_options=CallOptions(allowed_modules=["tests"])).targets
    uses = {name: kind_of(node.kind).uses_database(node, targets) for name, node in flow.nodes.items()}
    assert uses == {"s": True, "c": False, "d": True, "x": False}


def test_an_unknown_kind_name_is_a_flow_error_naming_the_known_ones() -> None:
    with pytest.raises(FlowError, match=r"unknown node kind 'nope' \(known: call, sql\)"):
        kind_of("nope")


def test_an_unknown_model_is_a_flow_error() -> None:
    with pytest.raises(FlowError, match="no node kind for object"):
        kind_for_model(object())


@dataclasses.dataclass(frozen=True)
class NopeBody:
    """The body of a kind nobody registered."""

    kind = "nope"
    refs: tuple[Ref, ...] = ()

    @property
    def sql(self) -> SqlBody:
        return NO_SQL


@pytest.mark.parametrize("node", ["{sql: SELECT 1, fetch: value}", "{call: 'tests.nodes:echo', with: {value: 1}}"])
async def test_a_node_of_an_unknown_kind_is_refused_at_bind_not_run_as_another_kind(node: str) -> None:
    flow = load_flow(text=f"nodes:\n  a: {node}\n")
    flow.nodes["a"] = dataclasses.replace(flow.nodes["a"], body=NopeBody())  # type: ignore[arg-type]
    planner = Planner(backend=Offline(), call_options=CallOptions(allowed_modules=["tests"]))
    with pytest.raises(FlowError, match="unknown node kind 'nope'"):
        await planner.run(flow)


def test_validate_refuses_a_node_of_an_unknown_kind(tmp_path: typing.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("nodes:\n  a: {sql: SELECT 1}\n")
    real = compile_flow

    def unknown_kind(loaded: typing.Any) -> typing.Any:
        flow = real(loaded)
        flow.nodes["a"] = dataclasses.replace(flow.nodes["a"], body=NopeBody())  # type: ignore[arg-type]
        return flow

    monkeypatch.setattr("planner.views.validate.compile_flow", unknown_kind)
    with pytest.raises(FlowError, match="unknown node kind 'nope'"):
        check_static(path)


def test_each_kind_writes_its_references_under_a_key_of_its_model() -> None:
    for kind in KINDS.values():
        keys = {field.alias or name for name, field in kind.model.model_fields.items()}
        assert kind.refs_at in keys


# An unknown reference is reported on the line of the key that holds it: `sql:` for SQL nodes,
# `with:` for call nodes (each kind's `refs_at`), `when:` for either.
_SQL = """\
nodes:
  a:
    fetch: value
    sql: SELECT $nope
"""
_CALL = """\
nodes:
  a:
    call: tests.nodes:echo
    default: 0
    with:
      value: $nope
"""
_SQL_LIST = """\
nodes:
  a:
    fetch: value
    timeout: 1s
    sql:
      - SELECT 1
      - SELECT $nope
"""
_WHEN = """\
inputs: {known: int}
nodes:
  a:
    sql: SELECT $known
    fetch: value
    when: $nope > 1
"""


@pytest.mark.parametrize(
    ("text", "line", "kind"),
    [
        pytest.param(_SQL, 4, "sql", id="sql"),
        pytest.param(_SQL_LIST, 5, "sql", id="sql-list"),
        pytest.param(_CALL, 5, "call", id="call-with"),
        pytest.param(_WHEN, 6, "sql", id="when"),
    ],
)
def test_an_unknown_reference_points_at_the_key_its_kind_holds_references_under(text: str, line: int, kind: str) -> None:
    assert KINDS[kind].model is type(load_text(text.replace("$nope", "1"), name="k").spec.nodes["a"])
    with pytest.raises(FlowGraphError) as info:
        compile_flow(load_text(text, file="k.yaml", name="k"))
    error = info.value
    assert (error.node, error.line) == ("a", line), str(error)
    assert "unknown reference $nope" in str(error)


# --- no kind branches outside the kinds ------------------------------------------------------

PLANNER = Path(__file__).resolve().parents[2] / "planner"
# Where naming a kind is the job: the kinds themselves, the models that define what a node may
# be, and the loader that validates a file against them.
KIND_HOMES = ("kinds/", "lang/models.py", "lang/loader.py")
KIND_TYPES = {"SqlBody", "CallBody", "SqlNode", "CallNode"}
# The fields only some kinds' models have (`sql`, `fetch`, `call`, `with_`...): reading one
# through getattr/hasattr asks "which kind is this?" without saying so.
KIND_FIELDS = frozenset(set().union(*(set(k.model.model_fields) for k in KINDS.values()))
                        - set.intersection(*(set(k.model.model_fields) for k in KINDS.values())))
# The same words meaning something else: each exemption names its line's text exactly.
NOT_KINDS = {("testing/pytest_plugin.py", "report.when == 'call'")}  # pytest's test phase


def _names_a_kind(tree: ast.AST) -> bool:
    """A kind's name written as a constant, alone or in a tuple, list or set."""
    if isinstance(tree, ast.Constant):
        return tree.value in KINDS
    if isinstance(tree, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_kind(e) for e in tree.elts)
    return False


def kind_branches(source: str) -> list[tuple[int, str]]:
    """Lines of `source` that branch on a node's kind: a comparison (or `case`) against a kind's
    name, an `isinstance` against a kind's model or body type, or a `getattr`/`hasattr` of a
    field only some kinds' models have."""
    found: list[tuple[int, str]] = []
    for tree in ast.walk(ast.parse(source)):
        if isinstance(tree, ast.Compare) and any(_names_a_kind(side) for side in (tree.left, *tree.comparators)):
            found.append((tree.lineno, ast.unparse(tree)))
        elif isinstance(tree, ast.MatchValue) and _names_a_kind(tree.value):
            found.append((tree.lineno, f"case {ast.unparse(tree.value)}"))
        elif (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "isinstance"
              and len(tree.args) == 2 and {n.id for n in ast.walk(tree.args[1]) if isinstance(n, ast.Name)} & KIND_TYPES):
            found.append((tree.lineno, ast.unparse(tree)))
        elif (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id in ("getattr", "hasattr")
              and len(tree.args) >= 2 and isinstance(tree.args[1], ast.Constant) and tree.args[1].value in KIND_FIELDS):
            found.append((tree.lineno, ast.unparse(tree)))
    return found


@pytest.mark.parametrize("source", [
    'if node.kind == "sql": pass',
    'if "call" != spec.kind: pass',
    'ok = node.kind in ("sql", "view")',
    'ok = kind not in {"call"}',
    'match node.kind:\n    case "sql": pass',
    'ok = isinstance(node.body, SqlBody)',
    'ok = isinstance(model, (CallNode, dict))',
    'sql = getattr(spec, "sql", None)',
    'target = getattr(spec, "call")',
    'ok = hasattr(model, "with_")',
    'fetch = getattr(loaded.spec.nodes[name], "fetch", "all")',
])
def test_the_scan_finds_each_spelling_of_a_kind_branch(source: str) -> None:
    assert kind_branches(source)


def test_the_scan_leaves_other_comparisons_alone() -> None:
    assert kind_branches('ok = param.kind == "lit" and fmt in ("svg", "html") and isinstance(x, str)') == []
    assert kind_branches('name = getattr(node, "name"); t = getattr(node, "timeout", None)') == []


def test_the_kind_fields_the_scan_looks_for_are_the_kinds_own() -> None:
    assert {"sql", "fetch", "call", "with_"} <= KIND_FIELDS
    assert not {"when", "default", "timeout"} & KIND_FIELDS


def test_no_module_outside_the_kinds_branches_on_a_node_kind() -> None:
    found = []
    for path in sorted(PLANNER.rglob("*.py")):
        where = path.relative_to(PLANNER).as_posix()
        if where.startswith(KIND_HOMES):
            continue
        found += [f"planner/{where}:{line}: {text}" for line, text in kind_branches(path.read_text())
                  if (where, text) not in NOT_KINDS]
    assert found == [], "ask the kind (planner.kinds.kind_of), the body or CompiledNode.sql instead:\n" + "\n".join(found)

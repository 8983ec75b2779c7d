"""The node-kind registry (`planner.kinds`): what the models accept is what the registry knows,
an unknown kind is an error (never another kind's branch), and graph errors point where each
kind writes its references."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from pydantic import Tag

from planner import FlowError, FlowGraphError, Planner, load_flow
from planner.graph import compile_flow
from planner.kinds import KINDS, kind_for_model, kind_of
from planner.kinds.backend import Offline
from planner.lang import models
from planner.lang.loader import load_text
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


def test_an_unknown_kind_name_is_a_flow_error_naming_the_known_ones() -> None:
    with pytest.raises(FlowError, match=r"unknown node kind 'nope' \(known: call, sql\)"):
        kind_of("nope")


def test_an_unknown_model_is_a_flow_error() -> None:
    with pytest.raises(FlowError, match="no node kind for object"):
        kind_for_model(object())


@pytest.mark.parametrize("node", ["{sql: SELECT 1, fetch: value}", "{call: 'tests.nodes:echo', with: {value: 1}}"])
async def test_a_node_of_an_unknown_kind_is_refused_at_bind_not_run_as_another_kind(node: str) -> None:
    flow = load_flow(text=f"nodes:\n  a: {node}\n")
    flow.nodes["a"] = dataclasses.replace(flow.nodes["a"], kind="nope")  # type: ignore[arg-type]
    planner = Planner(backend=Offline(), allowed_modules=["tests"])
    with pytest.raises(FlowError, match="unknown node kind 'nope'"):
        await planner.run(flow)


def test_validate_refuses_a_node_of_an_unknown_kind(tmp_path: typing.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("nodes:\n  a: {sql: SELECT 1}\n")
    real = compile_flow

    def unknown_kind(loaded: typing.Any) -> typing.Any:
        flow = real(loaded)
        flow.nodes["a"] = dataclasses.replace(flow.nodes["a"], kind="nope")  # type: ignore[arg-type]
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

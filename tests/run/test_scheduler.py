"""`planner.run.scheduler.Ready` alone, on adjacency dicts: graphlib's ready-set protocol.

The cases are written as graphlib's tests are: a graph of dependencies, the nodes marked done
in turn, and what each `done` releases. A property on random DAGs checks that every node is
released exactly once, and never before all its dependencies are done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.run.scheduler import Ready


def _done(ready: Ready, name: str) -> list[str]:
    """`ready.done(name)`, with what it released as a list."""
    released: list[str] = []
    assert ready.done(name, released.append) == len(released)
    return released

Deps = Mapping[str, Sequence[str]]


def _ready(deps: Deps, run: Sequence[str] | None = None) -> Ready:
    """A `Ready` for the graph `deps` (node -> its dependencies), running the nodes `run` (all by default)."""
    successors: dict[str, list[str]] = {name: [] for name in deps}
    for name, needs in deps.items():
        for dep in needs:
            successors[dep].append(name)
    active = list(deps) if run is None else list(run)
    waiting = {name: sum(1 for d in deps[name] if d in active) for name in active}
    return Ready({k: tuple(v) for k, v in successors.items()}, waiting)


@pytest.mark.parametrize(
    ("deps", "roots", "steps"),
    [
        pytest.param({"a": ()}, ["a"], [("a", [])], id="single"),
        pytest.param({"a": (), "b": (), "c": ()}, ["a", "b", "c"], [("b", []), ("a", []), ("c", [])], id="independent"),
        pytest.param({"a": (), "b": ("a",), "c": ("b",)}, ["a"], [("a", ["b"]), ("b", ["c"]), ("c", [])], id="chain"),
        pytest.param(
            {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")},
            ["a"],
            [("a", ["b", "c"]), ("c", []), ("b", ["d"]), ("d", [])],
            id="diamond",
        ),
        pytest.param(
            {"x": (), "y": (), "z": (), "all": ("x", "y", "z")},
            ["x", "y", "z"],
            [("x", []), ("z", []), ("y", ["all"]), ("all", [])],
            id="released-only-when-all-deps-are-done",
        ),
        pytest.param(
            {"a": (), "s3": ("a",), "s1": ("a",), "s2": ("a",)},
            ["a"],
            [("a", ["s3", "s1", "s2"])],
            id="release-order-is-successor-order",
        ),
        pytest.param(
            {"a": (), "b": (), "c": ("a",), "d": ("a", "b")},
            ["a", "b"],
            [("b", []), ("a", ["c", "d"])],
            id="two-roots-shared-successor",
        ),
    ],
)
def test_ready_releases_a_node_once_all_its_dependencies_are_done(
    deps: Deps, roots: list[str], steps: list[tuple[str, list[str]]]
) -> None:
    ready = _ready(deps)
    assert ready.roots(deps) == roots
    for name, released in steps:
        assert _done(ready, name) == released, f"done({name!r})"


def test_roots_follow_the_given_order_not_the_graphs() -> None:
    ready = _ready({"a": (), "b": (), "c": ("a",)})
    assert ready.roots(["c", "b", "a"]) == ["b", "a"]


def test_roots_skip_names_the_run_does_not_hold() -> None:
    ready = _ready({"a": (), "b": ()}, run=["a"])
    assert ready.roots(["a", "b"]) == ["a"]


def test_a_successor_outside_the_run_is_ignored() -> None:
    # `b` is not part of this run (overridden upstream, pruned): settling `a` must not touch it.
    ready = _ready({"a": (), "b": ("a",), "c": ("a",)}, run=["a", "c"])
    assert _done(ready, "a") == ["c"]
    assert "b" not in ready


def test_unsettled_counts_the_run_nodes_not_yet_done() -> None:
    ready = _ready({"a": (), "b": ("a",), "c": ("a",)}, run=["a", "b"])
    assert ready.unsettled == 2
    ready.done("a")
    assert ready.unsettled == 1
    ready.done("b")
    assert ready.unsettled == 0


def test_contains_names_exactly_the_run_nodes() -> None:
    ready = _ready({"a": (), "b": ("a",)}, run=["a"])
    assert "a" in ready
    assert "b" not in ready


@st.composite
def dags(draw: st.DrawFn) -> dict[str, tuple[str, ...]]:
    n = draw(st.integers(1, 14))
    deps: dict[str, tuple[str, ...]] = {}
    for i in range(n):
        chosen = draw(st.sets(st.integers(0, i - 1), max_size=4)) if i else set()
        deps[f"n{i}"] = tuple(f"n{d}" for d in sorted(chosen))
    names = list(deps)
    order = draw(st.permutations(names))  # the YAML order need not be topological
    return {name: deps[name] for name in order}


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(dag=dags(), data=st.data())
def test_every_node_is_released_exactly_once_and_only_after_all_its_deps(dag: dict[str, tuple[str, ...]], data: st.DataObject) -> None:
    ready = _ready(dag)
    released = ready.roots(dag)
    assert all(not dag[root] for root in released)
    seen = list(released)
    pending = list(released)
    done: set[str] = set()
    while pending:
        # Nodes finish in any order: pick any of those running.
        name = pending.pop(data.draw(st.integers(0, len(pending) - 1), label="finishes"))
        done.add(name)
        for successor in _done(ready, name):
            assert set(dag[successor]) <= done, f"{successor} released before all of {dag[successor]}"
            seen.append(successor)
            pending.append(successor)
    assert sorted(seen) == sorted(dag), "every node released exactly once"
    assert ready.unsettled == 0

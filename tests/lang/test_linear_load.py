"""Loading takes time linear in the size of the flow, in every part of it.

Each case times one part on an input and on one 20 times larger, and asserts the larger takes
less than 100 times as long: linear work gives about 20, quadratic about 400. Ratios, never
wall-clock bounds, so a slow or busy machine does not fail them. Each time is the best of a
few runs, with Python's cyclic garbage collector paused: when it runs depends on what else
the process holds, which is noise here, not the loader's own work.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from planner.errors import FlowFileError
from planner.graph import compile_flow
from planner.lang.expr import ExprSyntaxError
from planner.lang.expr import parse as parse_expr
from planner.lang.loader import load_spec, load_text
from planner.lang.refs import compile_getter, compile_sql, parse_value

pytestmark = pytest.mark.slow

SCALE = 20
# Linear is 20x, quadratic 400x: 100x leaves room for a busy machine (seen: 64x for a linear
# part while eight other test runs shared two cores) and still catches the quadratic class.
MAX_GROWTH = 100


def _best_of(repeat: int, run: Callable[[], object]) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            run()
        except (FlowFileError, ExprSyntaxError):
            pass  # the error paths are timed too: the error is the expected outcome
        best = min(best, time.perf_counter() - start)
    return best


def _growth(make: Callable[[int], Any], run: Callable[[Any], object], n: int) -> float:
    """How many times longer `run` takes on `make(SCALE * n)` than on `make(n)`."""
    small, big = make(n), make(SCALE * n)
    gc.collect()
    gc.disable()
    try:
        return _best_of(3, lambda: run(big)) / _best_of(7, lambda: run(small))
    finally:
        gc.enable()


def _flow(text: str) -> object:
    return compile_flow(load_text(text, file="t.yaml", name="t"))


@dataclass(frozen=True)
class Case:
    make: Callable[[int], Any]
    run: Callable[[Any], object]
    n: int


def _when_flow(expression: str) -> str:
    return f"inputs: {{a: int}}\nnodes:\n  n:\n    sql: SELECT 1\n    when: '{expression}'\n"


_SQL_UNIT = "SELECT $a.b, 'x''y', \"id\", /* c /* d */ */ $t$ $no $t$, E'\\'' -- $no\n, a$b, $$ $no $$ "


def _indented(text: str) -> str:
    return "".join(f"      {line}\n" for line in text.splitlines())


def _chain(n: int) -> str:
    """n nodes, each using the one before in `sql`, `when` and `after`, and an output of each."""
    nodes = "".join(
        f"  n{i}:\n    sql: SELECT $n{i - 1}.x\n    when: $n{i - 1}.ok and not $a\n    after: [n{i - 1}]\n" for i in range(1, n)
    )
    output = "".join(f"  o{i}: $n{i}\n" for i in range(n))
    return f"inputs: {{a: bool}}\nnodes:\n  n0: {{sql: SELECT 1}}\n{nodes}output:\n{output}"


def _block_scalars(n: int) -> str:
    return "nodes:\n" + "".join(f"  n{i}:\n    sql: |\n\n      SELECT 1\n      FROM t\n    fetch: one\n" for i in range(n))


def _unknown_reference(n: int) -> str:
    nodes = "".join(f"  node_number_{i}: {{sql: SELECT 1}}\n" for i in range(n))
    return f"nodes:\n{nodes}  last: {{sql: SELECT $node_number_x}}\n"


def _file_with_when_list(tmp_dir: Path) -> Callable[[int], Path]:
    def make(n: int) -> Path:  # 24 bytes an item: 40,000 items make about 1 MB
        path = tmp_dir / f"w{n}.yaml"
        path.write_text(_when_flow("$a in [" + ", ".join(['"abcdefghijklmnopqrst"'] * n) + "]"))
        return path

    return make


CASES = {
    "when-tokens-list": Case(lambda n: "$a in [" + ",".join(["$abcdefghij.klmnopqrst"] * n) + "]", parse_expr, 2000),
    "when-tokens-and": Case(lambda n: " and ".join(["$a.b"] * n), parse_expr, 3000),
    "when-spaces-and-lines": Case(lambda n: "$a and\n   " * n + "$a", parse_expr, 3000),
    "when-error-at-the-end": Case(lambda n: _when_flow("$a and " * n + "$a and oops"), _flow, 2000),
    "sql-scanner": Case(lambda n: _SQL_UNIT * n, compile_sql, 300),
    "sql-error-at-the-end": Case(lambda n: "nodes:\n  a:\n    sql: |\n" + _indented(_SQL_UNIT * n + "'open"), _flow, 300),
    "with-template": Case(lambda n: {f"k{i}": ["$a.b", {"c": "$d"}, 1] for i in range(n)}, lambda v: compile_getter(parse_value(v).value), 1000),
    "yaml-block-scalars-and-marks": Case(_block_scalars, _flow, 200),
    "yaml-number-like-text": Case(lambda n: "nodes:\n  a:\n    sql: SELECT 1\n    default: " + "1:11:" * n + "x\n", _flow, 4000),
    "graph-chain": Case(lambda n: load_text(_chain(n), file="t.yaml", name="t"), compile_flow, 150),
    "unknown-reference-suggestion": Case(_unknown_reference, _flow, 200),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_loading_time_grows_linearly(case: Case) -> None:
    growth = _growth(case.make, case.run, case.n)
    assert growth < MAX_GROWTH, f"{SCALE}x the input took {growth:.0f}x the time"


def test_a_flow_file_with_a_huge_when_loads_in_linear_time(tmp_path: Path) -> None:
    """The reported case (a `when:` list of 1.97 MB took 36 s), from the file to the graph."""
    growth = _growth(_file_with_when_list(tmp_path), lambda path: compile_flow(load_spec(path)), 2000)
    assert growth < MAX_GROWTH, f"{SCALE}x the input took {growth:.0f}x the time"

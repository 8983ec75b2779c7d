"""A run as Chrome trace-event JSON (Perfetto, chrome://tracing), and back.

Perfetto cannot draw overlapping complete events on one thread, so nodes that run at the same
time get lanes of their own: the smallest set of lanes, assigned greedily by start time.

Besides the events, `otherData` holds the run's status, elapsed time, every node's state and,
for skipped nodes, why (`skipped`: `"when false"`, `"$x is null"`) where planner can tell it
from the nodes' values after the run (see `skip_reasons`). A skipped node never ran, so it has
no event; older traces have no `skipped` and are read as before.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.graph import CompiledFlow
from planner.lang.expr import evaluate, refs_of
from planner.lang.models import NAME_RE
from planner.lang.refs import Ref, Unresolved, resolve
from planner.results import FlowResult, NodeState, error_text

STATES = tuple(state.value for state in NodeState)
STATUSES = ("ok", "failed", "timeout")  # what `FlowResult.status` can be
MAX_TRACE_BYTES = 256 * 1024 * 1024  # bounds what a hostile path costs; real runs write far less


class TraceError(ValueError):
    """A trace file that planner did not write, or that does not belong to the flow it is drawn with."""


@dataclass(frozen=True)
class Span:
    """One node's time on the clock. Checked on construction: renderers may trust every field.
    Messages name the fields as a trace file spells them, where a hostile value comes from."""

    node: str
    state: str
    start_ms: float
    end_ms: float
    lane: int
    error: str | None

    def __post_init__(self) -> None:
        _check_name(self.node, "name")
        _check_choice(self.state, STATES, "args.state")
        _check_time(self.start_ms, "start")
        _check_time(self.end_ms, "end")
        if self.end_ms < self.start_ms:
            raise TraceError(f"end: {self.end_ms:g} ms is before the start, {self.start_ms:g} ms")
        if type(self.lane) is not int or self.lane < 0:
            raise TraceError(f"lane: {_shown(self.lane)} is not a lane number")
        if self.error is not None:
            _check_text(self.error, "args.error")


@dataclass(frozen=True)
class RunData:
    """What a trace says about a run: each node's state, and the spans of those that ran.

    Checked on construction, so a hostile trace is refused here, never half drawn.
    """

    flow: str
    status: str
    elapsed_ms: float
    states: dict[str, str]
    spans: list[Span]
    skipped: dict[str, str] = field(default_factory=dict)  # why a skipped node was, where known

    def __post_init__(self) -> None:
        _check_text(self.flow, "flow")
        _check_choice(self.status, STATUSES, "status")
        _check_time(self.elapsed_ms, "elapsed_ms")
        if not isinstance(self.states, dict):
            raise TraceError(f"states: {_shown(self.states)} is not an object of node names to states")
        for node, state in self.states.items():
            _check_name(node, "states")
            _check_choice(state, STATES, f"states[{node!r}]")
        for span in self.spans:
            if not isinstance(span, Span):
                raise TraceError(f"spans: {_shown(span)} is not a Span")
            if span.node not in self.states:
                raise TraceError(f"states: no state for node {span.node!r}, which ran")
        if not isinstance(self.skipped, dict):
            raise TraceError(f"skipped: {_shown(self.skipped)} is not an object of node names to reasons")
        for node, reason in self.skipped.items():
            _check_name(node, "skipped")
            _check_text(reason, f"skipped[{node!r}]")
            if self.states.get(node) != "skipped":
                raise TraceError(f"skipped: node {node!r} has a reason to be skipped but its state is {_shown(self.states.get(node))}")


def _shown(value: object) -> str:
    """A value from the file, as it may appear in a one-line message: repr (no raw control
    characters, no newline) and short (a hostile file can hold megabytes in one string)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TraceError(f"{what}: {_shown(value)} is not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (`"\\ud800"` in JSON) would crash every writer later
        raise TraceError(f"{what}: {_shown(value)} is not valid Unicode") from None
    return value


def _check_name(value: object, what: str) -> None:
    # fullmatch, not match: NAME_RE's `$` also matches before a final newline
    if not NAME_RE.fullmatch(_check_text(value, what)):
        raise TraceError(f"{what}: {_shown(value)} is not a node name")


def _check_choice(value: object, choices: tuple[str, ...], what: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise TraceError(f"{what}: {_shown(value)} is not one of {', '.join(choices)}")


def _check_time(value: object, what: str) -> None:
    # bool is an int to Python, never a time to a trace
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceError(f"{what}: {_shown(value)} is not a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite or value < 0:
        raise TraceError(f"{what}: {_shown(value)} is not a time (a finite number, not negative)")


def lanes(intervals: list[tuple[str, float, float]]) -> dict[str, int]:
    """Interval partitioning: a lane per node such that no two nodes in a lane overlap."""
    free: list[tuple[float, int]] = []  # (end, lane) of lanes in use
    assigned: dict[str, int] = {}
    count = 0
    for name, start, end in sorted(intervals, key=lambda i: (i[1], i[2])):
        if free and free[0][0] <= start:
            _, lane = heapq.heappop(free)
        else:
            lane, count = count, count + 1
        assigned[name] = lane
        heapq.heappush(free, (end, lane))
    return assigned


class _NoInput(Exception):
    """A reference to one of the run's inputs, which a trace is not told."""


class _NodeValues(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        raise _NoInput(key)


def skip_reasons(result: FlowResult, flow: CompiledFlow) -> dict[str, str]:
    """Why each skipped node was skipped, where the nodes' values after the run tell it.

    A node is skipped when its `when:` is false, or when a reference (in `when:` or in what it
    runs) walks into null. The executor decided it with the values of the node's dependencies,
    which had settled and do not change after: evaluating the same `when:` and references on
    them gives the same answer. The inputs are not in the result: a reason that depends on one
    is left out (renderers then show the `when:` as written)."""
    skipped = [name for name, node in result.nodes.items() if node.state is NodeState.SKIPPED and name in flow.nodes]
    if not skipped:
        return {}
    values = _NodeValues((name, node.value) for name, node in result.nodes.items())
    reasons = {}
    for name in skipped:
        reason = _skip_reason(flow, name, values)
        if reason:
            reasons[name] = reason
    return reasons


def _skip_reason(flow: CompiledFlow, name: str, values: _NodeValues) -> str | None:
    node = flow.nodes[name]
    in_when = set(refs_of(node.when)) if node.when is not None else set()
    try:
        if node.when is not None:
            try:
                if not evaluate(node.when, values):
                    return "when false"
            except Unresolved as exc:
                return _null_reason(next((r for r in in_when if str(r) == str(exc)), None), values)
        # `when:` was true: a reference of what the node runs walked into null. Those of `when:`
        # are left out: one it did not read (`$a or $b.x`) may be null without being the reason.
        for ref in node.refs:
            if ref in in_when:
                continue
            try:
                resolve(ref, values)
            except Unresolved:
                return _null_reason(ref, values)
            except _NoInput:
                continue
    except Exception:  # an input, or a value the executor saw differently: say nothing rather than guess
        return None
    return None


def _null_reason(ref: Ref | None, values: _NodeValues) -> str | None:
    """`$a.b is null` for the step of `ref` that met null; `$a.rows has no item 3` for a short
    list. Walks as `planner.lang.refs.resolve` does."""
    if ref is None:
        return None
    value = values[ref.root]
    for i, key in enumerate(ref.path):
        prefix = "$" + ".".join((ref.root, *ref.path[:i]))
        if value is None:
            return f"{prefix} is null"
        if isinstance(value, (list, tuple)) and key.isdigit():
            if int(key) >= len(value):
                return f"{prefix} has no item {key}"
            value = value[int(key)]
        elif isinstance(value, dict) or hasattr(value, "get"):
            value = value.get(key)
        else:
            return None
    return None


def trace_events(result: FlowResult, flow: CompiledFlow) -> dict[str, Any]:
    """The run `result` of `flow` in Chrome's trace event format (Perfetto, chrome://tracing):
    one complete event per node that started, on lanes that never overlap, and the run's
    status, states and skip reasons in `otherData` (what `read_trace` reads back)."""
    ran = [(n, r.started_ms, r.finished_ms if r.finished_ms is not None else result.elapsed_ms)
           for n, r in result.nodes.items() if r.started_ms is not None]
    lane_of = lanes([(n, s, e) for n, s, e in ran])
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": f"flow {result.flow} ({result.mode})"}},
    ]
    for lane in sorted(set(lane_of.values())):
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": lane + 1, "args": {"name": f"lane {lane + 1}"}})
    for name, start, end in ran:
        node = result.nodes[name]
        events.append({
            "name": name, "cat": node.state.value, "ph": "X", "pid": 1, "tid": lane_of[name] + 1,
            "ts": round(start * 1000, 1), "dur": round(max(end - start, 0.0) * 1000, 1),
            "args": {"state": node.state.value, "group": flow.group_of.get(name), "attempts": node.attempts,
                     "error": None if node.error is None else error_text(node.error),
                     # the compiled statement that answered it (`planner explain` prints it)
                     **({"compiled": node.served.compiled} if node.served and node.served.compiled else {})},
        })
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"flow": result.flow, "run_id": result.run_id, "status": result.status,
                      "elapsed_ms": result.elapsed_ms, "states": result.states(),
                      "skipped": skip_reasons(result, flow)},
    }


def write_trace(result: FlowResult, flow: CompiledFlow, path: Path) -> None:
    """Write `trace_events` of the run to `path` (`planner run --trace`)."""
    path.write_text(json.dumps(trace_events(result, flow), indent=1))


def read_trace(path: Path, flow: CompiledFlow | None = None) -> RunData:
    """Read a trace written by `write_trace`, checking every field it uses.

    With `flow`, the trace must also be a run of that flow: its name, and only its nodes.
    Raises `TraceError` (a `ValueError`) with a one-line message naming the file and the field.
    """
    try:
        data = _load_json(Path(path))
        try:
            run = _run_data(data)
        except TraceError as exc:
            raise TraceError(f"not a planner trace: {exc}") from None
        if flow is not None:
            _check_flow(run, flow)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None
    return run


def _load_json(path: Path) -> Any:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_TRACE_BYTES + 1)  # bounded: a device or a huge file must not hang the CLI
    except OSError as exc:
        raise TraceError(f"cannot read it: {exc.strerror or exc}") from None
    if len(raw) > MAX_TRACE_BYTES:
        raise TraceError(f"larger than {MAX_TRACE_BYTES} bytes: not a planner trace")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:  # nesting deeper than the parser's stack
        raise TraceError("not a planner trace: JSON nested too deeply") from None
    except ValueError as exc:  # bad JSON, bad UTF-8, an int of thousands of digits, NaN
        raise TraceError(f"not a planner trace: {_first_line(str(exc))}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise TraceError(f"{where or 'the file'} is not a JSON object")
    if key not in obj:
        raise TraceError(f"{where + '.' if where else ''}{key} is missing")
    return obj[key]


def _run_data(data: Any) -> RunData:
    other, events = _field(data, "otherData", ""), _field(data, "traceEvents", "")
    if not isinstance(events, list):
        raise TraceError("traceEvents is not a list")
    spans = [_span(event, f"traceEvents[{i}]", len(events)) for i, event in enumerate(events) if _field(event, "ph", f"traceEvents[{i}]") == "X"]
    flow, status, elapsed, states = (_field(other, key, "otherData") for key in ("flow", "status", "elapsed_ms", "states"))
    skipped = other.get("skipped", {})  # not in traces written before planner recorded it
    try:
        return RunData(flow, status, elapsed, states, spans, skipped)
    except TraceError as exc:
        raise TraceError(f"otherData.{exc}") from None


def _span(event: Any, where: str, max_lane: int) -> Span:
    """A complete ("X") event as a Span. What Span cannot see is checked here: the file's
    microseconds (before the arithmetic) and its lane numbers (counted from 1)."""
    name, ts, dur, tid, args = (_field(event, key, where) for key in ("name", "ts", "dur", "tid", "args"))
    state = _field(args, "state", f"{where}.args")
    _check_time(ts, f"{where}.ts")
    _check_time(dur, f"{where}.dur")
    if type(tid) is not int or not 1 <= tid <= max_lane:  # never more lanes than events
        raise TraceError(f"{where}.tid: {_shown(tid)} is not a lane (a whole number from 1)")
    try:
        return Span(name, state, ts / 1000, (ts + dur) / 1000, tid - 1, args.get("error"))
    except TraceError as exc:
        raise TraceError(f"{where}.{exc}") from None


def _check_flow(run: RunData, flow: CompiledFlow) -> None:
    if run.flow != flow.name:
        raise TraceError(f"a trace of flow {_shown(run.flow)}, not of {flow.name!r}")
    strangers = [n for n in run.states if n not in flow.nodes]
    if strangers:
        listed = ", ".join(repr(n) for n in strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
        raise TraceError(f"names nodes that flow {flow.name!r} does not have: {listed} (a trace of another version of it?)")

"""Text renderings of a flow: the plan table, Mermaid and DOT. Pure functions, no I/O.

What every picture says is worked out here once (`picture`), so the CLI's table, Mermaid, DOT,
SVG and HTML agree: the latency estimate and where it comes from (`estimate`: recorded medians,
`latency:` hints, or nothing known, never a made-up 0 ms), the critical path to mark (a traced
run's own, through its finish times, else the estimate's), each node's error or reason to be
skipped (`outcomes`), and every figure rounded for people (`ms_number`, `ms_text`).

Every string drawn (node names, `when:` text, states, flow names) passes through `plain`
and then the target format's own escaping, so no text can end a label, a statement or a line.
Each renderer is linear in the size of the flow: flows of tens of thousands of nodes are drawn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from planner.graph import CompiledFlow, Plan
from planner.kinds import kind_of
from planner.views.trace import RunData

MERMAID_MAX_EDGES = 500
MERMAID_MAX_TEXT = 50_000
STATE_FILLS = {"ok": "#e8f6ec", "defaulted": "#fff4d6", "skipped": "#eeeeee", "failed": "#fde2e1", "cancelled": "#f3e5f5"}
NO_LATENCY = "no latency known: add latency: hints or run the flow"
OUTCOME_CHARS = 60  # of a node's error or skip reason in a Mermaid or DOT label (the tooltip has it whole)


@dataclass(frozen=True)
class PlanRow:
    """One node's line of `planner plan`: what it waits for, its group, its expected latency."""

    node: str
    kind: str
    waits_for: tuple[str, ...]
    group: int
    expected_ms: float | None
    critical: bool
    when: str | None
    latency_from: str | None = None  # "recorded" (median of recorded runs), "hint" (`latency:`) or None


def plain(text: str, *, lines: bool = False) -> str:
    """`text` with nothing a renderer must not pass on: line breaks and tabs become spaces
    (kept with `lines=True`), other unprintable characters (controls, bidi overrides, lone
    surrogates, characters XML forbids) become U+FFFD."""
    if text.isprintable():  # the usual case, checked in C
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif char in "\n\r\t":
            out.append("\n" if lines and char == "\n" else " ")
        else:
            out.append("\ufffd")
    return "".join(out)


# --- numbers for people ---------------------------------------------------------------------


def ms_number(ms: float) -> str:
    """A duration in milliseconds as people read it: `2.6`, not `2.5725`; `50`, not `50.0`.

    Whole milliseconds from 100 up, one decimal from 1, two below 1 (`0.04`); never `0` for
    what is not zero (`<0.01`). Every renderer and the CLI use it (and `ms_text`)."""
    size = abs(ms)
    if size == 0:
        return "0"
    digits = 0 if size >= 100 else 1 if size >= 1 else 2
    text = f"{size:.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text == "0":
        text = "<0.01"
    return ("-" if ms < 0 else "") + text


def ms_text(ms: float) -> str:
    """`ms_number` with its unit: `2.6 ms`."""
    return f"{ms_number(ms)} ms"


# --- what is known of a flow's latency ------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A plan's latency figures as the renderers may state them: only what a hint or a record
    gives. A plan with no latency at all has no estimate (not "0 ms"), and no critical path."""

    plan: Plan
    expected: dict[str, float]  # each node with a hint or a record: its expected ms
    origin: dict[str, str]  # the same nodes: "recorded" or "hint"

    @property
    def known(self) -> bool:
        return bool(self.expected)

    @property
    def unknown(self) -> tuple[str, ...]:
        """Nodes counted as 0 ms in a partial estimate."""
        return self.plan.unknown if self.known else ()

    @property
    def source(self) -> str:
        origins = set(self.origin.values())
        if not origins:
            return "none"
        if origins == {"recorded"}:
            return "recorded runs"
        if origins == {"hint"}:
            return "latency: hints"
        return "recorded runs and latency: hints"

    @property
    def critical_path(self) -> tuple[str, ...]:
        return self.plan.critical_path if self.known else ()

    @property
    def sequential_ms(self) -> float | None:
        return self.plan.sequential_ms if self.known else None

    @property
    def parallel_ms(self) -> float | None:
        return self.plan.parallel_ms if self.known else None

    @property
    def lower_percent(self) -> float | None:
        plan = self.plan
        return (1 - plan.parallel_ms / plan.sequential_ms) * 100 if self.known and plan.sequential_ms else None

    def summary(self) -> str:
        """`sequential 530 ms, parallel 250 ms: 53% lower (2.12x)`, or why there is no estimate."""
        if not self.known:
            return NO_LATENCY
        text = f"sequential {ms_text(self.plan.sequential_ms)}, parallel {ms_text(self.plan.parallel_ms)}"
        lower = self.lower_percent
        return text + ("" if lower is None else f": {lower:.0f}% lower ({self.plan.speedup:.2f}x)")


def estimate(flow: CompiledFlow, plan: Plan, recorded: Mapping[str, float] | None = None) -> Estimate:
    """What `plan` knows of each node's latency, and where it comes from.

    `recorded` is what the plan was made with (`planner.views.stats.recorded_latencies`); without it,
    a node with no hint whose latency is known must have had a record. A linear pass:
    `plan.unknown` is a tuple, and asking it once per node made drawing quadratic in nodes.
    """
    unknown = set(plan.unknown)
    recorded = recorded or {}
    expected, origin = {}, {}
    for name, ms in plan.latency_ms.items():
        if name in unknown:
            continue
        expected[name] = ms
        hinted = name in flow.nodes and flow.nodes[name].latency is not None
        origin[name] = "recorded" if name in recorded or not hinted else "hint"
    return Estimate(plan, expected, origin)


# --- a run, as the drawings tell it ---------------------------------------------------------


def run_critical_path(flow: CompiledFlow, run: RunData) -> tuple[str, ...]:
    """The critical path of a traced run: from the node that finished last, back through the
    dependency each node waited for longest (the one that finished last), to a root.

    A node without a span (skipped, or cancelled before it started) settled when its last
    dependency did. Nodes the run never reached are left out. Empty when nothing ran."""
    ends = {span.node: span.end_ms for span in run.spans}
    if not ends:
        return ()
    finish: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for name in flow.order:
        if name not in run.states:
            continue
        deps = [d for d in flow.nodes[name].deps if d in finish]
        best = max(deps, key=lambda d: finish[d], default=None)  # first of equals: the YAML's order
        via[name] = best
        finish[name] = ends[name] if name in ends else finish[best] if best else 0.0
    last = max(ends, key=lambda n: (ends[n], flow.nodes[n].index) if n in flow.nodes else (ends[n], -1))
    if last not in via:
        return ()
    path: list[str] = []
    step: str | None = last
    while step is not None:
        path.append(step)
        step = via[step]
    return tuple(reversed(path))


def outcome(flow: CompiledFlow, run: RunData | None, name: str) -> str | None:
    """What happened to a node, in one line of words, when its state alone does not say it:
    a failed or defaulted node's error, why a skipped node was skipped. None for the others.

    A trace records a skipped node's reason (`when false`, `$x is null`) when planner could
    tell it; an older trace, or one whose reason depended on the run's inputs, gets the
    node's `when:` as written."""
    if run is None or name not in run.states:
        return None
    state = run.states[name]
    if state in ("failed", "defaulted"):
        error = next((span.error for span in run.spans if span.node == name and span.error), None)
        return f"{state}: {error}" if error else None
    if state == "skipped":
        reason = run.skipped.get(name)
        if reason:
            return f"skipped: {reason}"
        when = when_text(flow, name) if name in flow.nodes else None
        return f"skipped (when: {when})" if when else "skipped: a reference was null"
    if state == "cancelled":
        return "cancelled: the run stopped before this node settled"
    return None


def outcomes(flow: CompiledFlow, run: RunData | None) -> dict[str, str]:
    """`outcome` of every node that has one (linear: the spans are read once)."""
    if run is None:
        return {}
    errors = {span.node: span.error for span in run.spans if span.error}
    out = {}
    for name, state in run.states.items():
        if state in ("failed", "defaulted"):
            if name in errors:
                out[name] = f"{state}: {errors[name]}"
        elif state in ("skipped", "cancelled"):
            text = outcome(flow, run, name)
            if text:
                out[name] = text
    return out


def clip(text: str, limit: int) -> str:
    """`text` on one line, at most `limit` characters (the last an ellipsis when cut)."""
    text = " ".join(plain(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the plan table -------------------------------------------------------------------------


def plan_rows(flow: CompiledFlow, plan: Plan, recorded: Mapping[str, float] | None = None,
              critical: Sequence[str] | None = None) -> list[PlanRow]:
    """One row per node, in group order: the table the seed's analysis drew by hand.

    `critical` marks another path than the estimate's (a traced run's)."""
    est = estimate(flow, plan, recorded)
    on_path = set(est.critical_path if critical is None else critical)
    rows = []
    for group in plan.groups:
        for name in group:
            node = flow.nodes[name]
            rows.append(
                PlanRow(
                    node=name,
                    kind=node.kind,
                    waits_for=node.deps,
                    group=flow.group_of[name],
                    expected_ms=est.expected.get(name),
                    critical=name in on_path,
                    when=when_text(flow, name),
                    latency_from=est.origin.get(name),
                )
            )
    return rows


def when_text(flow: CompiledFlow, name: str) -> str | None:
    """The `when:` of a node as its author wrote it."""
    spec = flow.loaded.spec.nodes[name]
    if spec.when is None or spec.when is True:
        return None
    return str(spec.when).lower() if isinstance(spec.when, bool) else spec.when


def plan_json(flow: CompiledFlow, plan: Plan, source: str | None = None,
              recorded: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The plan as data. With no latency known, the estimate is null (not 0) and so is the
    critical path's list empty; `latency_source` is then "none"."""
    est = estimate(flow, plan, recorded)
    return {
        "flow": flow.name,
        "latency_source": est.source if source is None else source,
        "latency_note": None if est.known else NO_LATENCY,
        "groups": [list(g) for g in plan.groups],
        "critical_path": list(est.critical_path),
        "sequential_ms": est.sequential_ms,
        "parallel_ms": est.parallel_ms,
        "speedup": round(plan.speedup, 3) if est.known else None,
        "unknown": list(est.unknown),
        "nodes": [
            {
                "node": r.node,
                "kind": r.kind,
                "waits_for": list(r.waits_for),
                "group": r.group,
                "expected_ms": r.expected_ms,
                "latency_from": r.latency_from,
                "critical": r.critical,
                "when": r.when,
            }
            for r in plan_rows(flow, plan, recorded)
        ],
    }


# --- Mermaid ------------------------------------------------------------------------------


class RenderError(ValueError):
    """The graph cannot be drawn in the asked format (say, too many edges for Mermaid)."""


def _mermaid_id(name: str) -> str:
    # Prefixed, so `end`, `o...` and `x...` can never be read as Mermaid keywords or edge heads.
    return "n_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)


# Mermaid's entity codes. `#` first, or `#quot;` typed by an author would come out as `"`;
# a backtick opens a Markdown string. Labels are already `plain`: no line break ends a statement.
_MERMAID_ESCAPES = str.maketrans({"#": "#35;", "&": "#amp;", '"': "#quot;", "<": "#lt;", ">": "#gt;", "`": "#96;"})


def _mermaid_label(parts: list[str]) -> str:
    return '"' + "<br/>".join(p.translate(_MERMAID_ESCAPES) for p in parts) + '"'


def edges(flow: CompiledFlow) -> list[tuple[str, str, bool]]:
    """(from, to, ordering_only) for every edge of the flow."""
    out = []
    for name, node in flow.nodes.items():
        data = {r.root for r in node.refs}
        for dep in node.deps:
            out.append((dep, name, dep not in data))
    return out


@dataclass(frozen=True)
class Picture:
    """What every drawing of a flow says, worked out once: the estimate, the critical path to
    mark (a traced run's when there is one, else the estimate's, else none), each node's state
    and, where its state does not say it all, its outcome in words."""

    flow: CompiledFlow
    plan: Plan
    estimate: Estimate
    run: RunData | None
    critical_path: tuple[str, ...]
    critical_of_run: bool  # the marked path is the traced run's (by its finish times)
    outcomes: dict[str, str]

    @property
    def states(self) -> dict[str, str]:
        return self.run.states if self.run else {}

    def legend(self) -> str:
        """One line: the marked path and what it is, the estimate or why there is none."""
        est = self.estimate
        parts = []
        if self.critical_of_run:
            parts.append("critical path of this run (by finish times): " + " → ".join(self.critical_path))
        elif self.critical_path:
            parts.append(f"critical path (estimated from {est.source}): " + " → ".join(self.critical_path))
        parts.append(("estimate: " if self.critical_of_run and est.known else "") + est.summary())
        if est.unknown:
            count = len(est.unknown)
            parts.append(f"{count} node{'s' if count != 1 else ''} without a latency counted as 0")
        return " · ".join(parts)


def picture(flow: CompiledFlow, plan: Plan, run: RunData | None = None,
            recorded: Mapping[str, float] | None = None) -> Picture:
    """What every drawing of `flow` shows (Mermaid, DOT, SVG, HTML): the estimate from `recorded`
    latencies or hints, and with `run`, its outcomes and the critical path it actually took."""
    est = estimate(flow, plan, recorded)
    traced = run_critical_path(flow, run) if run is not None else ()
    return Picture(flow, plan, est, run, traced or est.critical_path, bool(traced), outcomes(flow, run))


def _node_label(pic: Picture, name: str) -> list[str]:
    """The lines of a node's label, each `plain`: the caller escapes them for its format."""
    node = pic.flow.nodes[name]
    ms = pic.estimate.expected.get(name)
    parts = [name, node.kind + ("" if ms is None else f" · {ms_text(ms)}")]
    when = when_text(pic.flow, name)
    if when:
        parts.append(f"when {when}")
    note = pic.outcomes.get(name)
    if note and not (when and note.startswith("skipped (when:")):  # the `when` line above says it
        parts.append(clip(note, OUTCOME_CHARS))
    elif name in pic.states:
        parts.append(pic.states[name])
    return [plain(p) for p in parts]


def mermaid(flow: CompiledFlow, plan: Plan, run: RunData | None = None, *,
            recorded: Mapping[str, float] | None = None) -> str:
    """A Mermaid flowchart: groups as subgraphs left to right, the critical path marked (a
    traced run's, when `run` is given), nodes coloured by the run's states."""
    all_edges = edges(flow)
    if len(all_edges) > MERMAID_MAX_EDGES:
        raise RenderError(f"Mermaid draws at most {MERMAID_MAX_EDGES} edges and this flow has {len(all_edges)}: use --format dot or svg")
    pic = picture(flow, plan, run, recorded)
    lines = ["flowchart LR", "  %% " + plain(pic.legend())]  # a comment: node names (all a comment can hold) cannot end a line
    for i, group in enumerate(plan.groups, 1):
        lines.append(f'  subgraph g{i}["group {i}"]')
        lines.append("    direction TB")
        for name in group:
            shape = ("[", "]") if kind_of(flow.nodes[name].kind).shape == "box" else ("([", "])")
            label = _mermaid_label(_node_label(pic, name))
            lines.append(f"    {_mermaid_id(name)}{shape[0]}{label}{shape[1]}")
        lines.append("  end")
    critical = set(zip(pic.critical_path, pic.critical_path[1:], strict=False))
    link_styles = []
    for index, (a, b, ordering) in enumerate(all_edges):
        arrow = "-.->" if ordering else ("==>" if (a, b) in critical else "-->")
        lines.append(f"  {_mermaid_id(a)} {arrow} {_mermaid_id(b)}")
        if (a, b) in critical:
            link_styles.append(str(index))
    lines.append("  classDef critical stroke:#c0392b,stroke-width:3px")
    for state, fill in STATE_FILLS.items():
        lines.append(f"  classDef {state} fill:{fill}")
    if pic.critical_path:
        lines.append("  class " + ",".join(_mermaid_id(n) for n in pic.critical_path) + " critical")
    by_state: dict[str, list[str]] = {}
    for name, state in pic.states.items():
        if state in STATE_FILLS and name in flow.nodes:  # anything else has no class to name
            by_state.setdefault(state, []).append(name)
    for state in STATE_FILLS:
        if state in by_state:
            lines.append("  class " + ",".join(_mermaid_id(n) for n in by_state[state]) + f" {state}")
    if link_styles:
        lines.append(f"  linkStyle {','.join(link_styles)} stroke:#c0392b,stroke-width:3px")
    text = "\n".join(lines) + "\n"
    if len(text) > MERMAID_MAX_TEXT:
        raise RenderError(f"the Mermaid text is {len(text)} characters, over Mermaid's {MERMAID_MAX_TEXT}: use --format dot or svg")
    return text


# --- DOT ----------------------------------------------------------------------------------


def _dot_str(text: str) -> str:
    # A JSON string is a valid DOT quoted string: `"` and `\` escaped, so no text ends it or
    # becomes one of Graphviz's `\N`/`\G` escapes; a line break becomes the label's `\n`.
    return json.dumps(plain(text, lines=True), ensure_ascii=False)


def dot(flow: CompiledFlow, plan: Plan, run: RunData | None = None, *,
        recorded: Mapping[str, float] | None = None) -> str:
    """Graphviz DOT: one `cluster_` per group (ranked left to right), the critical path in red
    (a traced run's, when `run` is given); a node's tooltip has its `when:` and outcome whole."""
    pic = picture(flow, plan, run, recorded)
    critical_nodes = set(pic.critical_path)
    critical = set(zip(pic.critical_path, pic.critical_path[1:], strict=False))
    states = pic.states
    lines = [f"digraph {_dot_str(flow.name)} {{", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=11];',
             f"  label={_dot_str(pic.legend())}; labelloc=b; fontsize=10;"]
    for i, group in enumerate(plan.groups, 1):
        lines.append(f"  subgraph cluster_g{i} {{")
        lines.append(f'    label="group {i}"; style="rounded,dashed"; color="#999999";')
        for name in group:
            when = when_text(flow, name)
            tip = [name, *([f"when {when}"] if when else []), *([pic.outcomes[name]] if name in pic.outcomes else [])]
            attrs = {
                "label": "\n".join(_node_label(pic, name)),
                "shape": "box" if kind_of(flow.nodes[name].kind).shape == "box" else "ellipse",
                "style": "filled" + (",dashed" if when else ""),
                "fillcolor": STATE_FILLS.get(states.get(name, ""), "#ffffff"),
                "tooltip": "\n".join(tip),
            }
            if name in critical_nodes:
                attrs.update(color="#c0392b", penwidth="2.5")
            lines.append(f"    {_dot_str(name)} [" + ", ".join(f"{k}={_dot_str(v)}" for k, v in attrs.items()) + "];")
        lines.append("  }")
    for a, b, ordering in edges(flow):
        edge_attrs = []
        if ordering:
            edge_attrs.append('style="dashed"')
        if (a, b) in critical:
            edge_attrs.append('color="#c0392b", penwidth="2.5"')
        lines.append(f"  {_dot_str(a)} -> {_dot_str(b)}" + (f" [{', '.join(edge_attrs)}]" if edge_attrs else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"

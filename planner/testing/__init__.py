"""Record and replay: test code that runs flows, once against a database, then without one.

A `Cassette` is a JSON file of runs. Recording runs a flow against a real database and keeps,
for each node that needs the database (every `sql:` node, and `call:` nodes whose function
takes `db`), its value and state and a hash of its statements. Replaying runs the same flow
with the same inputs and every such node settled from the recording through `overrides=`:
no pool is opened and no database is needed, while the flow's Python nodes, `when:`
conditions and `output:` run for real. A node whose statements changed since the recording
(or one added or removed) fails the replay loudly, naming the node: a stale recording never
passes silently.

    cassette = Cassette("tests/cassettes/escalation.json")
    result = await cassette.record(planner, "escalation", inputs)   # a Planner on a real database
    cassette.save()
    ...
    cassette = Cassette.load("tests/cassettes/escalation.json")
    result = await cassette.replay(offline_planner(), "escalation", inputs)   # no database

The pytest plugin wraps this as the `planner_replay` fixture (`--planner-record=once|none|all`).

What a replay gives back: the recorded nodes carry their recorded value and state (`ok`,
`defaulted`, `skipped`; `attempts` 0); everything else is computed. Runs are replayed in the
order they were recorded, and each must have the flow and inputs it was recorded with. A run
that raises (`FlowFailed`, `FlowInputError`...) is not recorded: test failure paths with
`overrides=` of your own. Values are kept as JSON with their Python types (datetimes,
decimals, UUIDs, bytes, tuples, IP addresses); a value of another type cannot be recorded and
says so.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import ipaddress
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from planner.api import Planner
from planner.graph import CompiledFlow
from planner.kinds import kind_for_model, kind_of
from planner.kinds.backend import Offline
from planner.results import FlowResult, NodeState

__all__ = ["Cassette", "CassetteError", "CassetteMismatch", "offline_planner", "recorded_nodes", "statement_hash"]

FORMAT = 1
_KEPT_STATES = ("ok", "defaulted", "skipped")


class CassetteError(Exception):
    """A cassette that cannot be written or read (a value of a type JSON cannot keep, a broken file)."""


class CassetteMismatch(AssertionError):
    """The flow or the test no longer matches the recording: re-record it against a database."""


# --- what is recorded ---------------------------------------------------------------------


def statement_hash(flow: CompiledFlow, node: str) -> str:
    """A hash of what identifies node `node`'s work, as its kind says (`NodeKind.identity`): an
    `sql:` node's SQL text (every statement) and `fetch`, a `call:` node's target and `with:`.
    Anything else (`when`, `default`, timeouts) may change without a new recording."""
    spec = flow.loaded.spec.nodes[node]
    what = kind_for_model(spec).identity(spec)
    text = json.dumps(what, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recorded_nodes(planner: Planner, flow: CompiledFlow) -> list[str]:
    """The nodes of `flow` a replay settles from the recording: those that need the database
    (every `sql:` node, and each `call:` node whose function takes a `db` parameter)."""
    return [name for name, node in flow.nodes.items() if kind_of(node.kind).uses_database(node, planner.targets)]


def offline_planner(flows: str | Path | None = None, **options: Any) -> Planner:
    """A `Planner` with no database at all: for replays (a query that reaches it raises
    `DatabaseUnavailable`)."""
    return Planner(flows=flows, backend=Offline("replaying a cassette: there is no database"), **options)


# --- the cassette -------------------------------------------------------------------------


class Cassette:
    """Runs of flows, recorded against a database or replayed from `path` without one."""

    def __init__(self, path: str | os.PathLike[str], runs: list[dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.runs: list[dict[str, Any]] = runs if runs is not None else []
        self.played = 0  # runs replayed so far

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Cassette:
        """The cassette kept at `path`. Raises `CassetteError` for a file that is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CassetteError(f"{path}: cannot read the cassette: {exc}") from exc
        if not isinstance(data, dict) or data.get("planner_cassette") != FORMAT or not isinstance(data.get("runs"), list):
            raise CassetteError(f"{path}: not a planner cassette (format {FORMAT})")
        return cls(path, data["runs"])

    def save(self) -> None:
        """Write the recorded runs to `path` (its folder is created)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"planner_cassette": FORMAT, "runs": self.runs}, indent=1, ensure_ascii=False, sort_keys=False)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(self.path)

    @property
    def unplayed(self) -> int:
        """Recorded runs that no replay has asked for yet."""
        return len(self.runs) - self.played

    async def record(
        self,
        planner: Planner,
        flow: str | CompiledFlow,
        inputs: dict[str, Any] | None = None,
        *,
        mode: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> FlowResult:
        """Run `flow` on `planner` (a real database) and keep the values of the nodes that need it."""
        compiled = planner.load(flow) if isinstance(flow, str) else flow
        result = await planner.run(flow, inputs, mode=mode, overrides=overrides)
        nodes: dict[str, dict[str, Any]] = {}
        for name in recorded_nodes(planner, compiled):
            entry: dict[str, Any] = {"hash": statement_hash(compiled, name)}
            node = result.nodes.get(name)
            if overrides is not None and name in overrides:
                entry["state"] = "overridden"  # the test's own value, given again when replayed
            elif node is None:
                entry["state"] = "pruned"  # only overridden nodes needed it: it did not run
            elif node.state.value not in _KEPT_STATES:  # pragma: no cover - such a run raises FlowFailed
                raise CassetteError(f"node {name!r} of flow {compiled.name!r} ended {node.state.value}: not recorded")
            else:
                entry["state"] = node.state.value
                entry["value"] = encode(node.value, f"node {name!r} of flow {compiled.name!r}")
            nodes[name] = entry
        self.runs.append({"flow": compiled.name, "inputs": encode(inputs or {}, "the inputs"), "nodes": nodes})
        return result

    async def replay(
        self,
        planner: Planner,
        flow: str | CompiledFlow,
        inputs: dict[str, Any] | None = None,
        *,
        mode: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> FlowResult:
        """Run `flow` with the next recorded run's values in place of the database.

        Raises `CassetteMismatch` when the run differs from the recording: another flow or
        other inputs, a node whose statements changed, a node added or removed.
        """
        compiled = planner.load(flow) if isinstance(flow, str) else flow
        if self.played >= len(self.runs):
            raise CassetteMismatch(
                f"{self.path}: run {self.played + 1} (flow {compiled.name!r}) was not recorded: the cassette holds "
                f"{len(self.runs)} run(s). {RERECORD}")
        run = self.runs[self.played]
        self._check(run, planner, compiled, inputs, overrides)
        self.played += 1
        given: dict[str, Any] = {}
        for name, entry in run["nodes"].items():
            if entry["state"] in _KEPT_STATES:
                given[name] = decode(entry["value"])
            elif entry["state"] == "pruned":
                given[name] = None  # settles it (it would not run anyway): the run needs no database
        result = await planner.run(flow, inputs, mode=mode, overrides=given | (overrides or {}))
        for name, entry in run["nodes"].items():
            if entry["state"] == "pruned":
                result.nodes.pop(name, None)
            elif entry["state"] in _KEPT_STATES and name in result.nodes:
                result.nodes[name].state = NodeState(entry["state"])
        return result

    def _check(self, run: dict[str, Any], planner: Planner, flow: CompiledFlow, inputs: dict[str, Any] | None,
               overrides: dict[str, Any] | None) -> None:
        where = f"{self.path}: run {self.played + 1}"
        if run["flow"] != flow.name:
            raise CassetteMismatch(f"{where} was recorded for flow {run['flow']!r}, not {flow.name!r}. {RERECORD}")
        given = encode(inputs or {}, "the inputs")
        if given != run["inputs"]:
            keys = sorted(k for k in set(given) | set(run["inputs"]) if given.get(k) != run["inputs"].get(k))
            raise CassetteMismatch(f"{where} (flow {flow.name!r}) was recorded with other inputs: "
                                   f"{', '.join(map(repr, keys))} differ. {RERECORD}")
        recorded: dict[str, dict[str, Any]] = run["nodes"]
        problems = []
        current = {name: statement_hash(flow, name) for name in recorded_nodes(planner, flow)}
        for name, digest in current.items():
            entry = recorded.get(name)
            if entry is None:
                problems.append(f"node {name!r} is new since the recording")
            elif entry["hash"] != digest:
                problems.append(f"node {name!r} changed its statements since the recording "
                                f"(recorded {entry['hash']}, now {digest})")
        problems += [f"node {name!r} was recorded but is no longer in the flow (or no longer needs the database)"
                     for name in recorded if name not in current]
        if problems:
            raise CassetteMismatch(f"{where} (flow {flow.name!r}): " + "; ".join(problems) + f". {RERECORD}")
        was = sorted(name for name, entry in recorded.items() if entry["state"] == "overridden")
        now = sorted(name for name in (overrides or {}) if name in recorded)
        if was != now:
            raise CassetteMismatch(f"{where} (flow {flow.name!r}) was recorded overriding {was or 'nothing'}, "
                                   f"replayed overriding {now or 'nothing'}. {RERECORD}")


RERECORD = "Record it again against a database (pytest --planner-record=all)."


# --- values as JSON, with their types ---------------------------------------------------------

_TAGGED: dict[str, Callable[[Any], Any]] = {
    "$datetime": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$time": dt.time.fromisoformat,
    "$timedelta": lambda v: dt.timedelta(seconds=v),
    "$decimal": decimal.Decimal,
    "$uuid": uuid.UUID,
    "$bytes": base64.b64decode,
    "$tuple": lambda v: tuple(decode(x) for x in v),
    "$set": lambda v: {decode(x) for x in v},
    "$dict": lambda v: {decode(k): decode(x) for k, x in v},
    "$float": float,  # nan, inf and -inf, which JSON has no way to write
    "$ip_address": ipaddress.ip_address,
    "$ip_interface": ipaddress.ip_interface,
    "$ip_network": ipaddress.ip_network,
}


def encode(value: Any, where: str = "a value") -> Any:
    """`value` as JSON that `decode` turns back into an equal value of the same types.

    Plain JSON stays plain; other types become one-key objects (`{"$datetime": "..."}`), and
    a dict whose keys are not all strings, or one that could be mistaken for a tagged value,
    becomes `{"$dict": [[key, value], ...]}`. Raises `CassetteError` for any other type.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else {"$float": repr(value)}
    if isinstance(value, list):
        return [encode(v, where) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGGED):
            return {k: encode(v, where) for k, v in value.items()}
        return {"$dict": [[encode(k, where), encode(v, where)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, where) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"$set": [encode(v, where) for v in value]}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$timedelta": value.total_seconds()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):  # before addresses: a subclass
        return {"$ip_interface": str(value)}
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return {"$ip_address": str(value)}
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return {"$ip_network": str(value)}
    raise CassetteError(f"{where}: a value of type {type(value).__module__}.{type(value).__qualname__} cannot be "
                        "recorded (cast it in the SQL to a type JSON can keep, e.g. ::text)")


def decode(value: Any) -> Any:
    """The inverse of `encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            tag, inner = next(iter(value.items()))
            if tag in _TAGGED:
                return _TAGGED[tag](inner)
        return {k: decode(v) for k, v in value.items()}
    return value

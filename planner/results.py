"""What a run returns: each node's outcome, and the flow's output."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class Served:
    """How a query's value was obtained; backends fill it, `NodeResult.served` shows it."""

    cached: bool = False  # from the cache: no statement was sent
    batch: int = 1  # how many runs shared the statement that answered this one
    fused: int = 1  # how many nodes of one run fusion (`planner.db.fuse`) sent in that statement
    replica: bool = False  # answered by the read replica (`planner.db.replica`), not the primary
    statements: int = 1  # the node's statements (a list is sent in one transaction): what one attempt sends unless cached
    compiled: str | None = None  # the compiled statement (`flow#n`, see `planner explain`) that answered it
    compiled_nodes: int = 1  # how many nodes of one run that compiled statement answered (1: not compiled)

    @property
    def run_share(self) -> int:
        """How many nodes of one run the one statement that answered this node answered: fusion's
        `fused` or a compiled group's `compiled_nodes` (1: its own). They share one round trip."""
        return max(self.fused, self.compiled_nodes)


class NodeState(enum.StrEnum):
    """The five ways a node can end; every node of a run ends in exactly one."""

    OK = "ok"
    DEFAULTED = "defaulted"
    SKIPPED = "skipped"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class NodeResult:
    """One node's outcome. Times are milliseconds from the start of the run."""

    state: NodeState
    value: Any = None
    error: BaseException | None = None
    attempts: int = 0
    started_ms: float | None = None
    finished_ms: float | None = None
    served: Served | None = None  # SQL nodes: from the cache, in a batch of runs, fused with siblings

    @property
    def duration_ms(self) -> float | None:
        if self.started_ms is None or self.finished_ms is None:
            return None
        return self.finished_ms - self.started_ms


class FlowResult:
    """The result of one run.

    `status` is "ok" when no node failed the run, "failed" when a node failed and its policy
    said fail (`on_error: fail`, `required: true`, an error that means the flow is wrong) and
    "timeout" when the run hit its deadline (the last two are raised as `FlowFailed`).
    An "ok" run may still be *degraded*: `degraded` is true when any node failed and was
    settled by its `default` (`defaulted` maps each such node to its error). Check it wherever
    a default would be a wrong answer rather than a safe one.
    `nodes` (each node's `NodeResult`, in the flow's order) is built the first time it is read:
    a service that reads only `output` never pays for it.
    """

    __slots__ = ("flow", "run_id", "mode", "status", "output", "elapsed_ms", "_nodes", "_build", "_degraded")

    def __init__(self, flow: str, run_id: str, mode: str, status: str,
                 nodes: dict[str, NodeResult] | Callable[[], dict[str, NodeResult]], output: Any,
                 elapsed_ms: float, *, degraded: bool | None = None) -> None:
        self.flow, self.run_id, self.mode, self.status = flow, run_id, mode, status
        self.output, self.elapsed_ms = output, elapsed_ms
        self._nodes: dict[str, NodeResult] | None = nodes if isinstance(nodes, dict) else None
        self._build: Callable[[], dict[str, NodeResult]] | None = None if isinstance(nodes, dict) else nodes
        # Told by the executor, so that a service can ask `degraded` on every answer without
        # building `nodes`; None: find out from `nodes`.
        self._degraded = degraded

    @property
    def nodes(self) -> dict[str, NodeResult]:
        if self._nodes is None:
            assert self._build is not None
            self._nodes, self._build = self._build(), None
        return self._nodes

    def __repr__(self) -> str:
        return (f"FlowResult(flow={self.flow!r}, run_id={self.run_id!r}, mode={self.mode!r}, "
                f"status={self.status!r}, output={self.output!r}, elapsed_ms={self.elapsed_ms:.3f})")

    @property
    def values(self) -> dict[str, Any]:
        """Every node's value (its default when defaulted or skipped)."""
        return {name: node.value for name, node in self.nodes.items()}

    @property
    def defaulted(self) -> dict[str, BaseException]:
        """`{node: error}` for every node that failed and took its `default`, in the flow's order."""
        defaulted = NodeState.DEFAULTED  # read once: an Enum class attribute is slow to read
        return {name: node.error for name, node in self.nodes.items()
                if node.state is defaulted and node.error is not None}

    @property
    def degraded(self) -> bool:
        """Whether any node failed and was settled by its `default`: the run finished, but on
        fallback values (see `defaulted`)."""
        if self._degraded is not None:
            return self._degraded
        defaulted = NodeState.DEFAULTED
        return any(node.state is defaulted for node in self.nodes.values())

    def states(self) -> dict[str, str]:
        """`{node: state}`, handy in tests and logs."""
        return {name: node.state.value for name, node in self.nodes.items()}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary: status, `degraded` and `defaulted` (node -> error text), output,
        and each node's state, value, error (with `bug: true` when it looks like a bug in the
        flow, see `NodeError.is_bug`), attempts and times."""
        return {
            "flow": self.flow,
            "run_id": self.run_id,
            "mode": self.mode,
            "status": self.status,
            "degraded": self.degraded,
            "defaulted": {name: error_text(error) for name, error in self.defaulted.items()},
            "elapsed_ms": round(self.elapsed_ms, 3),
            "output": jsonable(self.output),
            "nodes": {
                name: {
                    "state": node.state.value,
                    "value": jsonable(node.value),
                    "error": error_text(node.error) if node.error else None,
                    **({"bug": True} if is_bug(node.error) else {}),
                    "attempts": node.attempts,
                    "started_ms": _round(node.started_ms),
                    "finished_ms": _round(node.finished_ms),
                    **({"served": asdict(node.served)} if node.served is not None else {}),
                }
                for name, node in self.nodes.items()
            },
        }


def error_text(exc: BaseException) -> str:
    """`Type: message`, as planner shows an error it did not write itself (a node's, a driver's);
    never `Type: ` with nothing after it. A `TimeoutError` without a message (asyncio's, a
    driver's) says it was a timeout of the code that raised it, not one of planner's: those say
    what timed out and after how long (`timed out after 300 ms`)."""
    text = str(exc)
    if text:
        return f"{type(exc).__name__}: {text}"
    if isinstance(exc, TimeoutError):
        return (f"{type(exc).__name__} (no message: a timeout of the code that raised it, not one of "
                "planner's node timeouts or deadlines)")
    return f"{type(exc).__name__} (no message)"


def is_bug(error: BaseException | None) -> bool:
    """Whether a node's error looks like a bug in the flow: no retry can fix it (see `NodeError.is_bug`)."""
    return bool(getattr(error, "is_bug", False))


def bug_reason(error: BaseException | None) -> str:
    """Why an error that `is_bug` looks like one: its SQLSTATE, or the missing field."""
    sqlstate = getattr(error, "sqlstate", None)
    return f"SQLSTATE {sqlstate}" if sqlstate else "a field the upstream value does not have"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def jsonable(value: Any) -> Any:
    """Database values made JSON-friendly: datetimes as ISO text, decimals and UUIDs as text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)

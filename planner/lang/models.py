"""The flow format as authors write it: pydantic v2 models, strict about keys and types.

These are the "what users write" half of the data flow; `planner.graph` compiles them into
plain dataclasses. Validators raise `ValueError`; the loader turns pydantic's errors into
`FlowFileError`s that name the file, line and node.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

# `\A..\Z`, never `^..$`: `$` also matches before a final newline, which would let "a\n" pass as a
# name. Use `fullmatch` with it; the anchors keep a stray `.match` strict too.
NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION_S = 24 * 3600.0
# A number literal (YAML or `when:`) longer than this is refused before it is converted: Python's
# str -> int conversion is quadratic, and no flow needs a thousand digits.
MAX_NUMBER_CHARS = 1000


def parse_duration(value: Any) -> float:
    """`"300ms"`, `"2s"`, `"1.5m"`, `"1h"` -> seconds. A unit is required; 0 < d <= 24h."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"bad duration {value!r}: write a number with a unit, e.g. 300ms, 2s, 1m")
    match = _DURATION_RE.fullmatch(value)
    if not match:
        raise ValueError(f"bad duration {value!r}: write a number with a unit, e.g. 300ms, 2s, 1m")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0 or seconds > MAX_DURATION_S:
        raise ValueError(f"bad duration {value!r}: must be above 0 and at most 24h")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)\s*$", "examples": ["300ms", "2s"]}),
]
"""A duration in seconds, written with a unit in YAML (JSON Schema: a string)."""

OnError = Literal["default", "fail"]
"""What a failure does to a node: settle it with its default, or fail the run."""
_Policy = Annotated[OnError | None, WithJsonSchema({"type": "string", "enum": ["default", "fail"]})]
"""An `OnError` that may be left unwritten (None: decided elsewhere); the schema offers no null."""

InputType = Literal["str", "int", "float", "bool", "list", "dict", "json"]


_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list, tuple),
    "dict": (dict,),
}


def value_fits(type_name: str, value: Any) -> bool:
    """Whether `value` may be given for an input declared `type_name` (null always may)."""
    if value is None or type_name == "json":
        return True
    if isinstance(value, bool) and type_name in ("int", "float"):
        return False  # True is an int to Python, never to a flow
    return isinstance(value, _PYTHON_TYPES[type_name])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InputSpec(_Strict):
    """A declared input: `name: str` or `name: {type: int, default: 20}`."""

    type: InputType = Field(description="str, int, float (an int is accepted), bool, list, dict or json (anything). "
                            "null is accepted for every type.")
    default: Any = Field(default=None, description="The value when the caller gives none; an input with a default is optional.")
    required: bool = Field(default=True, description="Whether the caller must give it (false as soon as a default is written).")
    description: str | None = Field(default=None, description="What the input is, for readers and `planner list`.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"type": data}
        if isinstance(data, dict) and "default" in data and "required" not in data:
            return {**data, "required": False}
        return data

    @model_validator(mode="after")
    def _default_fits(self) -> InputSpec:
        if not value_fits(self.type, self.default):
            raise ValueError(f"default {self.default!r} does not fit type {self.type}")
        return self


class Settings(_Strict):
    """How the flow runs; every key is optional."""

    mode: Literal["eager", "layered", "sequential"] = Field(
        default="eager",
        description="eager: each node starts as soon as its dependencies settled; layered: the plan's groups one "
        "after another; sequential: one node at a time. PLANNER_MODE and the caller's mode= override it.")
    timeout: Duration | None = Field(
        default=None,
        description="Deadline of the whole run (acquiring connections included). When it passes, unfinished nodes "
        "are cancelled and the run raises FlowTimeout.")
    node_timeout: Duration | None = Field(
        default=None, description="The timeout of every node that sets none of its own (each attempt).")
    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] | None = Field(
        default=None, description="At most this many nodes of one run in flight at once (default: no limit).")
    coalesce: Annotated[bool, Field(description="Let read-only statements of concurrent runs share one statement "
                                    "(the default). false turns coalescing off for every node of this flow.")] = True
    fuse: Annotated[bool, Field(description="Let sibling reads of one run that become ready together share one "
                                "statement (the default). false turns fusion off for every node of this flow.")] = True
    compile: Annotated[bool, Field(description="Send connected SQL nodes with no call: between them as one "
                                   "statement where their data allows (the default). false turns it off for "
                                   "this flow (PLANNER_COMPILE=0: for the process).")] = True
    on_error: _Policy = Field(
        default=None,
        description="The on_error of every node that writes none (default: the Planner's on_error=, else "
        "PLANNER_ON_ERROR, else default).")
    on_bug: OnError = Field(
        default="fail",
        description="The on_bug of every node that writes none: fail (the default) fails the run on an error "
        "that means the flow is wrong (SQLSTATE class 42, a missing field), whatever on_error says; default "
        "lets on_error decide.")


class Retry(_Strict):
    """Try a failing node again: `{attempts: 3, backoff: 20ms}`."""

    attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        default=3, description="Tries in all, the first included.")
    backoff: Duration = Field(default="50ms", validate_default=True,
                              description="Wait after the first failure; it doubles after each one (50, 100, 200 ms...).")
    on: Literal["transient", "any"] = Field(
        default="transient",
        description="transient: only errors worth retrying (lost connection, serialization failure, deadlock, too "
        "many connections, server shutdown); any: every error, timeouts included.")


class _NodeBase(_Strict):
    description: str | None = Field(default=None, description="What the node is for, for readers and pictures.")
    after: list[str] = Field(
        default_factory=list,
        description="Nodes this one waits for without using their values (ordering only). Data dependencies come "
        "from references and are never listed.")
    when: str | bool | None = Field(
        default=None,
        description="Run only when this is true, e.g. `$instance.enabled and $count > 0` (references, literals, "
        "not/and/or, == != < <= > >=, in, not in, parentheses). When false the node is skipped and takes its default.")
    default: Any = Field(
        default=None,
        description="The node's value when it is skipped, or fails or times out with on_error: default (null if "
        "not given).")
    on_error: _Policy = Field(
        default=None,
        description="default: a failure settles the node with its default and the run goes on (degraded, logged "
        "at WARNING, listed in result.defaulted); fail: the run stops at once and raises FlowFailed. When not "
        "written: fail for `required: true`, else settings.on_error, else the Planner's on_error= "
        "(PLANNER_ON_ERROR), else default. An error that means the flow is wrong (see on_bug) fails the run "
        "whatever this says.")
    on_bug: _Policy = Field(
        default=None,
        description="What an error that means the flow itself is wrong does (SQLSTATE class 42: syntax, unknown "
        "table, column or function...; a field the upstream row does not have): fail (the default, from "
        "settings.on_bug) fails the run whatever on_error says; default lets on_error decide.")
    timeout: Duration | None = Field(
        default=None,
        description="Limit of each attempt (for sql: the statements, not the wait for a connection); default: "
        "settings.node_timeout. A timeout is a failure.")
    retry: Retry | None = Field(default=None, description="Try again after a failure (default: one attempt).")
    latency: Duration | None = Field(
        default=None,
        description="Expected time, for `planner plan` until `planner run` has recorded real ones. Changes nothing "
        "at run time.")
    invalidates: list[str] = Field(
        default_factory=list,
        description="Nodes of this flow that have `cache:`: their kept values are dropped when this node ends ok.",
    )


class SqlNode(_NodeBase):
    """A node that sends SQL: one statement, or a list sent in one transaction."""

    sql: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="One statement, or a list sent in one transaction (the last one's result is the value). "
        "$name and $node.field are bound parameters, never pasted text.")
    fetch: Literal["one", "all", "value", "none"] = Field(
        default="all",
        description="all: a list of rows; one: a row or null; value: the first column of the first row; none: "
        "the command status (\"UPDATE 3\").")
    required: bool = Field(
        default=False,
        description="Only with fetch: one. true: no row is the node's error (NotFound), not null; the node's "
        "on_error then defaults to fail, so the run raises NotFound (a service answers 404).")
    coalesce: Annotated[bool | None, Field(description="Reads (one statement proven read-only) are shared with "
                                           "concurrent runs unless false. true lets a write with RETURNING join "
                                           "a batch: one statement, one transaction, split and sent again per run on "
                                           "error; only when the runs' writes cannot touch the same rows.")] = None
    fuse: Annotated[bool | None, Field(description="false: never send this read together with sibling reads "
                                       "of its run. Only single read-only statements are fused.")] = None
    compile: Annotated[bool | None, Field(description="false: never send this node in one statement with the "
                                          "SQL nodes it depends on or that depend on it (see `planner explain`).")] = None
    cache: Duration | None = Field(
        default=None,
        description="Keep the value this long per (statement, parameters), in the process; only for one "
        "read-only statement. Errors and defaults are never kept.",
    )
    replica: bool = Field(
        default=True,
        description="false: this read always goes to the primary, never to a read replica. By default a "
        "read (one statement proven read-only) goes to the replica when the Planner has one, unless it "
        "depends, directly or through `after:`, on a node of its run that may write (an SQL write or a "
        "`call:` node), or a node of its flow `invalidates:` it. Writes always go to the primary.",
    )

    @field_validator("required")
    @classmethod
    def _required_fits_fetch(cls, value: bool, info: ValidationInfo) -> bool:
        fetch = info.data.get("fetch")
        if value and fetch != "one":
            # fetch: value cannot tell "no row" from a row whose column is NULL: both are null.
            why = {"value": "fetch: value cannot tell no row from a NULL column; write fetch: one (and use "
                            "$node.column) to require a row",
                   "all": "fetch: all returns a list (an empty one when nothing matches); write fetch: one to "
                          "require a row",
                   "none": "fetch: none returns the command status, not rows"}.get(str(fetch), "")
            raise ValueError(f"required: true needs fetch: one ({why})" if why else "required: true needs fetch: one")
        return value

    @field_validator("sql")
    @classmethod
    def _not_blank(cls, value: str | list[str]) -> str | list[str]:
        statements = [value] if isinstance(value, str) else value
        if any(not s.strip() for s in statements):
            raise ValueError("SQL statement is empty")
        return value


class CallNode(_NodeBase):
    """A node that calls a Python function, `"package.module:function"`."""

    call: str = Field(description="The function to call, \"package.module:function\", async or sync; it must be "
                      "in an allowed module (PLANNER_ALLOWED_MODULES, else the flows folder's own modules).")
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with",
        description="The function's keyword arguments: references (\"$node.field\") or literals. A parameter "
        "named db receives the connection pool.")


def _node_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        if "sql" in value:
            return "sql"
        if "call" in value:
            return "call"
    return None


Node = Annotated[
    Annotated[SqlNode, Tag("sql")] | Annotated[CallNode, Tag("call")],
    Discriminator(
        _node_kind,
        custom_error_type="node_kind",
        custom_error_message="a node needs either `sql:` or `call:`",
    ),
]


class FlowSpec(_Strict):
    """One flow file. Node order is kept: it orders nodes within a group."""

    name: str | None = Field(default=None, description="The flow's name; if written, it must match the file's name.")
    description: str | None = Field(default=None, description="What the flow does, for readers and `planner list`.")
    inputs: dict[str, InputSpec] = Field(
        default_factory=dict,
        description="Declared inputs, `name: type` or `name: {type: int, default: 20}`; checked before any node runs.")
    settings: Settings = Field(default_factory=Settings, description="How the flow runs (all optional).")
    nodes: Annotated[dict[str, Node], Field(min_length=1)] = Field(
        description="The nodes, each an `sql:` or a `call:` node, by name. Their order in the file orders nodes "
        "within a group.")
    output: dict[str, Any] | None = Field(
        default=None,
        description="What the caller gets as result.output: keys mapped to references or literals (default: every "
        "node's value).")

    @field_validator("inputs", "nodes")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid name (letters, digits, _; not first a digit)")
        return value

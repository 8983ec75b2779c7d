"""Joining compiled nodes to what runs them: Python callables here, SQL in `planner.db`.

The allow-list is enforced here, at bind time, before anything runs: a `call:` target must be
`package.module:function` where the module is an allowed package or one of its submodules, and
the attribute is a plain function defined in that very module (no walking through `os.path`,
no builtins, no classes).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from planner.executor import BoundNode, template_args
from planner.graph import CompiledFlow, CompiledNode
from planner.loader import Marks

_TARGET = re.compile(r"^(?P<module>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):(?P<attr>[A-Za-z_][A-Za-z0-9_]*)$")

PoolProvider = Callable[[], Awaitable[Any]]


def module_allowed(module: str, allowed: Iterable[str]) -> bool:
    """`myflows` allows `myflows` and `myflows.tasks`, never `myflows_evil`."""
    return any(module == a or module.startswith(a + ".") for a in allowed if a)


def resolve_call(target: str, allowed: Iterable[str]) -> Callable[..., Any]:
    """Import and return the function named by `target`. Raises `ValueError` saying why not."""
    match = _TARGET.match(target)
    if not match:
        raise ValueError(f"call target {target!r} must look like 'package.module:function'")
    module_name, attr = match.group("module"), match.group("attr")
    allowed = list(allowed)
    if not module_allowed(module_name, allowed):
        raise ValueError(
            f"module {module_name!r} is not allowed (allowed: {', '.join(allowed) or 'none'}; "
            "set PLANNER_ALLOWED_MODULES to widen)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"module {module_name!r} has no function {attr!r}")
    if not inspect.isfunction(fn) or fn.__module__ != module_name:
        raise ValueError(f"{target!r} is not a function defined in {module_name!r}")
    return fn


def bind_call(spec: CompiledNode, marks: Marks, allowed: Iterable[str], pool: PoolProvider) -> BoundNode:
    """A `call:` node, its arguments checked against the function's signature."""
    where = ("nodes", spec.name, "call")
    try:
        fn = resolve_call(spec.call, allowed)
    except ValueError as exc:
        raise marks.error(str(exc), where, code="PLN300") from None
    signature = inspect.signature(fn)
    wants_db = "db" in signature.parameters
    try:
        signature.bind(**dict.fromkeys(spec.args), **({"db": None} if wants_db else {}))
    except TypeError as exc:
        raise marks.error(f"with: does not fit {spec.call}{signature}: {exc}", ("nodes", spec.name, "with"), code="PLN301") from None
    is_async = inspect.iscoroutinefunction(fn)

    async def run(kwargs: dict[str, Any]) -> Any:
        if wants_db:
            kwargs["db"] = await pool()
        if is_async:
            return await fn(**kwargs)
        return await asyncio.to_thread(fn, **kwargs)

    if is_async and not wants_db:
        # The common case, kept to one coroutine: the executor awaits the function's own.
        return BoundNode(spec, template_args(spec), lambda kwargs: fn(**kwargs))
    return BoundNode(spec, template_args(spec), run)


def bind_flow(
    flow: CompiledFlow, *, allowed: Iterable[str], pool: PoolProvider, sql: Callable[[CompiledNode], BoundNode]
) -> dict[str, BoundNode]:
    """Every node of `flow` bound; `sql` binds SQL nodes (see `planner.db`). Raises `FlowFileError`."""
    allowed = list(allowed)
    bound: dict[str, BoundNode] = {}
    for name, spec in flow.nodes.items():
        bound[name] = sql(spec) if spec.kind == "sql" else bind_call(spec, flow.marks, allowed, pool)
    return bound


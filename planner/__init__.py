"""planner: declare database lookups as a YAML flow; run the independent ones together.

The public API is what `__all__` lists; every other module is private.
"""

import logging

from planner.api import Planner, load_flow, load_flows, metrics_text, run_flow
from planner.db.stack import CacheOptions, PoolOptions, ReplicaOptions
from planner.errors import (
    CallThreadsBusy,
    DatabaseUnavailable,
    FlowDatabaseLost,
    FlowError,
    FlowFailed,
    FlowFileError,
    FlowGraphError,
    FlowInputError,
    FlowNotFound,
    FlowTimeout,
    NodeError,
    NodeTimeout,
    NotFound,
    QueryError,
    ReferenceFieldError,
)
from planner.graph import CompiledFlow, Plan
from planner.kinds.call import CallOptions
from planner.results import FlowResult, NodeResult, NodeState
from planner.run.metrics import Metrics
from planner.settings import Settings

_DISTRIBUTION = "planner-flows"  # the name on PyPI (pyproject's `name`); the import name is `planner`


def _version() -> str:
    """pyproject's `version`: the installed distribution's metadata, else (a checkout put on
    `sys.path` without installing it) the pyproject.toml beside the package."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(_DISTRIBUTION)
    except PackageNotFoundError:
        pass
    import tomllib
    from pathlib import Path

    try:
        project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    except (OSError, ValueError, KeyError):
        return "0+unknown"
    if project.get("name") != _DISTRIBUTION or not isinstance(project.get("version"), str):
        return "0+unknown"
    return str(project["version"])


__version__ = _version()

__all__ = [
    "CacheOptions",
    "CallOptions",
    "CallThreadsBusy",
    "CompiledFlow",
    "DatabaseUnavailable",
    "FlowDatabaseLost",
    "FlowError",
    "FlowFailed",
    "FlowFileError",
    "FlowGraphError",
    "FlowInputError",
    "FlowNotFound",
    "FlowResult",
    "FlowTimeout",
    "Metrics",
    "NodeError",
    "NodeResult",
    "NodeState",
    "NodeTimeout",
    "NotFound",
    "Plan",
    "Planner",
    "PoolOptions",
    "QueryError",
    "ReferenceFieldError",
    "ReplicaOptions",
    "Settings",
    "load_flow",
    "load_flows",
    "metrics_text",
    "run_flow",
]

logging.getLogger("planner").addHandler(logging.NullHandler())


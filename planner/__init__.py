"""planner: declare database lookups as a YAML flow; run the independent ones together.

The public API is what `__all__` lists; every other module is private.
"""

import logging

from planner.api import Planner, load_flow, load_flows, run_flow
from planner.errors import (
    DatabaseUnavailable,
    FlowError,
    FlowFailed,
    FlowFileError,
    FlowGraphError,
    FlowInputError,
    FlowTimeout,
    NodeError,
    NodeTimeout,
    QueryError,
    ReferenceFieldError,
)
from planner.graph import CompiledFlow, Plan
from planner.results import FlowResult, NodeResult, NodeState

__version__ = "0.1.0"

__all__ = [
    "CompiledFlow",
    "DatabaseUnavailable",
    "FlowError",
    "FlowFailed",
    "FlowFileError",
    "FlowGraphError",
    "FlowInputError",
    "FlowResult",
    "FlowTimeout",
    "NodeError",
    "NodeResult",
    "NodeState",
    "NodeTimeout",
    "Plan",
    "Planner",
    "QueryError",
    "ReferenceFieldError",
    "load_flow",
    "load_flows",
    "run_flow",
]

logging.getLogger("planner").addHandler(logging.NullHandler())


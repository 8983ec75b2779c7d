"""Fixtures shared by the suite. Database fixtures live in `tests/db_fixtures.py`."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from planner import Planner
from tests import nodes

pytest_plugins = ["tests.db_fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="long reliability runs (also PLANNER_SOAK=1)")


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """True for the long reliability runs: `pytest --soak` or PLANNER_SOAK=1."""
    import os

    return bool(request.config.getoption("--soak") or os.environ.get("PLANNER_SOAK"))


@pytest.fixture(autouse=True)
def _reset_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes.calls.clear()
    nodes.cancelled.clear()
    nodes.attempts.clear()
    nodes.events.clear()
    monkeypatch.delenv("PLANNER_MODE", raising=False)
    monkeypatch.delenv("PLANNER_ALLOWED_MODULES", raising=False)


@pytest.fixture
def write_flow(tmp_path: Path) -> Callable[..., Path]:
    """Write a flow file into a fresh flows folder: `write_flow(yaml, name="t")`."""

    def write(text: str, name: str = "t") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture
def planner(tmp_path: Path) -> Planner:
    """A Planner over `write_flow`'s folder, allowed to call `tests.nodes`."""
    return Planner(flows=tmp_path, allowed_modules=["tests"])

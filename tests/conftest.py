"""Fixtures shared by the suite. Database fixtures live in `tests/support/db_fixtures.py`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from planner import CallOptions, Planner
from tests import nodes

pytest_plugins = ["tests.support.db_fixtures"]


# The tiers (docs/testing.md): `pytest` alone runs the default tier, every test not marked with
# one of these; `pytest --full` (CI) runs them all, `pytest -m slow` those of one mark; a run
# given paths or node ids runs everything it names. Tests that use these fixtures get the
# mark by themselves.
FULL_TIER_ONLY = ("slow", "subprocess", "pgbouncer", "replica")
MARK_BY_FIXTURE = {"pgbouncer": "pgbouncer", "pair": "replica"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="long reliability runs (also PLANNER_SOAK=1)")
    parser.addoption("--full", action="store_true",
                     help=f"every tier: also the tests marked {', '.join(FULL_TIER_ONLY)} (what CI runs)")


def _default_tier(config: pytest.Config) -> bool:
    """Whether this run is the default tier: no --full, no -m, no paths or node ids given."""
    return not (config.getoption("--full") or config.option.markexpr
                or config.args_source != pytest.Config.ArgsSource.TESTPATHS)


@pytest.hookimpl(tryfirst=True)  # before -m reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, mark in MARK_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)
    if not _default_tier(config):
        return
    kept = [item for item in items if not any(item.get_closest_marker(m) for m in FULL_TIER_ONLY)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent without it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """What `-n auto` means for this suite: two workers per core, at most 8. A test spends most
    of its time waiting for its worker's own PostgreSQL, so a core serves two: on the shared
    2-core machine the default tier took 0.73 of the time with 4 workers that it took with 2
    (side by side). Past 8, each worker's start (a server, a collection) outweighs its share."""
    return min(2 * (os.cpu_count() or 1), 8)


def pytest_report_header(config: pytest.Config) -> str:
    if _default_tier(config):
        return (f"planner: the default tier (tests marked {', '.join(FULL_TIER_ONLY)} deselected; "
                "`pytest --full` runs every tier)")
    return "planner: every tier" if config.getoption("--full") else "planner: the tests selected"


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """True for the long reliability runs: `pytest --soak` or PLANNER_SOAK=1."""
    import os

    return bool(request.config.getoption("--soak") or os.environ.get("PLANNER_SOAK"))


def _is_python(program: object) -> bool:
    """Whether `program` (a Popen's first argument) starts Python: the interpreter or a script of
    this environment's (`planner`, `pytest`)."""
    path = Path(os.fsdecode(program)) if isinstance(program, (str, bytes, os.PathLike)) else None
    return path is not None and (path.name.startswith("python") or path.parent == Path(sys.executable).parent)


@pytest.fixture(autouse=True)
def _python_processes_only_in_their_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts Python in a process of its own costs a second or more (the interpreter,
    planner's imports, often a server): it belongs to the `subprocess` tier, and says so by its
    mark, so that the default tier stays fast. Servers (PostgreSQL, PgBouncer) may be started."""
    if request.node.get_closest_marker("subprocess"):
        return
    start = subprocess.Popen.__init__

    def checked(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        program = kwargs.get("executable") or (args if isinstance(args, (str, bytes, os.PathLike)) else args[0])
        if _is_python(program):
            pytest.fail(f"{request.node.nodeid} starts Python in a process of its own ({os.fsdecode(program)}): "
                        "mark it @pytest.mark.subprocess (docs/testing.md, tiers)", pytrace=False)
        start(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked)


@pytest.fixture(autouse=True)
def _reset_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes.calls.clear()
    nodes.cancelled.clear()
    nodes.attempts.clear()
    nodes.events.clear()
    monkeypatch.delenv("PLANNER_MODE", raising=False)
    monkeypatch.delenv("PLANNER_ALLOWED_MODULES", raising=False)


@pytest.fixture
def uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes run as they would without compiled groups (`PLANNER_COMPILE=0`): for modules about
    another mechanism (`pytestmark = pytest.mark.usefixtures("uncompiled")`); tests/test_compile.py
    covers compilation."""
    monkeypatch.setenv("PLANNER_COMPILE", "0")


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
    return Planner(flows=tmp_path, call_options=CallOptions(allowed_modules=["tests"]))

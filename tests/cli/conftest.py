"""The command line's tests (planner/cli/): one file per command group."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded latencies go to a folder of the test's own, never the user's."""
    monkeypatch.setenv("PLANNER_HOME", str(tmp_path / "planner-home"))

"""The `planner` console script, run as a user runs it (a process of its own): for tests/cli/
and any test of what the command prints. A test that calls `cli()` is in the `subprocess` tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOWS = ROOT / "flows"
PLANNER = str(Path(sys.executable).parent / "planner")
SIBLINGS = "nodes:\n  a: {sql: SELECT 1 AS x}\n  b: {sql: SELECT 2 AS y}\n  c: {sql: SELECT 3 AS z}\n"


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`planner *args` in `cwd`, without colour or PLANNER_MODE; its output as text."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    full_env.pop("PLANNER_MODE", None)
    return subprocess.run([PLANNER, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with `code` and said why on one line of stderr, without a traceback: that line."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("planner: ")
    return lines[0]


def table_rows(out: str) -> list[str]:
    """The rows of the first plain table in `out`: the lines after its dashes, up to a blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("----")) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]

"""The benchmarks still run (tiny sizes). Their figures are measured by hand, not asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_executor_overhead_smoke() -> None:
    proc = _run("benchmarks.executor_overhead", "--smoke")
    assert proc.returncode == 0, proc.stderr
    for heading in ("## Overhead", "## Throughput", "## Makespan"):
        assert heading in proc.stdout


def test_seed_table_smoke(pg_dsn: str) -> None:
    proc = _run("benchmarks.seed_table", "--smoke", "--dsn", pg_dsn)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "### process_buffered" in proc.stdout and "### escalation" in proc.stdout
    assert "Critical path of an eager run" in proc.stdout

"""The wheel carries what the package needs at run time: the seed flows, schema files, py.typed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_contains_the_data_files(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("planner-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"planner/py.typed", "planner/flow.schema.json", "planner/demo/schema.sql",
            "planner/_flows/process_buffered.yaml", "planner/_flows/escalation.yaml"} <= names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "planner = planner.cli:main" in entry_points

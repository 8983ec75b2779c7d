"""The README's and the docs' copies of shipped files: a YAML block whose first line names a
file of the repository (`# flows/escalation.yaml`) is that file as shipped, its editor's schema
line aside. A reader who copies it runs what the repository runs (the README's escalation flow
had lost `cache: 30s`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```ya?ml\n# (?P<path>[\w./-]+\.ya?ml)\n(?P<body>.*?)^```$", re.M | re.S)
SCHEMA_LINE = re.compile(r"\A# yaml-language-server: .*\n")


def copies() -> list[tuple[str, str, str]]:
    """(document, the file it names, the block's text after that line) for every such block."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in FENCE.finditer(doc.read_text(encoding="utf-8")):
            found.append((doc.name, m["path"], m["body"]))
    return found


def test_the_readme_shows_the_escalation_flow_as_a_copy() -> None:
    assert ("README.md", "flows/escalation.yaml") in [(doc, path) for doc, path, _ in copies()]


@pytest.mark.parametrize(("doc", "path", "body"), copies(), ids=lambda v: str(v)[:40])
def test_a_block_naming_a_file_is_that_file(doc: str, path: str, body: str) -> None:
    shipped = SCHEMA_LINE.sub("", (ROOT / path).read_text(encoding="utf-8"))
    assert body == shipped, f"{doc}'s copy of {path} differs from the file: copy the file again"

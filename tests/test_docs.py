"""docs/FIDELITY.md names, for each paper constant, the test that checks it: every test it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_fidelity_table_names_exists():
    table = (ROOT / "docs" / "FIDELITY.md").read_text()
    named = set(re.findall(r"\b(test_\w+)`", table)) | set(re.findall(r"::(test_\w+)", table))
    defined = {
        m for f in (ROOT / "tests").rglob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)
    }
    assert len(named) > 40
    assert not named - defined, f"docs/FIDELITY.md names tests that do not exist: {sorted(named - defined)}"


def test_every_test_file_the_docs_name_exists():
    """A test file named in docs/*.md (``tests/...py``; FIDELITY's table names them relative to ``tests/``) exists,
    so a reader following the path finds the test."""
    named = {
        (doc.name, path)
        for doc in (ROOT / "docs").glob("*.md")
        for path in re.findall(r"\btests/[\w/]+\.py", doc.read_text())
    }
    fidelity = (ROOT / "docs" / "FIDELITY.md").read_text()
    named |= {("FIDELITY.md", f"tests/{path}") for path in re.findall(r"`((?:\w+/)*test_\w+\.py)", fidelity)}
    assert len(named) > 10
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (ROOT / path).is_file())
    assert not missing, f"docs name test files that do not exist: {missing}"

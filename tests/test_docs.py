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

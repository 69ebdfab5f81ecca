"""Golden files: every case x every target renders byte-for-byte what tests/export/golden/ holds.

To update after an intended change, run ``KVTUNE_UPDATE_GOLDENS=1 pytest tests/export`` and review the diff of
tests/export/golden/ before committing it. Goldens are rendered with kvtune's version replaced by ``<version>``
so a version bump does not touch them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from export_cases import CASES, pipeline

from kvtune.export import TARGETS, render_pipeline
from kvtune.export import _common

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("KVTUNE_UPDATE_GOLDENS") == "1"


@pytest.fixture(autouse=True)
def _fixed_version(monkeypatch):
    monkeypatch.setattr(_common, "kvtune_version", lambda: "<version>")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, target: str) -> None:
    files = render_pipeline(pipeline(case), [target])
    assert files, "every target writes at least one file"
    for _, rendered in files:
        path = GOLDEN / case / rendered.filename
        if UPDATE:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rendered.text, encoding="utf-8")
            continue
        assert path.exists(), f"missing golden {path}; run KVTUNE_UPDATE_GOLDENS=1 pytest tests/export"
        assert rendered.text == path.read_text(encoding="utf-8"), f"{path} differs from the rendered export"


def test_no_stale_goldens() -> None:
    """Every golden file is still produced by some case and target (no leftovers from renamed files)."""
    if UPDATE:
        pytest.skip("updating goldens")
    produced = {
        (case, rendered.filename) for case in CASES for _, rendered in render_pipeline(pipeline(case), ["all"])
    }
    on_disk = {(p.parent.name, p.name) for p in GOLDEN.glob("*/*")}
    assert on_disk == produced

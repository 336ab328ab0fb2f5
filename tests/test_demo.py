"""The demo end to end on a small budget: data made, model trained then reused, index searched."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from retrieval.cli.main import main
from retrieval.jobs.demo import run_demo

pytestmark = pytest.mark.slow  # trains a model


def test_demo_trains_evaluates_indexes_and_reuses(tmp_path: Path) -> None:
    first = run_demo(tmp_path, n=150, minutes=0.1, preset_name="tiny", progress=False)
    assert first.trained and (tmp_path / "model" / "model.safetensors").is_file()
    assert first.report["n_images"] == 30
    assert len(first.examples) == 3 and all(len(hits) == 3 for _, _, hits in first.examples)
    assert all(abs(h.image_score - h.score) < 1e-5 for _, _, hits in first.examples for h in hits), "target=image"

    result = CliRunner().invoke(main, ["demo", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "reused" in result.output and "held-out recall" in result.output and "text->image" in result.output
    assert "retrieval search --index" in result.output

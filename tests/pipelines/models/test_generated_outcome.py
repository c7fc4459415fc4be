"""The generator's readmission outcome is learnable by the training function (raw Bundles, no
views engine, no feature store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirlake.synthetic import generate
from pipelines.models.training import train_readmission_model

from .raw_bundles import readmission_frame

pytestmark = pytest.mark.e2e


def test_generated_readmissions_are_learnable(tmp_path: Path) -> None:
    generate(tmp_path / "bundles", patients=1500, seed=5)
    frame = readmission_frame(tmp_path / "bundles")
    assert len(frame) > 500
    assert 0.05 < frame["label"].mean() < 0.4
    report = train_readmission_model(frame, out_dir=tmp_path / "model", seed=0)
    assert report.auroc is not None and report.auroc > 0.68
    metrics = json.loads(report.metrics_path.read_text())
    top = {r["feature"] for r in metrics["permutation_importance"][:3]}
    assert top & {"age", "comorbidity_count", "prior_admissions_365d", "latest_hba1c"}

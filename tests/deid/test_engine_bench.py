"""Smoke test of ``ehr bench deid``: it runs on a small input and reports its numbers."""

from __future__ import annotations

from pathlib import Path

from pipelines.bench.ingest_deid import bench_deid, generated_input


def test_bench_deid_reports_the_engine_and_the_stage(tmp_path: Path) -> None:
    result = bench_deid(generated_input(3, 2, tmp_path), "safe_harbor", workers=1)
    assert result["resources"] > 50
    assert result["deid_seconds"] > 0 and result["parse_seconds"] > 0
    assert result["ratio_deid_to_parse"] > 0 and result["stage_seconds"] > 0
    assert result["stage_workers"] == 1
    assert result["stage_idle_estimate_seconds_per_190k"] > 0

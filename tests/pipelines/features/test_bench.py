from __future__ import annotations

from pathlib import Path

from pipelines.bench.features import bench_features


def test_bench_features_smoke(tmp_path: Path) -> None:
    lines: list[str] = []
    results = bench_features(
        entity_rows=200, patients=40, online_requests=3, http=True, workdir=tmp_path,
        echo=lines.append,
    )  # fmt: skip
    for column in ("hba1c_latest", "encounters_30d", "age_years", "charlson_index"):
        assert results[f"asof_agreement_{column}"] == 1.0, column
    assert results["feature_rows"] > results["events_only_rows"] > 0
    assert any("change points cost" in line for line in lines)
    assert {"online_sdk_b1_ms", "online_sdk_b10_ms", "online_http_b10_ms"} <= set(results)
    assert any(line.startswith("training set") for line in lines)

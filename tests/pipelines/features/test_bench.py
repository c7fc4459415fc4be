from __future__ import annotations

from pathlib import Path

from pipelines.bench.features import bench_features


def test_bench_features_smoke(tmp_path: Path) -> None:
    lines: list[str] = []
    results = bench_features(
        entity_rows=200, patients=40, online_requests=3, http=True, workdir=tmp_path,
        echo=lines.append,
    )  # fmt: skip
    assert results["asof_agreement_hba1c"] == 1.0
    assert {"online_sdk_b1_ms", "online_sdk_b10_ms", "online_http_b10_ms"} <= set(results)
    assert any(line.startswith("training set") for line in lines)

"""The training-set join against a real (throw-away) Feast store: a feature service named
``readmission_v2`` over a Parquet source, queried point-in-time at each discharge."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from pipelines.models.training_set import readmission_training_set
from tests.feast_stores import throwaway_store

feast = pytest.importorskip("feast")


def _store(tmp_path: Path) -> feast.FeatureStore:
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, String

    source_path = tmp_path / "features.parquet"
    pd.DataFrame(
        {
            "patient_id": ["a", "a", "b"],
            "event_timestamp": pd.to_datetime(["2024-01-01", "2024-03-01", "2024-01-15"], utc=True),
            "created": pd.to_datetime(["2024-06-01"] * 3, utc=True),
            "burden": [1.0, 3.0, 2.0],
            "sex": ["female", "female", "male"],
        }
    ).to_parquet(source_path)
    patient = Entity(name="patient", join_keys=["patient_id"], value_type=ValueType.STRING)
    view = FeatureView(
        name="toy",
        entities=[patient],
        ttl=timedelta(days=365),
        schema=[Field(name="burden", dtype=Float64), Field(name="sex", dtype=String)],
        source=FileSource(
            name="toy_source",
            path=str(source_path),
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        ),
    )
    service = FeatureService(name="readmission_v2", features=[view])
    return throwaway_store(tmp_path, "models_test", [patient, view, service])


def test_point_in_time_join_through_feature_service(tmp_path: Path) -> None:
    labels = pd.DataFrame(
        {
            "patient_id": ["a", "a", "b"],
            "event_timestamp": pd.to_datetime(["2024-02-01", "2024-04-01", "2024-01-10"], utc=True),
            "label": [1, 0, 0],
        }
    )
    frame = readmission_training_set(_store(tmp_path), labels)
    assert list(frame.columns[:3]) == ["patient_id", "event_timestamp", "label"]
    assert set(frame.columns[3:]) == {"burden", "sex"}
    assert len(frame) == 3
    rows = {(r.patient_id, r.event_timestamp.strftime("%m-%d")): r for r in frame.itertuples()}
    assert rows[("a", "02-01")].burden == 1.0  # the March value is in the future here
    assert rows[("a", "04-01")].burden == 3.0
    assert pd.isna(rows[("b", "01-10")].burden)  # nothing known before the discharge

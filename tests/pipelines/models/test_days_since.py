"""Timestamp features become whole days before each row's entity timestamp."""

from __future__ import annotations

import pandas as pd

from pipelines.models.training_set import with_days_since


def test_measured_at_becomes_days_since_at_each_row() -> None:
    frame = pd.DataFrame(
        {
            "patient_id": ["a", "a", "b"],
            "event_timestamp": pd.to_datetime(
                ["2024-03-15T00:00", "2024-11-17T12:00", "2024-01-01T00:00"], utc=True
            ),
            "hba1c_measured_at": pd.to_datetime(["2024-03-10", "2024-03-10", None], utc=True),
            "hba1c_latest": [9.0, 9.0, None],
        }
    )
    out = with_days_since(frame)
    assert list(out.columns) == [
        "patient_id",
        "event_timestamp",
        "hba1c_measured_days_since",
        "hba1c_latest",
    ]
    # the same measurement, asked about later, is older: exact at every T, not at the snapshot
    assert out["hba1c_measured_days_since"].tolist()[:2] == [5, 252]
    assert pd.isna(out["hba1c_measured_days_since"].iloc[2])
    assert str(out["hba1c_measured_days_since"].dtype) == "Int64"

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from dagster import AssetKey, materialize

from pipelines.assets.models import readmission_labels, readmission_model
from pipelines.models.storage import TRAINING_SET_TABLE, parquet_path
from pipelines.models.training_set import readmission_training_set
from pipelines.resources import DeidSettings, WarehouseResource

from .crafted import crafted_views, planted_frame


def test_labels_asset_writes_table_and_parquet(tmp_path: Path) -> None:
    warehouse = WarehouseResource(workdir=str(tmp_path / "work"))
    con = warehouse.connect()
    crafted_views(con)
    con.close()
    result = materialize(
        [readmission_labels], resources={"warehouse": warehouse, "deid_settings": DeidSettings()}
    )
    assert result.success
    metadata = result.asset_materializations_for_node("readmission_labels")[0].metadata
    assert metadata["rows"].value == 9
    assert metadata["positives"].value == 2
    assert metadata["excluded_opted_out"].value == 2
    assert metadata["excluded_transferred"].value == 0  # the crafted stays hold no transfer
    # research profile: +-50 day shifts, so the last 100 days before the horizon are censored too
    assert metadata["censor_margin_days"].value == 100
    assert metadata["excluded_censored"].value == 1
    con = warehouse.connect(read_only=True)
    try:
        rows = con.execute("SELECT count(*), sum(label) FROM models.readmission_labels").fetchone()
    finally:
        con.close()
    assert rows == (9, 2)
    parquet = pd.read_parquet(tmp_path / "work" / "models" / "readmission_labels.parquet")
    assert list(parquet.columns) == ["patient_id", "event_timestamp", "label"]
    specs = readmission_labels.specs_by_key[AssetKey("readmission_labels")]
    assert {d.asset_key for d in specs.deps} == {
        AssetKey("release_input"),
        AssetKey(["views", "encounter"]),
        AssetKey(["views", "consent"]),
        AssetKey(["views", "patient"]),
    }
    assert specs.group_name == "models"


def test_model_asset_reports_metrics_and_check(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    path = parquet_path(workdir, TRAINING_SET_TABLE)
    path.parent.mkdir(parents=True)
    frame = planted_frame()
    frame.to_parquet(path, index=False)
    warehouse = WarehouseResource(workdir=str(workdir))
    con = warehouse.connect()
    crafted_views(con, with_patient=True)
    patients = pd.DataFrame({"id": frame["patient_id"].unique()})
    patients["race_code"] = ["2106-3" if i % 2 else "2054-5" for i in range(len(patients))]
    con.register("patients_frame", patients)
    con.execute("INSERT INTO views.patient (id, race_code) SELECT * FROM patients_frame")
    con.close()
    result = materialize([readmission_model], resources={"warehouse": warehouse})
    assert result.success
    metadata = result.asset_materializations_for_node("readmission_model")[0].metadata
    assert metadata["auroc"].value > 0.7
    low, high = metadata["auroc_ci95"].value
    assert low <= metadata["auroc"].value <= high and metadata["auroc_note"].value == ""
    assert metadata["temporal_validation"].value["n"] > 0
    assert {"brier", "prevalence", "n_train", "n_test", "largest_subgroup_gap"} <= set(metadata)
    # an inline image served by the UI, or the file's path outside a served instance
    assert "roc_curve" in str(metadata["plot_roc_curve"].value)
    assert Path(metadata["model_card_file"].value).is_file()
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"auroc_beats_chance": True}
    metrics = json.loads(Path(metadata["metrics"].value).read_text())
    # race for the audit comes from views.patient, not from the feature column
    races = {r["group"] for r in metrics["subgroups"] if r["attribute"] == "race"}
    assert {"2106-3", "2054-5"} <= races and "2028-9" not in races
    assert "audit_race" not in metrics["features"]["categorical"]
    assert "race_code" in metrics["features"]["categorical"]


class _FakeStore:
    """Stands in for feast.FeatureStore: joins one feature per patient to the entity rows."""

    def __init__(self) -> None:
        self.entity_df: pd.DataFrame | None = None

    def get_feature_service(self, name: str) -> str:
        return f"service:{name}"

    def list_feature_views(self) -> list[Any]:
        return []

    def get_historical_features(self, entity_df: pd.DataFrame, features: Any) -> Any:
        assert features == "service:readmission_v2"
        self.entity_df = entity_df
        joined = entity_df.assign(feature_a=1.5)[
            ["feature_a", "event_timestamp", "patient_id", "label"]
        ]
        return type("Job", (), {"to_df": lambda _self: joined})()


def test_training_set_orders_label_columns_first() -> None:
    labels = pd.DataFrame(
        {
            "patient_id": ["b", "a"],
            "event_timestamp": pd.to_datetime(["2024-01-02", "2024-01-01"]),
            "label": [0, 1],
        }
    )
    store = _FakeStore()
    frame = readmission_training_set(store, labels)  # type: ignore[arg-type]
    assert list(frame.columns) == ["patient_id", "event_timestamp", "label", "feature_a"]
    assert frame["patient_id"].tolist() == ["a", "b"]
    assert store.entity_df is not None
    assert str(store.entity_df["event_timestamp"].dt.tz) == "UTC"

"""The feature and Feast assets through dagster.materialize in a temporary WORKDIR."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from dagster import AssetKey, AssetSelection, DagsterInstance, materialize

from pipelines.assets import features as features_assets
from pipelines.assets.deid import k_anonymity_settings
from pipelines.assets.feast import ONLINE_STORE, feast_registry
from pipelines.assets.features import FEATURE_ASSET_KEYS, feature_tables
from pipelines.assets.serving import online_store_and_training_set
from pipelines.definitions import batch_assets, build_resources
from pipelines.features.resources import FeastStoreResource
from pipelines.features.stats import plot_distributions
from tests.pipelines.features.crafted import A, crafted_rows, write_views
from vault import warehouse

FAMILY = "Quillfeather"
REPO_ROOT = Path(__file__).resolve().parents[3]
# the features and Feast, without the training set (its step's other asset: no labels here)
FEAST_ASSETS = [feature_tables, feast_registry, online_store_and_training_set]
FEAST_SELECTION = AssetSelection.assets(*FEATURE_ASSET_KEYS, "feast_registry", ONLINE_STORE)


def _work(tmp_path: Path, key_file: Path) -> tuple[DagsterInstance, dict[str, object]]:
    """A vault with one named patient (the canaries), then crafted views in the warehouse."""
    landing = tmp_path / "landing"
    (landing / "export-1").mkdir(parents=True)
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "gender": "female",
        "birthDate": "1961-02-03",
        "name": [{"family": FAMILY, "given": ["Oriane"]}],
    }
    (landing / "export-1" / "data.ndjson").write_bytes(orjson.dumps(patient) + b"\n")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("batches", ["export-1"])
    resources = build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1)
    assert materialize(
        batch_assets, partition_key="export-1", instance=instance, resources=resources
    ).success
    resources["feast_store"] = FeastStoreResource(repo_path="feature_repo")
    return instance, resources


def _write_views(tmp_path: Path, rows: dict[str, list[dict[str, object]]]) -> None:
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb")
    try:
        write_views(con, rows)
    finally:
        con.close()


@pytest.mark.usefixtures("key_file")
def test_feature_and_feast_assets(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance, resources = _work(tmp_path, key_file)
    _write_views(tmp_path, crafted_rows())
    plotted_with: set[int] = set()

    def plot(con: Any, name: str, path: Path, k: int = -1) -> Path:
        plotted_with.add(k)
        return plot_distributions(con, name, path, k)

    monkeypatch.setattr(features_assets, "plot_distributions", plot)
    result = materialize(
        FEAST_ASSETS, selection=FEAST_SELECTION, instance=instance, resources=resources
    )
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 11 and all(c.passed for c in checks)  # 5 tables x 2 + online store
    by_key = {
        m.asset_key: m.metadata for m in result.asset_materializations_for_node("feature_tables")
    }
    assert set(by_key) == set(FEATURE_ASSET_KEYS)
    demo = by_key[AssetKey(["features", "patient_demographics"])]
    assert demo["rows"].value > 3 and demo["patients"].value == 3  # birthdays and first data
    assert (tmp_path / "work" / "features" / "patient_demographics.parquet").exists()
    assert demo["null_rate"].value == {
        "age_years": 0.0, "sex": 0.0, "race_code": 0.0, "ethnicity_code": 0.0
    }  # fmt: skip
    assert "patient_demographics" in str(demo["distributions"].value)
    assert (tmp_path / "work" / "feature_stats" / "patient_demographics.png").exists()
    # the IFCC HbA1c is left out and counted; the crafted results state no unit (read as %):
    # A's three HbA1c and one blood pressure (the one entered in error counts for nothing, and
    # C opted out)
    labs = by_key[AssetKey(["features", "patient_labs_vitals"])]
    assert labs["lab_results_unit_not_read"].value == {"hba1c": 1}
    assert labs["lab_results_without_unit"].value == {
        "hba1c": 3, "systolic_bp": 1, "diastolic_bp": 1
    }  # fmt: skip
    assert "lab_results_unit_not_read" not in demo
    # the plots hide groups under the release's k (this cohort's, 1: see the conftest), not
    # under the default
    assert plotted_with == {k_anonymity_settings(resources["deid_settings"])[0]} == {1}
    registry = result.asset_materializations_for_node("feast_registry")[0].metadata
    assert registry["feature_views"].value == 5
    assert (tmp_path / "work" / "feast" / "registry.db").exists()
    (online,) = [
        m.metadata
        for m in result.asset_materializations_for_node("online_store_and_training_set")
        if m.asset_key == ONLINE_STORE
    ]
    assert online["entities_online"].value["patient_comorbidities"] == 3
    assert online["released_patients"].value == 3  # A, B, D
    assert online["released_patients_not_online"].value == 0
    work = tmp_path / "work"
    # the example reads the same workdir: a training set at each inpatient discharge
    example = subprocess.run(
        [sys.executable, "examples/readmission_training_set.py", "--workdir", str(work)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert example.returncode == 0, example.stderr[-2000:]
    assert "training set: 2 rows" in example.stdout  # A's two discharges; C opted out


@pytest.mark.usefixtures("key_file")
def test_leak_blocks_feast(tmp_path: Path, key_file: Path) -> None:
    instance, resources = _work(tmp_path, key_file)
    rows = crafted_rows()
    for patient in rows["patient"]:
        if patient["id"] == A:
            patient["race_code"] = FAMILY  # a name where a code should be
    _write_views(tmp_path, rows)
    result = materialize(
        FEAST_ASSETS,
        selection=FEAST_SELECTION,
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )
    failed = {
        (c.asset_key.path[-1], c.check_name)
        for c in result.get_asset_check_evaluations()
        if not c.passed
    }
    assert failed == {("patient_demographics", "phi_leak_scan")}
    assert not result.asset_materializations_for_node("feast_registry")
    assert not (tmp_path / "work" / "feast" / "registry.db").exists()
    # nothing of the table reached Feast's offline source; the clean tables were published
    features = tmp_path / "work" / "features"
    assert not (features / "patient_demographics.parquet").exists()
    assert {p.stem for p in features.glob("*.parquet")} == {
        k.path[-1] for k in FEATURE_ASSET_KEYS
    } - {"patient_demographics"}
    demo = {
        m.asset_key: m.metadata for m in result.asset_materializations_for_node("feature_tables")
    }[AssetKey(["features", "patient_demographics"])]
    assert demo["published"].value is False and demo["dagster/row_count"].value == 0
    # the views mended, the next run builds it and serves it
    _write_views(tmp_path, crafted_rows())
    again = materialize(
        FEAST_ASSETS, selection=FEAST_SELECTION, instance=instance, resources=resources
    )
    assert again.success and all(c.passed for c in again.get_asset_check_evaluations())
    assert (features / "patient_demographics.parquet").exists()


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.glob("*")}


def _published(tmp_path: Path, key_file: Path) -> tuple[DagsterInstance, dict[str, object]]:
    """The crafted views' feature tables, built and published."""
    instance, resources = _work(tmp_path, key_file)
    _write_views(tmp_path, crafted_rows())
    assert materialize([feature_tables], instance=instance, resources=resources).success
    return instance, resources


@pytest.mark.usefixtures("key_file")
def test_a_leak_in_changed_rows_publishes_nothing(tmp_path: Path, key_file: Path) -> None:
    instance, resources = _published(tmp_path, key_file)
    features = tmp_path / "work" / "features"
    before = _digests(features)
    rows = crafted_rows()
    for patient in rows["patient"]:
        if patient["id"] == A:
            patient["race_code"] = FAMILY  # A's rows change, and now name the patient
    _write_views(tmp_path, rows)
    result = materialize(
        [feature_tables], instance=instance, resources=resources, raise_on_error=False
    )
    failed = {c.asset_key.path[-1] for c in result.get_asset_check_evaluations() if not c.passed}
    assert failed == {"patient_demographics"}
    metadata = [m.metadata for m in result.asset_materializations_for_node("feature_tables")]
    assert {m["refresh"].value for m in metadata} == {"incremental"}
    assert all(m["published"].value is False for m in metadata)  # held back, all of them
    assert all(m["dagster/row_count"].value > 0 for m in metadata)  # the old tables stand
    assert _digests(features) == before  # byte for byte: no new row of any table published


@pytest.mark.usefixtures("key_file")
def test_a_kept_row_naming_a_new_patient_is_withdrawn(tmp_path: Path, key_file: Path) -> None:
    instance, resources = _work(tmp_path, key_file)
    _write_views(tmp_path, crafted_rows())
    assert materialize(
        FEAST_ASSETS, selection=FEAST_SELECTION, instance=instance, resources=resources
    ).success
    features = tmp_path / "work" / "features"
    assert (features / "patient_demographics.parquet").exists()
    online = _online_rows(tmp_path / "work" / "feast")
    assert online["patient_demographics"] > 0 and online["patient_utilisation"] > 0
    # a second batch brings a patient whose surname is a word the kept rows hold ("female")
    landing = tmp_path / "landing" / "export-2"
    landing.mkdir(parents=True)
    newcomer = {
        "resourceType": "Patient",
        "id": "p2",
        "gender": "male",
        "birthDate": "1970-05-06",
        "name": [{"family": "Female", "given": ["Tobiah"]}],
    }
    (landing / "data.ndjson").write_bytes(orjson.dumps(newcomer) + b"\n")
    instance.add_dynamic_partitions("batches", ["export-2"])
    assert materialize(
        batch_assets, partition_key="export-2", instance=instance, resources=resources
    ).success
    result = materialize(
        [feature_tables], instance=instance, resources=resources, raise_on_error=False
    )
    by_key = {
        m.asset_key.path[-1]: m.metadata
        for m in result.asset_materializations_for_node("feature_tables")
    }
    assert by_key["patient_demographics"]["refresh"].value == "unchanged"
    assert by_key["patient_demographics"]["withdrawn"].value is True
    assert not (features / "patient_demographics.parquet").exists()
    failed = {
        (c.asset_key.path[-1], c.check_name)
        for c in result.get_asset_check_evaluations()
        if not c.passed
    }
    assert ("patient_demographics", "phi_leak_scan") in failed
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb")
    try:
        tables = {
            t
            for (t,) in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'features'"
            ).fetchall()
        }
    finally:
        con.close()
    assert "patient_demographics" not in tables
    assert not (tmp_path / "work" / "feature_stats" / "patient_demographics.png").exists()
    # served nowhere: the view's online rows are gone, the other views' stay
    after = _online_rows(tmp_path / "work" / "feast")
    assert after["patient_demographics"] == 0
    assert after["patient_utilisation"] == online["patient_utilisation"]
    demo = by_key["patient_demographics"]
    assert demo["online_rows_withdrawn"].value == online["patient_demographics"]


def _online_rows(feast_dir: Path) -> dict[str, int]:
    """Rows of each feature view's table in the SQLite online store, counted with sqlite3."""
    (db_path,) = [p for p in feast_dir.rglob("*.db") if p.name != "registry.db"]
    db = sqlite3.connect(db_path)
    try:
        names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        counts = {n: db.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
    finally:
        db.close()
    return {
        view: counts.get(table, 0) for table in names for view in _VIEWS if table.endswith(view)
    }


_VIEWS = [k.path[-1] for k in FEATURE_ASSET_KEYS]

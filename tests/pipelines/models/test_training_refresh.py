"""The training set refreshed for the patients whose rows changed equals the join of every
label row through Feast (the oracle: ``readmission_training_set`` over all labels, a second
computation), after new, changed and removed patients."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from pipelines.features.tables import FEATURE_TABLES
from pipelines.models.storage import LABELS_TABLE, TRAINING_SET_TABLE, parquet_path, write_table
from pipelines.models.training_refresh import refresh_training_set
from pipelines.models.training_set import readmission_training_set
from tests.pipelines.models.test_training_set_feast import _store

feast = pytest.importorskip("feast")

FEATURES = {
    "patient_id": ["a", "a", "b"],
    "event_timestamp": ["2024-01-01", "2024-03-01", "2024-01-15"],
    "burden": [1.0, 3.0, 2.0],
    "sex": ["female", "female", "male"],
}
LABELS = {
    "patient_id": ["a", "a", "b"],
    "event_timestamp": ["2024-02-01", "2024-04-01", "2024-02-10"],
    "label": [1, 0, 0],
}


def _frame(columns: dict[str, list[object]]) -> pd.DataFrame:
    frame = pd.DataFrame(columns)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    if "burden" in frame:
        frame["created"] = pd.to_datetime("2024-06-01", utc=True)
    return frame


def _publish(
    con: duckdb.DuckDBPyConnection, work: Path, features: pd.DataFrame, labels: pd.DataFrame
) -> None:
    """The toy store's Parquet source and ``features.*`` (the first table holds the rows, the
    others none), and the labels, as the release would leave them."""
    features.to_parquet(work.parent / "features.parquet")  # the toy store's source
    con.execute("CREATE SCHEMA IF NOT EXISTS features")
    for i, name in enumerate(FEATURE_TABLES):
        rows = features if i == 0 else features.iloc[0:0]
        con.register("rows", rows)
        con.execute(f"CREATE OR REPLACE TABLE features.{name} AS SELECT * FROM rows")
        con.unregister("rows")
    write_table(con, labels, LABELS_TABLE, work)


def _oracle(store: feast.FeatureStore, labels: pd.DataFrame, work: Path) -> pd.DataFrame:
    """Every label row joined through Feast, typed as the published table is (via DuckDB)."""
    expected = readmission_training_set(store, labels)
    return _canonical(duckdb.connect().from_df(expected).df())


def _utc(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for column in out.columns:
        if isinstance(out[column].dtype, pd.DatetimeTZDtype):
            out[column] = out[column].dt.tz_convert("UTC")
    return out


def _canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in order; time zones by one name (DuckDB's session calls UTC ``Etc/UTC``)."""
    return _utc(frame.sort_values(["patient_id", "event_timestamp"]).reset_index(drop=True))


def test_refresh_equals_a_full_join_after_each_change(tmp_path: Path) -> None:
    store = _store(tmp_path)
    work = tmp_path / "work"
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    features, labels = _frame(FEATURES), _frame(LABELS)
    _publish(con, work, features, labels)
    first = refresh_training_set(con, store, work)
    assert first.mode == "full"
    pd.testing.assert_frame_equal(_canonical(first.frame), _oracle(store, labels, work))

    assert refresh_training_set(con, store, work).mode == "unchanged"

    # b's value changes, c is new with a label, a keeps everything
    features = pd.concat(
        [
            features.assign(burden=features["burden"].where(features["patient_id"] != "b", 5.0)),
            _frame(
                {
                    "patient_id": ["c"],
                    "event_timestamp": ["2024-01-20"],
                    "burden": [7.0],
                    "sex": ["male"],
                }
            ),
        ],
        ignore_index=True,
    )
    labels = pd.concat(
        [labels, _frame({"patient_id": ["c"], "event_timestamp": ["2024-02-20"], "label": [1]})],
        ignore_index=True,
    )
    _publish(con, work, features, labels)
    second = refresh_training_set(con, store, work)
    assert (second.mode, second.patients_changed, second.patients_removed) == ("incremental", 2, 0)
    pd.testing.assert_frame_equal(_canonical(second.frame), _oracle(store, labels, work))
    # the file keeps the full build's row order, which the trainer's split reads
    on_disk = pd.read_parquet(parquet_path(work, TRAINING_SET_TABLE))
    pd.testing.assert_frame_equal(_canonical(on_disk), on_disk.pipe(_utc))

    # a leaves the labels (erased, opted out): its rows go
    labels = labels[labels["patient_id"] != "a"].reset_index(drop=True)
    _publish(con, work, features, labels)
    third = refresh_training_set(con, store, work)
    assert (third.mode, third.patients_changed, third.patients_removed) == ("incremental", 0, 1)
    pd.testing.assert_frame_equal(_canonical(third.frame), _oracle(store, labels, work))
    assert set(third.frame["patient_id"]) == {"b", "c"}


def test_a_first_training_set_of_no_rows_takes_the_first_labelled_patient(
    tmp_path: Path,
) -> None:
    """A first release with no label row (no discharge yet, or every labelled patient withheld
    by k-anonymity) builds an empty training set; the patient labelled by a later release (a
    batch, a patient no longer withheld) is joined into it. The empty table's patient_id was
    typed NULL (an empty object column), and every later refresh that inserted a row failed
    the serving step."""
    store = _store(tmp_path)
    work = tmp_path / "work"
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    features, labels = _frame(FEATURES), _frame(LABELS)
    _publish(con, work, features, labels.iloc[0:0])
    first = refresh_training_set(con, store, work)
    assert (first.mode, len(first.frame)) == ("full", 0)
    ((kind,),) = con.execute(
        "SELECT data_type FROM duckdb_columns() WHERE schema_name = 'models' "
        f"AND table_name = '{TRAINING_SET_TABLE}' AND column_name = 'patient_id'"
    ).fetchall()
    assert kind == "VARCHAR"

    _publish(con, work, features, labels)
    second = refresh_training_set(con, store, work)
    assert (second.mode, second.patients_changed) == ("incremental", 2)
    pd.testing.assert_frame_equal(_canonical(second.frame), _oracle(store, labels, work))

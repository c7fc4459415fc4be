"""The training set: the label rows joined point-in-time to the ``readmission_v2`` features.

Timestamp features (``prior_discharge_at``, ``<lab>_measured_at``) become whole days before the
row's ``event_timestamp`` (``prior_discharge_days_since``, ``<lab>_measured_days_since``): a
"days since" value changes every day, so the store keeps the time and the request time turns it
into days, exact at any T."""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb
import pandas as pd

from pipelines.features.feast_store import OFFLINE_STORE_LOCK, with_declared_types
from pipelines.features.point_in_time import UnsupportedJoinError, historical_features
from pipelines.models.labels import LABEL_COLUMNS

if TYPE_CHECKING:
    from feast import FeatureStore

FEATURE_SERVICE = "readmission_v2"
TIMESTAMP_SUFFIX = "_at"
AUDIT_COLUMNS = ("audit_race", "audit_ethnicity")


def entity_frame(labels: pd.DataFrame) -> pd.DataFrame:
    """The Feast entity frame: the label columns with ``event_timestamp`` as UTC datetimes."""
    entities = labels[list(LABEL_COLUMNS)].copy()
    entities["event_timestamp"] = pd.to_datetime(entities["event_timestamp"], utc=True)
    entities["patient_id"] = entities["patient_id"].astype(str)
    return entities.reset_index(drop=True)


def with_days_since(frame: pd.DataFrame) -> pd.DataFrame:
    """Each ``<name>_at`` datetime column replaced by ``<name>_days_since``: whole days from it
    to ``event_timestamp`` (nullable Int64; null when the feature is null)."""
    out = frame.copy()
    at = pd.to_datetime(out["event_timestamp"], utc=True)
    for column in [c for c in frame.columns if str(c).endswith(TIMESTAMP_SUFFIX)]:
        if not pd.api.types.is_datetime64_any_dtype(out[column]):
            continue
        days = (at - pd.to_datetime(out[column], utc=True)).dt.days
        position = out.columns.get_loc(column)
        out = out.drop(columns=[column])
        out.insert(
            position, f"{str(column)[: -len(TIMESTAMP_SUFFIX)]}_days_since", days.astype("Int64")
        )
    return out


def readmission_training_set(
    store: FeatureStore, labels: pd.DataFrame, feature_service: str = FEATURE_SERVICE
) -> pd.DataFrame:
    """Features of ``feature_service`` as of each discharge (Feast point-in-time join), one row
    per label row: ``patient_id``, ``event_timestamp``, ``label``, then the feature columns."""
    entities = entity_frame(labels)
    service = store.get_feature_service(feature_service)
    with OFFLINE_STORE_LOCK:
        joined = store.get_historical_features(entity_df=entities, features=service).to_df()
    return _training_frame(store, joined)


def readmission_training_rows(
    con: duckdb.DuckDBPyConnection,
    store: FeatureStore,
    labels: pd.DataFrame,
    feature_service: str = FEATURE_SERVICE,
) -> pd.DataFrame:
    """The rows of :func:`readmission_training_set`, joined by DuckDB from the same Parquet files
    (:mod:`pipelines.features.point_in_time`): for a few patients Feast's query compilation
    costs ten times the join. A service the statement cannot state is joined by Feast."""
    try:
        joined = historical_features(con, store, entity_frame(labels), feature_service)
    except UnsupportedJoinError:
        return readmission_training_set(store, labels, feature_service)
    return _training_frame(store, joined)


def _training_frame(store: FeatureStore, joined: pd.DataFrame) -> pd.DataFrame:
    """Declared types, days since each ``_at`` time, label columns first, rows by patient and
    time."""
    joined = with_days_since(with_declared_types(store, joined))
    leading = list(LABEL_COLUMNS)
    rest = [c for c in joined.columns if c not in leading]
    return (
        joined[leading + rest]
        .sort_values(["patient_id", "event_timestamp"], kind="stable")
        .reset_index(drop=True)
    )


def with_audit_attributes(con: duckdb.DuckDBPyConnection, training: pd.DataFrame) -> pd.DataFrame:
    """``training`` plus ``audit_race`` and ``audit_ethnicity`` from ``views.patient`` (codes,
    no identifiers), for the subgroup audit only: the feature service carries no race, and the
    audit must not depend on what the model is allowed to see. Without the view the columns are
    left out."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'views' "
        "AND table_name = 'patient' AND column_name IN ('id', 'race_code', 'ethnicity_code')"
    ).fetchone()
    if not exists or exists[0] < 3:
        return training
    audit = con.execute(
        "SELECT id AS patient_id, any_value(race_code) AS audit_race, "
        "any_value(ethnicity_code) AS audit_ethnicity FROM views.patient GROUP BY id"
    ).df()
    merged = training.merge(audit, on="patient_id", how="left", validate="many_to_one")
    return merged.set_index(training.index)

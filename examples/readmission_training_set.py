"""A readmission training set from the Feast store, and one patient's online features.

Entity rows are (patient_id, event_timestamp): here every inpatient discharge in
``views.encounter``, the moment a 30-day readmission model scores. Feast joins each row to the
latest feature row at or before its timestamp (never later); a table has a row at every change
of a value, so that row holds the value at the timestamp.

    EHR_WORKDIR=data/work .venv/bin/python examples/readmission_training_set.py

It needs a run that built the views and features and applied the repo (``ehr run`` or the
Dagster assets ``features/*``, ``feast_registry``, ``feast_online_store``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import duckdb
import pandas as pd

from pipelines.features.cohort import encounter_held_sql, inpatient_sql, own_encounter_sql
from pipelines.features.feast_store import feature_store, online_features


def discharges(warehouse: Path, limit: int | None = None) -> pd.DataFrame:
    """Entity rows: each inpatient discharge (patient pseudonym, discharge time) of the
    patients the feature tables hold (those who opted out of research are not there), by the
    rules of the readmission label: an inpatient class (IMP, ACUTE, NONAC), a hospitalisation
    once (not its ICU or ward segments, ``Encounter.partOf``), no encounter that did not take
    place, at the latest instant the discharge can stand for (the end of its day when it has
    no time), where the features first know the stay ended."""
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        sql = f"""
            SELECT e.patient_id, e.period_end_latest AS event_timestamp
            FROM views.encounter e
            WHERE {inpatient_sql("e.class_code")} AND {encounter_held_sql("e.status")}
              AND {own_encounter_sql("views.encounter", "e")}
              AND e.period_end_latest IS NOT NULL
              AND e.patient_id IN (SELECT patient_id FROM features.patient_demographics)
            ORDER BY e.period_end_latest, e.patient_id
        """
        if limit:
            sql += f" LIMIT {int(limit)}"
        return con.execute(sql).df()
    finally:
        con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.environ.get("EHR_WORKDIR", "data/work"))
    parser.add_argument("--repo", default="feature_repo")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir)

    store = feature_store(args.repo, workdir / "feast", workdir / "features")
    entity_df = discharges(workdir / "warehouse.duckdb", args.limit)
    training = store.get_historical_features(
        entity_df=entity_df, features=store.get_feature_service("readmission_v2")
    ).to_df()
    print(f"training set: {len(training)} rows x {training.shape[1]} columns")
    print(training.describe().T.to_string())

    if len(entity_df):
        patient = str(entity_df["patient_id"].iloc[-1])
        # the project's helper lists patients the online store does not know (an opted-out or
        # erased patient) instead of answering with nulls
        answer = online_features(store, store.get_feature_service("readmission_v2"), [patient])
        print({name: values[0] for name, values in answer.values.items()})
        print(f"unknown to the online store: {len(answer.unknown)}")


if __name__ == "__main__":
    main()

"""A second model through the feature store: any inpatient admission within 90 days.

A model builder's path on the platform, end to end:

1. who can be asked about: ``ehr features entities`` (released, not opted out);
2. what there is: ``ehr features list`` / ``ehr features describe NAME``;
3. entity rows (patient, T) and labels from the views; here T is the end of every ambulatory
   or emergency encounter, where the features first know it ended (``period_end_latest``: the
   end of its day when it has no time), label 1 when an inpatient stay starts in the 90 days
   after it and is not yet known to the features at T. The readmission label's rules hold
   (``pipelines.features.cohort``): an encounter that did not take place is no visit, stay or
   data time; a stay is any inpatient class, a hospitalisation once (not its ICU or ward
   segments); the follow-up horizon is the latest encounter dated no later than the release can
   know (a visit typed 2105 or a planned admission moves no one's horizon), less twice the
   date-shift range (a patient's own data can end that much before the latest);
4. features as of each T through Feast (``get_historical_features``), exact at any T;
5. a patient split, a model, and its evaluation with bootstrap 95% intervals (the AUROC only
   from 20 test positives up, as on the readmission model card).

    EHR_WORKDIR=data/work .venv/bin/python examples/admission_90d_model.py [--out DIR]

It needs a run that built the views and features and applied the repo (``ehr run``).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from pipelines.assets.models import censor_margin_days
from pipelines.features.cohort import (
    encounter_held_sql,
    inpatient_sql,
    own_encounter_sql,
    release_known_by,
    released_cohort,
    timestamptz_sql,
)
from pipelines.features.feast_store import feature_store, with_declared_types
from pipelines.models.evaluation import overall_metrics
from pipelines.models.frame import feature_columns
from pipelines.models.training import (
    InsufficientTrainingDataError,
    build_pipeline,
    inner_folds,
    split_by_patient,
)
from pipelines.models.training_set import with_days_since
from pipelines.resources import DeidSettings

HORIZON_DAYS = 90
FEATURES = [
    "patient_demographics:age_years",
    "patient_demographics:sex",
    "patient_utilisation:encounters_180d",
    "patient_utilisation:emergency_visits_180d",
    "patient_utilisation:prior_inpatient_stays_365d",
    "patient_utilisation:prior_discharge_at",
    "patient_comorbidities:charlson_index",
    "patient_comorbidities:has_heart_failure",
    "patient_comorbidities:has_copd",
    "patient_comorbidities:has_ckd",
    "patient_medications:active_medication_count",
    "patient_labs_vitals:hba1c_latest",
    "patient_labs_vitals:egfr_latest",
    "patient_labs_vitals:systolic_bp_latest",
]


def label_sql(known_by: datetime | None, margin_days: int) -> str:
    """The label query, in named steps: the visits that are prediction times, the horizon of
    the data (a visit whose 90 days run past it, less ``margin_days``, is censored,
    :func:`censor_margin_days`) and the outcome; its one parameter is the cohort.
    ``known_by`` bounds the encounter dates that set the horizon (:func:`release_known_by`)."""
    held = f"{encounter_held_sql('e.status')} AND {own_encounter_sql('views.encounter', 'e')}"
    known = "true" if known_by is None else f"ts <= {timestamptz_sql(known_by)}"
    return f"""
WITH visits AS (
    SELECT patient_id, coalesce(period_end, period_start) AS ended,
        coalesce(period_end_latest, period_start_latest) AS event_timestamp
    FROM views.encounter e
    WHERE class_code IN ('AMB', 'EMER') AND period_start IS NOT NULL AND {held}
),
times AS (
    SELECT period_start AS ts FROM views.encounter e WHERE {held}
    UNION ALL SELECT period_end FROM views.encounter e WHERE {held}
),
horizon AS (SELECT max(ts) AS last_ts FROM times WHERE {known}),
admissions AS (
    SELECT patient_id, period_start, period_start_latest FROM views.encounter e
    WHERE {inpatient_sql("e.class_code")} AND {held}
)
SELECT v.patient_id, v.event_timestamp,
    EXISTS (
        SELECT 1 FROM admissions a
        WHERE a.patient_id = v.patient_id AND a.period_start > v.ended
          -- not yet known to the features at T: never both a feature and the outcome
          AND a.period_start_latest > v.event_timestamp
          AND a.period_start <= v.ended + INTERVAL {HORIZON_DAYS} DAY
    )::INT AS label
FROM visits v, horizon h
WHERE v.ended + INTERVAL {HORIZON_DAYS} DAY <= h.last_ts - INTERVAL {int(margin_days)} DAY
  AND v.patient_id IN (SELECT unnest(?::VARCHAR[]))
ORDER BY v.patient_id, v.event_timestamp
"""


def admission_labels(warehouse: Path, profile: str = "research") -> pd.DataFrame:
    """(patient_id, event_timestamp, label) for the released, not opted-out patients of a
    release under ``profile``, whose date-shift range sets the horizon's margin."""
    settings = DeidSettings(profile=profile)
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        cohort = released_cohort(con)
        known_by = release_known_by(con, settings.date_shift_days())
        return con.execute(label_sql(known_by, censor_margin_days(settings)), [cohort]).df()
    finally:
        con.close()


def training_set(workdir: Path, labels: pd.DataFrame) -> pd.DataFrame:
    """The label rows with their features as of each T, types as declared in the registry."""
    store = feature_store(None, workdir / "feast", workdir / "features")
    entities = labels.assign(event_timestamp=pd.to_datetime(labels["event_timestamp"], utc=True))
    joined = store.get_historical_features(entity_df=entities, features=FEATURES).to_df()
    return with_days_since(with_declared_types(store, joined))


def train_and_evaluate(frame: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """A patient split, logistic regression with C chosen on grouped inner folds, and the
    held-out metrics with bootstrap intervals (by patient)."""
    columns = feature_columns(frame, "label")
    train, test = split_by_patient(frame, "label", seed)
    y = frame["label"].astype("int64").to_numpy()
    groups = frame["patient_id"].astype(str).to_numpy()
    model = build_pipeline(
        columns, "logistic_regression", seed, inner_folds(y[train], groups[train], seed)
    )
    x = frame[list(columns.all)]
    model.fit(x.iloc[train], y[train])
    p = model.predict_proba(x.iloc[test])[:, 1]
    return {
        "outcome": f"inpatient admission within {HORIZON_DAYS} days of a visit",
        "rows": len(frame),
        "positives": int(y.sum()),
        "n_train": len(train),
        "features": list(columns.all),
        "test": overall_metrics(y[test], p, groups[test], seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.environ.get("EHR_WORKDIR", "data/work"))
    parser.add_argument("--out", type=Path, default=None, help="write metrics.json here")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    labels = admission_labels(workdir / "warehouse.duckdb")
    frame = training_set(workdir, labels)
    print(f"training set: {len(frame)} rows, {int(frame['label'].sum())} positives")
    try:
        result = train_and_evaluate(frame)
    except InsufficientTrainingDataError as exc:
        print(f"model not trained: {exc}")
        return
    test = result["test"]
    auroc = test["auroc_note"] or (
        f"{test['auroc']:.3f} (95% CI {test['ci95']['auroc'][0]:.3f}-"
        f"{test['ci95']['auroc'][1]:.3f})"
    )
    print(f"held-out: {test['n']} rows, {test['positives']} positives; AUROC {auroc}")
    print(
        f"Brier {test['brier']:.4f}, calibration in the large "
        f"{test['calibration_in_the_large']:+.3f}"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
        print(f"metrics: {args.out / 'metrics.json'}")


if __name__ == "__main__":
    main()

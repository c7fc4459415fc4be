"""Small hand-made view tables and training frames for the model tests."""

from __future__ import annotations

from datetime import datetime

import duckdb
import numpy as np
import pandas as pd

ENCOUNTER_DDL = """
CREATE TABLE views.encounter (
    id VARCHAR, patient_id VARCHAR, status VARCHAR, class_code VARCHAR, type_system VARCHAR,
    type_code VARCHAR, type_display VARCHAR, period_start TIMESTAMPTZ, period_end TIMESTAMPTZ,
    discharge_disposition_code VARCHAR,
    -- the crafted times all have a time of day: the latest instant each stands for is itself
    period_start_latest TIMESTAMPTZ GENERATED ALWAYS AS (period_start) VIRTUAL,
    period_end_latest TIMESTAMPTZ GENERATED ALWAYS AS (period_end) VIRTUAL
)"""
CONSENT_DDL = """
CREATE TABLE views.consent (
    id VARCHAR, patient_id VARCHAR, status VARCHAR, scope_code VARCHAR, category_code VARCHAR,
    policy_rule_code VARCHAR, provision_type VARCHAR, date_time TIMESTAMPTZ
)"""
PATIENT_DDL = """
CREATE TABLE views.patient (
    id VARCHAR, gender VARCHAR, birth_date DATE, deceased BOOLEAN,
    deceased_date_time TIMESTAMPTZ, race_code VARCHAR, race_display VARCHAR,
    ethnicity_code VARCHAR, ethnicity_display VARCHAR, state VARCHAR
)"""

# (id, patient, class, start, end, disposition); times are UTC midnights as after date shifting.
ENCOUNTERS: list[tuple[str, str, str, str, str | None, str | None]] = [
    # readmitted: admitted again 22 days after discharge; the second stay is not followed up
    ("e1", "readmit", "IMP", "2024-01-05", "2024-01-10", "home"),
    ("e2", "readmit", "IMP", "2024-02-01", "2024-02-05", "home"),
    # not readmitted: only an ambulatory visit within 30 days, next admission after 60 days
    ("e3", "noreadmit", "IMP", "2024-03-01", "2024-03-04", "home"),
    ("e4", "noreadmit", "AMB", "2024-03-10", "2024-03-10", None),
    ("e5", "noreadmit", "IMP", "2024-05-03", "2024-05-06", "home"),
    # boundary: exactly 30 days counts, 30 days and one second does not
    ("e6", "boundary_in", "IMP", "2024-04-01", "2024-04-02", "home"),
    ("e7", "boundary_in", "IMP", "2024-05-02", "2024-05-03", "home"),
    ("e8", "boundary_out", "IMP", "2024-04-01", "2024-04-02", "home"),
    ("e9", "boundary_out", "IMP", "2024-05-02 00:00:01", "2024-05-04", "home"),
    # opted out of research: excluded whatever happens
    ("e10", "optout", "IMP", "2024-01-01", "2024-01-03", "home"),
    ("e11", "optout_rule", "IMP", "2024-01-01", "2024-01-03", "home"),
    # an inactive opt-out does not exclude
    ("e12", "inactive_optout", "IMP", "2024-06-01", "2024-06-03", "home"),
    # died at the stay (expired disposition)
    ("e13", "died", "IMP", "2024-06-01", "2024-06-03", "exp"),
    # censored: the 30-day window runs past the last data timestamp (2024-12-31)
    ("e14", "censored", "IMP", "2024-12-10", "2024-12-15", "home"),
    # still in hospital: no period_end, not an index discharge
    ("e15", "inpatient_now", "IMP", "2024-12-20", None, None),
    ("e16", "noreadmit", "AMB", "2024-12-31", "2024-12-31", None),
]

CONSENTS: list[tuple[str, str, str, str, str | None, str]] = [
    ("c1", "optout", "active", "research", None, "deny"),
    ("c2", "optout_rule", "active", "research", "OPTOUT", "permit"),
    ("c3", "inactive_optout", "inactive", "research", "OPTOUT", "deny"),
    ("c4", "readmit", "active", "patient-privacy", None, "deny"),
    ("c5", "noreadmit", "active", "research", "OPTIN", "permit"),
]


def crafted_views(con: duckdb.DuckDBPyConnection, with_patient: bool = False) -> None:
    """Create ``views.encounter`` and ``views.consent`` (and optionally ``views.patient``)."""
    con.execute("SET TimeZone = 'UTC'")
    con.execute("CREATE SCHEMA IF NOT EXISTS views")
    con.execute(ENCOUNTER_DDL)
    con.execute(CONSENT_DDL)
    for eid, pid, cls, start, end, disp in ENCOUNTERS:
        con.execute(
            "INSERT INTO views.encounter VALUES (?, ?, 'finished', ?, NULL, NULL, NULL, "
            "CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ), ?)",
            [eid, pid, cls, start, end, disp],
        )
    for cid, pid, status, scope, rule, provision in CONSENTS:
        con.execute(
            "INSERT INTO views.consent VALUES (?, ?, ?, ?, NULL, ?, ?, NULL)",
            [cid, pid, status, scope, rule, provision],
        )
    if with_patient:
        con.execute(PATIENT_DDL)
        con.execute(
            "INSERT INTO views.patient (id, gender, deceased, deceased_date_time) VALUES "
            "('noreadmit', 'female', TRUE, CAST('2024-05-06 00:00:00+00' AS TIMESTAMPTZ)), "
            "('readmit', 'male', FALSE, NULL)"
        )
        # every other patient of the encounters is released too: the label keeps only those
        others = sorted({pid for _, pid, *_ in ENCOUNTERS} - {"noreadmit", "readmit"})
        con.executemany("INSERT INTO views.patient (id) VALUES (?)", [[p] for p in others])


def planted_frame(n_patients: int = 600, seed: int = 3) -> pd.DataFrame:
    """A training frame with a planted signal in two of its features (names unknown to the
    trainer), a noise feature, sex/race strings and an age column."""
    rng = np.random.default_rng(seed)
    visits = rng.integers(1, 4, n_patients)
    patient = np.repeat([f"{i:032x}" for i in range(n_patients)], visits)
    n = len(patient)
    age = rng.integers(20, 95, n).astype(float)
    burden = rng.poisson(1.5, n).astype(float)
    lab = rng.normal(6.0, 1.2, n)
    lab[rng.random(n) < 0.25] = np.nan
    noise = rng.normal(0, 1, n)
    logit = -2.2 + 0.04 * (age - 65) + 0.7 * burden + 0.4 * np.nan_to_num(lab - 6.0)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype("int64")
    sex = rng.choice(["male", "female"], n)
    race = rng.choice(["2106-3", "2054-5", "2028-9", "1002-5"], n, p=[0.6, 0.25, 0.13, 0.02])
    start = pd.Timestamp(datetime(2024, 1, 1), tz="UTC")
    return pd.DataFrame(
        {
            "patient_id": patient,
            "event_timestamp": start + pd.to_timedelta(rng.integers(0, 300, n), unit="D"),
            "label": label,
            "age_years": age,
            "condition_burden": pd.array(burden.astype(int), dtype="Int64"),
            "lab_value": lab,
            "noise_score": noise,
            "gender": pd.array(sex, dtype="string"),
            "race_code": race,
        }
    )

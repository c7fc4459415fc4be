from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from pipelines.features import FEATURE_TABLES, build_feature_tables
from pipelines.features.tables import build_feature_tables_report
from tests.pipelines.features.crafted import A, B, C, D, crafted_rows, ts, write_views


@pytest.fixture
def built(tmp_path: Path) -> tuple[duckdb.DuckDBPyConnection, dict[str, int], Path]:
    con = duckdb.connect()
    write_views(con, crafted_rows())
    counts = build_feature_tables(con, tmp_path / "features")
    return con, counts, tmp_path / "features"


def _row(con: duckdb.DuckDBPyConnection, table: str, pid: str, at: datetime) -> dict[str, Any]:
    """The patient's values at ``at``: the latest row at or before it (what Feast returns)."""
    cur = con.execute(
        f"SELECT * FROM features.{table} WHERE patient_id = ? AND event_timestamp <= ? "
        "ORDER BY event_timestamp DESC LIMIT 1",
        [pid, at],
    )
    names = [d[0] for d in cur.description]
    rows = cur.fetchall()
    assert len(rows) == 1, (table, at, len(rows))
    return dict(zip(names, rows[0], strict=True))


def test_every_table_written_to_duckdb_and_parquet(built: Any) -> None:
    con, counts, out = built
    assert set(counts) == set(FEATURE_TABLES)
    for name, n in counts.items():
        assert n > 0
        table = pq.read_table(out / f"{name}.parquet")
        assert table.num_rows == n
        assert table.column_names[:3] == ["patient_id", "event_timestamp", "created"]
        assert str(table.schema.field("event_timestamp").type) == "timestamp[us, tz=UTC]"
        # one row per patient and snapshot time
        ((dupes,),) = con.execute(
            f"SELECT count(*) - count(DISTINCT (patient_id, event_timestamp)) FROM features.{name}"
        ).fetchall()
        assert dupes == 0


def test_opted_out_patient_in_no_table_and_inactive_consent_ignored(built: Any) -> None:
    con, _, _ = built
    for name in FEATURE_TABLES:
        patients = {p for (p,) in con.execute(f"SELECT patient_id FROM features.{name}").fetchall()}
        assert C not in patients, name
        assert A in patients, name
    demo = {
        p for (p,) in con.execute("SELECT patient_id FROM features.patient_demographics").fetchall()
    }
    assert demo == {A, B, D}  # D's opt-out consent is inactive


def test_demographics_age_at_event_and_cap(built: Any) -> None:
    con, _, _ = built
    first = _row(con, "patient_demographics", A, ts(2024, 1, 1))
    assert (first["age_years"], first["sex"], first["race_code"]) == (63, "female", "2106-3")
    assert first["ethnicity_code"] == "2186-5"
    # birthday on 15 June: still 63 on 1 June, 64 from 1 July
    assert _row(con, "patient_demographics", A, ts(2024, 6, 1))["age_years"] == 63
    assert _row(con, "patient_demographics", A, ts(2024, 7, 1))["age_years"] == 64
    assert _row(con, "patient_demographics", B, ts(2024, 5, 1))["age_years"] == 90  # 99 → 90
    # between events age still moves: the birthday row of 15 June
    assert _row(con, "patient_demographics", A, ts(2024, 6, 15))["age_years"] == 64
    assert _row(con, "patient_demographics", A, ts(2024, 6, 14))["age_years"] == 63


def test_utilisation_windows_and_prior_stays(built: Any) -> None:
    con, _, _ = built
    at_admission = _row(con, "patient_utilisation", A, ts(2024, 3, 10))
    assert at_admission["encounters_30d"] == 2  # EMER 1 Mar and this IMP
    assert at_admission["emergency_visits_30d"] == 1
    assert at_admission["prior_inpatient_stays_30d"] == 0
    assert at_admission["prior_discharge_at"] is None  # no stay ended before
    at_discharge = _row(con, "patient_utilisation", A, ts(2024, 3, 15))
    # the index stay is not "prior" at its own discharge, only just after it
    assert at_discharge["prior_inpatient_stays_30d"] == 0
    assert at_discharge["prior_discharge_at"] is None
    after = _row(con, "patient_utilisation", A, ts(2024, 3, 15) + timedelta(microseconds=1))
    assert after["prior_inpatient_stays_30d"] == 1 and after["prior_stay_length_days"] == 5
    april = _row(con, "patient_utilisation", A, ts(2024, 4, 1))
    assert april["encounters_30d"] == 2  # 10 Mar IMP and 1 Apr; 1 Mar EMER is 31 days back
    assert april["emergency_visits_30d"] == 0 and april["emergency_visits_180d"] == 1
    assert april["prior_discharge_at"] == ts(2024, 3, 15)
    second_discharge = _row(con, "patient_utilisation", A, ts(2024, 6, 4))
    assert second_discharge["prior_stay_length_days"] == 5  # still the March stay
    assert second_discharge["prior_inpatient_stays_365d"] == 1
    assert second_discharge["encounters_180d"] == 5
    # between events the windows still move: 30 days after 1 Jul nothing is left
    quiet = _row(con, "patient_utilisation", A, ts(2024, 7, 31))
    assert quiet["encounters_30d"] == 0 and quiet["encounters_365d"] == 6
    assert _row(con, "patient_utilisation", A, ts(2024, 7, 30))["encounters_30d"] == 1


def test_comorbidity_flags_and_charlson(built: Any) -> None:
    con, _, _ = built
    start = _row(con, "patient_comorbidities", A, ts(2024, 1, 1))
    assert start["has_diabetes"] and not start["has_heart_failure"]
    assert not start["has_copd"]  # refuted J44.9 never counts
    assert start["charlson_index"] == 0  # uncomplicated diabetes weighs 0 (Quan 2011)
    chf = _row(con, "patient_comorbidities", A, ts(2024, 3, 10))  # recorded date only
    assert not _row(con, "patient_comorbidities", A, ts(2024, 3, 9))["has_heart_failure"]
    assert chf["has_heart_failure"] and chf["charlson_index"] == 2
    cancer = _row(con, "patient_comorbidities", A, ts(2024, 4, 1))
    # metastatic (6) replaces any malignancy (2): 2 (CHF) + 6
    assert cancer["has_cancer"] and cancer["charlson_index"] == 8
    assert _row(con, "patient_comorbidities", D, ts(2024, 2, 1))["has_hypertension"]
    assert not _row(con, "patient_comorbidities", B, ts(2024, 5, 1))["has_diabetes"]


def test_medication_counts_classes_and_polypharmacy(built: Any) -> None:
    con, _, _ = built
    first = _row(con, "patient_medications", A, ts(2024, 1, 1))
    assert first["active_medication_count"] == 2
    assert first["on_metformin"] and first["on_insulin"] and not first["on_statin"]
    busy = _row(con, "patient_medications", A, ts(2024, 3, 15))
    # metformin, insulin, lisinopril, warfarin (active) + atorvastatin, sertraline (recent);
    # the request entered in error never counts
    assert busy["active_medication_count"] == 6 and busy["polypharmacy"]
    assert busy["on_statin"] and busy["on_antidepressant"] and busy["on_anticoagulant"]
    later = _row(con, "patient_medications", A, ts(2024, 7, 1))
    # completed/stopped courses older than 90 days drop out; still-active ones stay
    assert later["active_medication_count"] == 4 and not later["polypharmacy"]
    # prescribed within 180 days: March's four (January's two are 182 days back)
    assert later["medications_180d"] == 4
    assert not later["on_statin"] and later["on_antihypertensive"]


def test_labs_latest_mean_and_measured_at(built: Any) -> None:
    con, _, _ = built
    march = _row(con, "patient_labs_vitals", A, ts(2024, 3, 15))
    assert march["hba1c_latest"] == 9.0 and march["hba1c_mean_365d"] == 8.0
    assert march["hba1c_measured_at"] == ts(2024, 3, 10)
    assert march["systolic_bp_latest"] == 140.0 and march["diastolic_bp_latest"] == 90.0
    assert march["heart_rate_latest"] is None and march["heart_rate_measured_at"] is None
    # 365 days after 1 Jan 2024 the 7.0 leaves the mean, with no measurement that day
    assert _row(con, "patient_labs_vitals", A, ts(2024, 12, 31))["hba1c_mean_365d"] == 9.0
    # the value entered in error (15.0 on 20 Mar) is ignored; the 1 Jan value leaves the window
    january = _row(con, "patient_labs_vitals", A, ts(2025, 1, 5))
    assert january["hba1c_latest"] == 8.0 and january["hba1c_mean_365d"] == 8.5


def test_point_in_time_rows_never_use_later_data(built: Any) -> None:
    con, _, _ = built
    before = _row(con, "patient_labs_vitals", A, ts(2024, 1, 1))
    assert before["hba1c_latest"] == 7.0 and before["systolic_bp_latest"] is None


def test_missing_views_read_as_empty(tmp_path: Path) -> None:
    con = duckdb.connect()
    rows = crafted_rows()
    write_views(con, {k: v for k, v in rows.items() if k in ("patient", "encounter")})
    con.execute("DROP TABLE views.observation")
    report = build_feature_tables_report(con, tmp_path)
    assert report.rows["patient_labs_vitals"] == 0  # no measurement, nothing changes
    assert report.rows["patient_utilisation"] > 0
    assert report.opted_out == 0


def test_condition_counts_from_recorded_date_not_onset(tmp_path: Path) -> None:
    rows = crafted_rows()
    # onset back-dated to 2009, recorded (known) only on 1 June 2024
    rows["condition"].append(
        {
            "id": "c8",
            "patient_id": D,
            "verification_status": "confirmed",
            "onset_date_time": ts(2009, 5, 1),
            "recorded_date": ts(2024, 6, 1),
            "code_system": "http://hl7.org/fhir/sid/icd-10-cm",
            "code": "I50.9",
        }
    )
    con = duckdb.connect()
    write_views(con, rows)
    build_feature_tables(con, tmp_path / "features")
    before = _row(con, "patient_comorbidities", D, ts(2024, 5, 31))
    assert not before["has_heart_failure"] and before["charlson_index"] == 0
    known = _row(con, "patient_comorbidities", D, ts(2024, 6, 1))
    assert known["has_heart_failure"] and known["charlson_index"] == 2


def test_lab_codes_table_holds_every_code_of_every_measure() -> None:
    from pipelines.features.tables import LAB_MEASURES, register_lab_codes

    con = duckdb.connect()
    register_lab_codes(con)
    register_lab_codes(con)  # replaced, not appended to
    want = sorted((m, code, comp) for m, codes in LAB_MEASURES.items() for code, comp in codes)
    assert sorted(con.execute("SELECT * FROM lab_codes").fetchall()) == want

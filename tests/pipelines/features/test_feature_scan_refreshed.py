"""The leak scan after an incremental feature refresh: the recomputed patients' rows in full,
every other row's distinct values against every canary known now; checked against the full
row-by-row scan."""

from __future__ import annotations

import duckdb

from deid.leakscan import CanarySet
from pipelines.features.checks import scan_feature_table


def _features(rows: list[tuple[str, str, str]]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE SCHEMA features")
    con.execute(
        "CREATE TABLE features.patient_demographics "
        "(patient_id VARCHAR, event_timestamp TIMESTAMP, sex VARCHAR, race_code VARCHAR, "
        "age_years DOUBLE)"
    )
    con.executemany(
        "INSERT INTO features.patient_demographics VALUES (?, TIMESTAMP '2020-01-01', ?, ?, 40)",
        rows,
    )
    con.execute("CREATE TABLE refreshed (patient_id VARCHAR)")
    return con


def _canaries() -> CanarySet:
    canaries = CanarySet()
    canaries.add_patient({"name": [{"family": "Quillfeather", "given": ["Marisol"]}]}, "p2")
    canaries.add_patient({"birthDate": "1961-04-09"}, "p3")
    return canaries


def test_a_new_patients_name_in_a_kept_row_is_found() -> None:
    con = _features([("p1", "Marisol Quillfeather", "2106-3"), ("p2", "female", "2106-3")])
    con.execute("INSERT INTO refreshed VALUES ('p2')")  # p1's row was kept
    canaries = _canaries()
    full = scan_feature_table(con, canaries, "patient_demographics")
    refreshed = scan_feature_table(con, canaries, "patient_demographics", refreshed="refreshed")
    assert not full.passed and not refreshed.passed
    assert {h.kind for h in refreshed.hits} == {h.kind for h in full.hits} == {"full_name", "name"}


def test_recomputed_patients_are_scanned_for_their_own_birth_date() -> None:
    con = _features([("p3", "1961-04-09", "2106-3"), ("p4", "female", "2106-3")])
    con.execute("INSERT INTO refreshed VALUES ('p3')")
    canaries = _canaries()
    scan = scan_feature_table(con, canaries, "patient_demographics", refreshed="refreshed")
    assert [(h.row, h.kind) for h in scan.hits] == [("p3", "birth_date")]
    clean = _features([("p4", "female", "2106-3")])
    clean.execute("INSERT INTO refreshed VALUES ('p4')")
    assert scan_feature_table(clean, canaries, "patient_demographics", refreshed="refreshed").passed

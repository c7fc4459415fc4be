"""The feature checks: rows before they are published scanned in full (a patient's own birth
date in that patient's rows), a published table's distinct values against every canary known
now (a new patient's name in a kept row), and the opted-out rule; each checked against a plain
row-by-row scan of the same rows."""

from __future__ import annotations

import duckdb

from deid.leakscan import CanarySet
from deid.release import scan_released_table
from pipelines.features.checks import check_feature_rows, check_published_table


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
    return con


def _canaries() -> CanarySet:
    canaries = CanarySet()
    canaries.add_patient({"name": [{"family": "Quillfeather", "given": ["Marisol"]}]}, "p2")
    canaries.add_patient({"birthDate": "1961-04-09"}, "p3")
    canaries.compile()
    return canaries


def _row_by_row(con: duckdb.DuckDBPyConnection, canaries: CanarySet) -> set[str]:
    """The oracle: every row scanned on its own, with its patient."""
    table = "features.patient_demographics"
    scan = scan_released_table(con, canaries, table, id_column="patient_id")
    return {h.kind for h in scan.hits}


def test_a_new_patients_name_in_a_kept_row_is_found_after_publication() -> None:
    con = _features([("p1", "Marisol Quillfeather", "2106-3"), ("p2", "female", "2106-3")])
    canaries = _canaries()
    check = check_published_table(con, canaries, "patient_demographics")
    assert not check.passed and check.opted_out_rows == 0
    assert {h.kind for h in check.scan.hits} == _row_by_row(con, canaries) == {"full_name", "name"}


def test_new_rows_are_scanned_for_their_own_patients_birth_date() -> None:
    con = _features([("p3", "1961-04-09", "2106-3"), ("p4", "female", "2106-3")])
    canaries = _canaries()
    check = check_feature_rows(con, canaries, "features.patient_demographics")
    assert [(h.row, h.kind) for h in check.scan.hits] == [("p3", "birth_date")]
    assert _row_by_row(con, canaries) == {"birth_date"}
    # the same date in another patient's row is not that patient's birth date
    other = _features([("p4", "1961-04-09", "2106-3")])
    assert check_feature_rows(other, canaries, "features.patient_demographics").passed
    assert _row_by_row(other, canaries) == set()


def test_rows_of_an_opted_out_patient_fail_the_check() -> None:
    con = _features([("p4", "female", "2106-3"), ("p5", "male", "2106-3")])
    con.execute("CREATE SCHEMA views")
    con.execute(
        "CREATE TABLE views.consent (patient_id VARCHAR, status VARCHAR, "
        "scope_code VARCHAR, provision_type VARCHAR, policy_rule_code VARCHAR)"
    )
    con.execute("INSERT INTO views.consent VALUES ('p5', 'active', 'research', 'deny', NULL)")
    canaries = _canaries()
    check = check_feature_rows(con, canaries, "features.patient_demographics")
    assert check.scan.passed and not check.passed
    assert check.opted_out_rows == 1  # p5's one row; counted apart:
    ((rows,),) = con.execute(
        "SELECT count(*) FROM features.patient_demographics WHERE patient_id = 'p5'"
    ).fetchall()
    assert rows == 1

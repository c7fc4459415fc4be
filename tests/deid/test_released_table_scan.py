"""The row scan of a released table reads its date columns: ``views.patient.birth_date`` is a
DATE, and a birth date left unshifted there is the leak the scan is for. Timestamps are event
times and are not searched. Which rows hold a patient's own birth date is written here by hand."""

from __future__ import annotations

import duckdb

from deid.leakscan import CanarySet
from deid.release import scan_released_table


def _canaries() -> CanarySet:
    canaries = CanarySet()
    canaries.add_patient({"birthDate": "1961-04-09"}, "p1")
    canaries.add_patient({"birthDate": "1975-12-30"}, "p2")
    return canaries


def _table() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE released (id VARCHAR, patient_id VARCHAR, birth_date DATE, "
        "seen_at TIMESTAMP, seen_at_tz TIMESTAMPTZ)"
    )
    con.executemany(
        "INSERT INTO released VALUES (?, ?, ?::DATE, ?::TIMESTAMP, ?::TIMESTAMPTZ)",
        [
            ("r1", "p1", "1961-04-09", None, None),  # p1's own birth date, as a DATE
            ("r2", "p2", "1961-04-09", None, None),  # p1's date in p2's row: somebody's date
            ("r3", "p1", "1961-04-14", "1961-04-09 00:00:00", "1961-04-09 00:00:00+00"),
            ("r4", "p2", "1975-12-30", None, None),  # p2's own
        ],
    )
    return con


def test_a_birth_date_in_a_date_column_is_found_in_its_own_patients_row() -> None:
    with _table() as con:
        result = scan_released_table(con, _canaries(), "released")
    assert sorted((hit.row, hit.kind) for hit in result.hits) == [
        ("r1", "birth_date"),
        ("r4", "birth_date"),
    ]
    assert not result.passed and result.scanned_rows == 4

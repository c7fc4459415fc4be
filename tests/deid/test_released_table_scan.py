"""The row scan of a released table reads its date columns: ``views.patient.birth_date`` is a
DATE, and a birth date left unshifted there is the leak the scan is for. Timestamps are event
times and are not searched. Which rows hold a patient's own birth date is written here by hand."""

from __future__ import annotations

import duckdb

from deid.leakscan import CanarySet
from deid.release import scan_column_values, scan_released_table


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


def test_a_date_on_1_january_is_scanned_as_its_year() -> None:
    """A year padded to a DATE (``views.patient.birth_date`` of a birth date released as the year
    of its age band) is 1 January of that year: for a patient born on 1 January whose band's
    year was their own, scanning it as a whole date found their birth date and held the view
    back, though it says no more than the year. A birth date on another day is still found."""
    canaries = CanarySet()
    canaries.add_patient({"birthDate": "1954-01-01"}, "p1")
    canaries.add_patient({"birthDate": "1954-03-15"}, "p2")
    with duckdb.connect() as con:
        con.execute("CREATE TABLE patient (id VARCHAR, patient_id VARCHAR, birth_date DATE)")
        con.executemany(
            "INSERT INTO patient VALUES (?, ?, ?::DATE)",
            [("r1", "p1", "1954-01-01"), ("r2", "p2", "1954-03-15"), ("r3", "p2", "1954-01-01")],
        )
        rows = scan_released_table(con, canaries, "patient")
        values = scan_column_values(con, canaries, "patient")
    assert [(hit.row, hit.kind) for hit in rows.hits] == [("r2", "birth_date")]
    assert values.passed  # a birth date is searched in its own patient's rows only


def test_the_date_of_an_event_time_the_row_releases_is_not_searched_as_a_birth_date() -> None:
    """``views.encounter.period_start_date`` is the date of ``period_start`` as written in its
    own zone: an event's date, which says no more than the timestamp beside it (not searched).
    An encounter whose released date fell on the patient's own birth date (a visit on the day of
    birth, or the date shift) held the whole view back. A DATE column of no such timestamp, or
    of a timestamp of another name, is still searched."""
    canaries = CanarySet()
    canaries.add_patient({"birthDate": "2019-06-02"}, "p1")
    with duckdb.connect() as con:
        con.execute(
            "CREATE TABLE encounter (id VARCHAR, patient_id VARCHAR, period_start TIMESTAMPTZ, "
            "period_start_date DATE, period_end_date DATE, recorded_date DATE)"
        )
        con.execute(
            "INSERT INTO encounter VALUES ('e1', 'p1', '2019-06-01 22:30:00+00', "
            "'2019-06-02', NULL, NULL), ('e2', 'p1', NULL, NULL, '2019-06-02', NULL), "
            "('e3', 'p1', NULL, NULL, NULL, '2019-06-02')"
        )
        rows = scan_released_table(con, canaries, "encounter")
    # e1's date is its event time's; e2's period_end_date has no period_end beside it, and e3's
    # recorded_date no recorded timestamp: both are dates of their own, searched
    assert sorted(hit.row for hit in rows.hits) == ["e2", "e3"]

"""The leak scan of the k-anonymous patient table reads each distinct combination once, and
finds what a scan of every row with its patient finds (a second, row-by-row computation)."""

from __future__ import annotations

import random

import duckdb

from deid.kanon import QUASI_IDENTIFIERS
from deid.leakscan import CanarySet, scan_rows
from deid.release import _scan_staged_patients


def _row_by_row(canaries: CanarySet, rows: list[tuple[str, ...]]) -> set[tuple[str, str]]:
    """(patient, kind) of every hit, each row scanned with its own patient."""
    result = scan_rows(
        canaries,
        (
            (pid, [{"system": "", "code": "", "display": v} for v in values if v], pid)
            for pid, *values in rows
        ),
    )
    return {(hit.row, hit.kind) for hit in result.hits}


def _table(rows: list[tuple[str, ...]]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    columns = ", ".join(f"{c} VARCHAR" for c in QUASI_IDENTIFIERS)
    con.execute(f"CREATE TABLE staged (patient_id VARCHAR, {columns})")
    con.executemany(f"INSERT INTO staged VALUES ({', '.join('?' * 7)})", rows)
    return con


def _canaries() -> CanarySet:
    canaries = CanarySet()
    canaries.add_patient(
        {"name": [{"family": "Whitlock", "given": ["Odalys"]}], "birthDate": "1961-04-09"}, "p1"
    )
    canaries.add_patient({"name": [{"family": "Brennan"}], "birthDate": "1975-12-30"}, "p2")
    canaries.add_patient({"identifier": [{"value": "MRN-48213377"}]}, "p3")
    return canaries


def test_distinct_scan_finds_what_a_row_by_row_scan_finds() -> None:
    rng = random.Random(7)
    bands, states = ["40-44", "45-49", "50-54"], ["MA", "Odalys Whitlock", "NH", "1961-04-09"]
    rows = [
        (
            f"p{i}",
            rng.choice(bands),
            rng.choice(["male", "female"]),
            "021",
            rng.choice(states),
            "white",
            "unknown",
        )
        for i in range(1, 400)
    ]
    rows.append(("p3", "40-44", "female", "MRN-48213377", "MA", "white", "unknown"))
    canaries = _canaries()
    expected = _row_by_row(canaries, rows)
    # the reference finds the full name in many rows, the identifier once, and p1's own birth
    # date only in p1's row when that row holds it
    assert {kind for _, kind in expected} == {"full_name", "identifier", "birth_date"}
    result = _scan_staged_patients(canaries, _table(rows), "staged")
    assert {hit.kind for hit in result.hits} == {kind for _, kind in expected}
    own_births = {row for row, kind in expected if kind == "birth_date"}
    assert {hit.row for hit in result.hits if hit.kind == "birth_date"} == own_births
    assert not result.passed


def test_a_birth_date_is_found_only_in_its_own_patients_row() -> None:
    rows = [
        ("p1", "60-64", "female", "021", "1961-04-09", "white", "unknown"),
        ("p2", "60-64", "female", "021", "1961-04-09", "white", "unknown"),
        ("p9", "45-49", "male", "021", "MA", "white", "unknown"),
    ]
    canaries = _canaries()
    result = _scan_staged_patients(canaries, _table(rows), "staged")
    assert [(hit.row, hit.kind) for hit in result.hits] == [("p1", "birth_date")]
    assert _row_by_row(canaries, rows) == {("p1", "birth_date")}
    clean = _scan_staged_patients(canaries, _table(rows[2:]), "staged")
    assert clean.passed and clean.scanned_rows == 1


def test_an_identifier_glued_to_a_prefix_in_a_state_is_found() -> None:
    """Patient.address.state is released as written: p3's MRN (48213377) with a prefix glued
    to it is found, a longer number holding its digits is not."""
    rows: list[tuple[str, ...]] = [
        ("p3", "40-44", "female", "021", "MRN48213377", "white", "unknown"),
        ("p4", "40-44", "female", "021", "MRN4821337700", "white", "unknown"),
        ("p9", "45-49", "male", "021", "MA", "white", "unknown"),
    ]
    result = _scan_staged_patients(_canaries(), _table(rows), "staged")
    assert [(hit.row, hit.kind) for hit in result.hits] == [
        ("released_patients:distinct", "identifier")
    ]

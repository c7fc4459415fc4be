"""Checks of built feature tables: shape for metadata, the opted-out rule re-derived straight
from ``views.consent`` (not from the temp views the build used), and the PHI leak scan."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import duckdb

from deid.leakscan import CanarySet, LeakScanResult, scan_rows
from pipelines.features.tables import FEATURES_SCHEMA

OPTED_OUT_SQL = """
SELECT DISTINCT patient_id FROM views.consent
WHERE lower(status) = 'active' AND lower(scope_code) = 'research'
  AND (lower(provision_type) = 'deny' OR upper(policy_rule_code) = 'OPTOUT')
"""


@dataclass(frozen=True)
class TableShape:
    rows: int
    patients: int
    columns: list[tuple[str, str]]


def table_shape(con: duckdb.DuckDBPyConnection, name: str) -> TableShape:
    table = f"{FEATURES_SCHEMA}.{name}"
    columns = [(str(c), str(t)) for c, t, *_ in con.execute(f"DESCRIBE {table}").fetchall()]
    ((rows, patients),) = con.execute(
        f"SELECT count(*), count(DISTINCT patient_id) FROM {table}"
    ).fetchall()
    return TableShape(int(rows), int(patients), columns)


def _has_consent_view(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'views' AND table_name = 'consent'"
        ).fetchall()[0][0]
    )


def opted_out_rows(con: duckdb.DuckDBPyConnection, name: str) -> tuple[int, int]:
    """(rows of opted-out patients in the table, opted-out patients known); the first must be 0."""
    if not _has_consent_view(con):
        return 0, 0
    ((rows,),) = con.execute(
        f"SELECT count(*) FROM {FEATURES_SCHEMA}.{name} WHERE patient_id IN ({OPTED_OUT_SQL})"
    ).fetchall()
    ((known,),) = con.execute(f"SELECT count(*) FROM ({OPTED_OUT_SQL})").fetchall()
    return int(rows), int(known)


def scan_feature_table(
    con: duckdb.DuckDBPyConnection, canaries: CanarySet, name: str
) -> LeakScanResult:
    """Every text column of the table against the release canaries (the leak scan of
    deid.leakscan); a row is named by its patient pseudonym, and a patient's own birth date is
    searched in that patient's rows. Numbers, flags and timestamps hold no text to search."""
    table = f"{FEATURES_SCHEMA}.{name}"
    text_columns = [
        str(column)
        for column, type_, *_ in con.execute(f"DESCRIBE {table}").fetchall()
        if str(type_) == "VARCHAR"
    ]
    select = ", ".join(f'"{c}"' for c in text_columns)
    cursor = con.cursor()
    try:
        cursor.execute(f"SELECT patient_id, {select} FROM {table}")

        def rows() -> Iterator[tuple[str, list[str], str]]:
            while chunk := cursor.fetchmany(5_000):
                for patient, *values in chunk:
                    yield str(patient), [v for v in values if v is not None], str(patient)

        return scan_rows(canaries, rows())
    finally:
        cursor.close()

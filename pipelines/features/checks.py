"""Checks of built feature tables: shape for metadata, the opted-out rule re-derived straight
from ``views.consent`` (not from the temp views the build used), and the PHI leak scan."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from deid.leakscan import CanarySet, LeakScanResult
from deid.release import merged_scans, scan_column_values, scan_released_table
from pipelines.features.cohort import opted_out_sql
from pipelines.features.tables import FEATURES_SCHEMA

OPTED_OUT_SQL = opted_out_sql("views.consent")


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
    con: duckdb.DuckDBPyConnection,
    canaries: CanarySet,
    name: str,
    *,
    refreshed: str | None = None,
) -> LeakScanResult:
    """The release leak scan (:func:`deid.release.scan_released_table`) of one feature table;
    a row is named by its patient pseudonym, and a patient's own birth date is searched in
    that patient's rows. The text of a feature table (the patient pseudonym and a few codes)
    repeats on each of a patient's rows: each distinct combination is scanned once.

    With ``refreshed`` (a table of ``patient_id``, a trusted name: the patients an incremental
    refresh computed again), only those patients' rows are scanned that way; every other row
    was scanned when it was written, and each distinct value of its text columns is scanned
    again against every canary known now (a patient new to the release is found there too).
    Pseudonyms are not text anyone wrote and are not scanned again."""
    table = f"{FEATURES_SCHEMA}.{name}"
    if refreshed is None:
        return scan_released_table(con, canaries, table, id_column="patient_id", distinct_rows=True)
    return merged_scans(
        scan_released_table(
            con,
            canaries,
            table,
            id_column="patient_id",
            distinct_rows=True,
            where=f"patient_id IN (SELECT patient_id FROM {refreshed})",
        ),
        scan_column_values(con, canaries, table, skip_columns=("patient_id",)),
    )
